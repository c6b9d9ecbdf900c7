"""`llm-gateway-client admin …` (clients/python/src/llm_gateway_client/admin_cli.py).

Every subcommand runs in-process through the CLI's `main(argv)` (stdout and stderr captured)
against a real `AdminService`: the servicer and its auth interceptor on a grpc.aio server on
127.0.0.1:0 over a real SQLite store in the test's own directory; one run goes through the
installed `llm-gateway-client` entry point as a subprocess. The CLI is blocking, so it runs in a
thread while the test's event loop serves. The unit tests at the top cover the parsing (durations,
times, group-by, update masks) without a server.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from llm_gateway.admin.v1 import admin_pb2 as apb
from llm_gateway_client import admin_cli
from llm_gateway_client import cli as client_cli
from llm_gateway_client.admin import AdminCallError, AdminClient
from llm_gateway_server.admin.auth import AdminAuthInterceptor
from llm_gateway_server.admin.servicer import AdminServicer, add_admin_service
from llm_gateway_server.config import StoreSettings
from llm_gateway_server.interceptors.auth import hash_key
from llm_gateway_server.interceptors.base import InterceptorChain
from llm_gateway_server.store.base import Store
from llm_gateway_server.store.sql import open_store, resolve_database_url
from llm_gateway_server.tenancy.records import UsageRecord

ADMIN_KEY = "adm-test-0123456789-DO-NOT-PRINT"
NOW = datetime.now(UTC)

# ---------------------------------------------------------------------------------------------
# Parsing, no server
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("30m", timedelta(minutes=30)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("2w", timedelta(weeks=2)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("1.5h", timedelta(minutes=90)),
        (" 7D ", timedelta(days=7)),
        ("0", timedelta(0)),
        ("0s", timedelta(0)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert admin_cli.parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "-1d", "+1d", "1d-", "1 d", "1h 30m", "h1", "1.d", "P7D"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        admin_cli.parse_duration(text)


def test_parse_time_and_since() -> None:
    assert admin_cli.parse_time("2025-06-01T12:00:00Z") == datetime(2025, 6, 1, 12, tzinfo=UTC)
    assert admin_cli.parse_time("2025-06-01T14:00:00+02:00") == datetime(2025, 6, 1, 12, tzinfo=UTC)
    assert admin_cli.parse_time("2025-06-01") == datetime(2025, 6, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="no UTC offset"):
        admin_cli.parse_time("2025-06-01T12:00:00")
    with pytest.raises(ValueError, match="RFC 3339"):
        admin_cli.parse_time("yesterday")
    now = datetime(2025, 6, 8, tzinfo=UTC)
    assert admin_cli.parse_since("7d", now) == datetime(2025, 6, 1, tzinfo=UTC)
    assert admin_cli.parse_since("2025-06-01", now) == datetime(2025, 6, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match=r"duration .* or an RFC 3339 time"):
        admin_cli.parse_since("last week", now)


def test_money_and_state() -> None:
    assert [admin_cli._money(x) for x in (10, 2.5, 0.0000001, 0.0123, 0)] == [
        "10.00",
        "2.50",
        "0.0000001",
        "0.0123",
        "0.00",
    ]
    key = apb.Key(name="keys/a")
    assert admin_cli.key_state(key) == "active"
    key.disabled = True
    assert admin_cli.key_state(key) == "disabled"
    key.expire_time.FromDatetime(NOW - timedelta(seconds=1))
    assert admin_cli.key_state(key) == "expired"
    key.revoke_time.FromDatetime(NOW)
    assert admin_cli.key_state(key) == "revoked"


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Runs a command line that must be refused before any call (exit 2); its stderr."""
    with pytest.raises(SystemExit) as exited:
        client_cli.main(["--target", "127.0.0.1:1", *argv])
    assert exited.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["admin"], "required"),
        (["admin", "keys"], "required"),
        (["admin", "keys", "create", "--budget-usd", "5"], "--budget-usd and --budget-period go together"),
        (["admin", "keys", "create", "--expires-in", "soon"], "not a duration"),
        (["admin", "keys", "create", "--expire-time", "2030-01-01T00:00:00"], "no UTC offset"),
        (["admin", "keys", "create", "--expires-in", "1d", "--expire-time", "2030-01-01"], "not allowed with"),
        (["admin", "keys", "create", "--disabled", "--enabled"], "not allowed with"),
        (["admin", "keys", "update", "keys/a"], "nothing to update"),
        (["admin", "keys", "update", "keys/a", "--clear", "secret"], "not a field that can be cleared"),
        (["admin", "keys", "update", "keys/a", "--rpm", "5", "--clear", "limits"], "together with a new value"),
        (["admin", "keys", "update", "keys/a", "--rpm", "x"], "invalid int value"),
        (["admin", "keys", "rotate", "keys/a", "--grace-period", "1y"], "not a duration"),
        (["admin", "teams", "update", "teams/a", "--clear", "team"], "not a field that can be cleared"),
        (["admin", "usage", "--group-by", "model,week"], "not one of key,team,model,provider,day"),
        (["admin", "usage", "--group-by", "model", "--group-by", "model"], "given twice"),
        (["admin", "usage", "--since", "1d", "--until", "2d"], "--since must be before --until"),
        (["admin", "spend", "abc"], "give keys/ID or teams/ID"),
        (["admin", "keys", "list", "--timeout", "0"], "--timeout must be > 0"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = _usage_error(argv, capsys)
    assert message in err, err


def test_update_mask_from_the_options_given() -> None:
    parser = client_cli._parser()
    args = parser.parse_args(
        ["admin", "keys", "update", "a", "--tpm", "7", "--enabled", "--allowed-model", "m*", "--clear", "budget",
         "--clear", "expire-time", "--clear", "streams", "--team", "t"]
    )  # fmt: skip
    key = apb.Key(name="keys/a")
    mask = admin_cli._mask(admin_cli._key_fields(args, key), args.clear, admin_cli._KEY_CLEARABLE)
    assert mask == [
        "team",
        "allowed_models",
        "limits.tpm",
        "disabled",
        "budget",
        "expire_time",
        "limits.max_concurrent_streams",
    ]
    assert key.team == "teams/t" and list(key.allowed_models) == ["m*"] and key.limits.tpm == 7
    assert not key.disabled and not key.HasField("budget") and not key.limits.HasField("rpm")


def test_admin_options_go_after_admin_or_after_the_subcommand() -> None:
    parser = client_cli._parser()
    late = parser.parse_args(
        ["--timeout", "3", "admin", "--json", "keys", "list", "--admin-key", "k", "--timeout", "4"]
    )
    assert (late.json, late.admin_key, late.admin_timeout, late.timeout) == (True, "k", 4.0, 3.0)
    plain = parser.parse_args(["admin", "keys", "list"])
    assert not hasattr(plain, "json") and not hasattr(plain, "admin_key") and plain.timeout is None


# ---------------------------------------------------------------------------------------------
# Against a real AdminService
# ---------------------------------------------------------------------------------------------


@dataclass
class AdminApi:
    """A running AdminService over a store, and how to reach it."""

    target: str
    store: Store
    logs: list[MutableMapping[str, Any]]


@pytest.fixture
def quiet_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """The server's structlog entries, captured (not printed to the stdout the CLI writes to)."""
    with capture_logs() as logs:
        yield logs


@pytest.fixture
async def admin_api(
    migrated_sqlite_url: str, tmp_path: Path, quiet_logs: list[MutableMapping[str, Any]]
) -> AsyncIterator[AdminApi]:
    """The real servicer behind the admin auth layer on grpc.aio at 127.0.0.1:0, on a SQLite file
    of the test's own (a copy of the migrated template)."""
    store = await open_store(resolve_database_url(migrated_sqlite_url, tmp_path), StoreSettings())
    server = grpc.aio.server(interceptors=[InterceptorChain([AdminAuthInterceptor([hash_key(ADMIN_KEY)])])])
    add_admin_service(server, AdminServicer(store))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield AdminApi(f"127.0.0.1:{port}", store, quiet_logs)
    finally:
        await server.stop(None)
        await store.aclose()


@dataclass
class Run:
    """One CLI run: exit code and captured output."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        """stdout as exactly one JSON document."""
        assert self.code == 0, self.err
        return json.loads(self.out)


class Cli:
    """Runs `llm-gateway-client --target … admin …` in a thread (the loop keeps serving)."""

    def __init__(self, api: AdminApi, capsys: pytest.CaptureFixture[str]) -> None:
        self.api = api
        self.capsys = capsys
        self.outputs: list[str] = []

    async def __call__(self, *argv: str, admin_key: str | None = ADMIN_KEY) -> Run:
        key = ["--admin-key", admin_key] if admin_key is not None else []
        full = ["--target", self.api.target, "admin", *argv[:1], *key, *argv[1:]] if argv else []
        self.capsys.readouterr()
        try:
            code = await asyncio.to_thread(client_cli.main, full)
        except SystemExit as exited:
            code = int(exited.code or 0)
        captured = self.capsys.readouterr()
        self.outputs += [captured.out, captured.err]
        return Run(code, captured.out, captured.err)


@pytest.fixture
def cli(admin_api: AdminApi, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    monkeypatch.delenv(admin_cli.ADMIN_KEY_ENV, raising=False)
    return Cli(admin_api, capsys)


def _table(text: str) -> list[list[str]]:
    """An aligned table's rows as cells (split on runs of 2+ spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in text.strip().splitlines()]


def _details(text: str) -> dict[str, str]:
    """`field  value` lines as a dict."""
    pairs = (line.split("  ", 1) for line in text.strip().splitlines() if "  " in line)
    return {label.strip(): value.strip() for label, value in pairs}


async def test_keys_and_teams_lifecycle(cli: Cli) -> None:
    # teams create (table) and get (--json)
    created = await cli(
        "teams", "create", "--team-id", "search", "--display-name", "Search", "--budget-usd", "100",
        "--budget-period", "monthly", "--rpm", "100", "--allowed-model", "gpt-*",
    )  # fmt: skip
    assert created.code == 0, created.err
    team = _details(created.out)
    assert team["name"] == "teams/search" and team["budget"] == "$100.00 monthly" and team["limits"] == "rpm=100"
    assert (await cli("teams", "get", "search", "--json")).json()["display_name"] == "Search"

    # keys create: the secret once, with the warning
    made = await cli(
        "keys", "create", "--key-id", "ci", "--display-name", "ci", "--team", "search", "--allowed-model",
        "gpt-4o*", "--allowed-model", "gpt-5", "--rpm", "60", "--tpm", "1000", "--max-concurrent-streams", "2",
        "--budget-usd", "2.5", "--budget-period", "daily", "--expires-in", "30d",
    )  # fmt: skip
    assert made.code == 0, made.err
    details = _details(made.out)
    secret = details["secret"]
    assert secret and "will not be shown again" in made.out
    assert details["name"] == "keys/ci" and details["team"] == "teams/search" and details["state"] == "active"
    assert details["models"] == "gpt-4o*,gpt-5" and details["limits"] == "rpm=60 tpm=1000 streams=2"
    assert details["budget"] == "$2.50 daily"
    expires = datetime.fromisoformat(details["expires"])
    assert timedelta(days=29, hours=23) < expires - datetime.now(UTC) <= timedelta(days=30)
    # --json: the CreateKeyResponse, secret field included
    other = (await cli("keys", "create", "--json", "--display-name", "other", "--disabled")).json()
    assert other["secret"].startswith(other["key"]["secret_prefix"]) and other["key"]["disabled"] is True
    other_name = other["key"]["name"]

    # keys get / list (table and --json, paging)
    got = (await cli("keys", "get", "keys/ci", "--json")).json()
    assert got["name"] == "keys/ci" and "secret" not in got and got["limits"]["rpm"] == "60"
    assert list(got)[:5] == ["name", "display_name", "team", "allowed_models", "limits"]  # proto order, defaults too
    listed = await cli("keys", "list")
    rows = _table(listed.out)
    assert rows[0] == ["NAME", "DISPLAY NAME", "TEAM", "MODELS", "LIMITS", "BUDGET", "STATE", "CREATED"]
    by_name = {row[0]: row for row in rows[1:]}
    assert by_name["keys/ci"][1:7] == [
        "ci",
        "teams/search",
        "gpt-4o*,gpt-5",
        "rpm=60 tpm=1000 streams=2",
        "$2.50 daily",
        "active",
    ]
    assert by_name[other_name][2] == "-" and by_name[other_name][6] == "disabled"
    one_per_page = (await cli("keys", "list", "--page-size", "1", "--json")).json()
    assert sorted(k["name"] for k in one_per_page["keys"]) == sorted(["keys/ci", other_name])
    assert len((await cli("keys", "list", "--limit", "1", "--json")).json()["keys"]) == 1
    assert [k["name"] for k in (await cli("keys", "list", "--team", "search", "--json")).json()["keys"]] == ["keys/ci"]

    # keys update: the mask is the options given, --clear clears
    updated = await cli("keys", "update", "ci", "--tpm", "20000", "--clear", "budget", "--clear", "expire_time")
    assert updated.code == 0, updated.err
    details = _details(updated.out)
    assert details["limits"] == "rpm=60 tpm=20000 streams=2" and details["budget"] == "-"
    assert details["expires"] == "never" and details["models"] == "gpt-4o*,gpt-5"
    enabled = (await cli("keys", "update", other_name, "--enabled", "--display-name", "renamed", "--json")).json()
    assert enabled["disabled"] is False and enabled["display_name"] == "renamed"

    # keys rotate: a new secret, the old one valid for the grace period
    rotated = await cli("keys", "rotate", "keys/ci", "--grace-period", "1h")
    assert rotated.code == 0, rotated.err
    details = _details(rotated.out)
    assert details["secret"] != secret and "will not be shown again" in rotated.out
    grace = datetime.fromisoformat(details["previous secret until"]) - datetime.now(UTC)
    assert timedelta(minutes=59) < grace <= timedelta(hours=1)
    rotated_json = (await cli("keys", "rotate", "ci", "--json")).json()
    assert rotated_json["secret"] and rotated_json["key"]["name"] == "keys/ci"

    # teams list / update; delete refused while the team has keys; keys revoke; then delete
    teams = _table((await cli("teams", "list")).out)
    assert teams[0] == ["NAME", "DISPLAY NAME", "MODELS", "LIMITS", "BUDGET", "CREATED"]
    assert teams[1][:5] == ["teams/search", "Search", "gpt-*", "rpm=100", "$100.00 monthly"]
    team_json = (await cli("teams", "update", "search", "--tpm", "5000", "--clear", "rpm", "--json")).json()
    assert team_json["limits"] == {"tpm": "5000"}
    refused = await cli("teams", "delete", "teams/search")
    assert refused.code == 1 and "FAILED_PRECONDITION TEAM_NOT_EMPTY" in refused.err
    revoked = await cli("keys", "revoke", "ci")
    assert revoked.code == 0 and _details(revoked.out)["state"] == "revoked"
    assert "keys/ci" not in (await cli("keys", "list")).out
    assert "keys/ci" in (await cli("keys", "list", "--show-revoked")).out
    deleted = await cli("teams", "delete", "search")
    assert (deleted.code, deleted.out.strip()) == (0, "deleted teams/search")
    assert (await cli("teams", "list", "--json")).json() == {"teams": [], "next_page_token": ""}
    assert (await cli("teams", "list")).out.strip() == "no teams"

    # no secret in any later response, and the admin key in no output at all
    later = "".join(cli.outputs[cli.outputs.index(made.out) + 1 :])
    assert secret not in later.replace(rotated.out, "")
    assert ADMIN_KEY not in "".join(cli.outputs)
    assert ADMIN_KEY not in repr(cli.api.logs) and secret not in repr(cli.api.logs)


def _usage(
    when: datetime, key: str, team: str, model: str, *, tokens: int, nano_usd: int, ok: bool = True
) -> UsageRecord:
    return UsageRecord(
        time=when,
        request_id=f"r-{when.timestamp()}-{model}-{key}",
        key_id=key,
        team_id=team,
        method="Chat",
        model=model,
        provider="openai",
        input_tokens=tokens,
        output_tokens=tokens // 2,
        cost_nano_usd=nano_usd,
        status_code="OK" if ok else "UNAVAILABLE",
        reason="" if ok else "UPSTREAM_UNAVAILABLE",
    )


async def test_usage_and_spend(cli: Cli) -> None:
    assert (await cli("teams", "create", "--team-id", "t", "--display-name", "T")).code == 0
    made = await cli(
        "keys", "create", "--key-id", "k", "--display-name", "k", "--team", "t", "--budget-usd", "1",
        "--budget-period", "monthly",
    )  # fmt: skip
    assert made.code == 0, made.err
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(minutes=1)
    yesterday, long_ago = today - timedelta(days=1), today - timedelta(days=30)
    await cli.api.store.write_usage(
        [
            _usage(today, "k", "t", "gpt-4o-mini", tokens=100, nano_usd=1_000),  # 0.000001 USD
            _usage(today, "k", "t", "gpt-4o-mini", tokens=10, nano_usd=200, ok=False),
            _usage(yesterday, "k", "t", "gpt-4o-mini", tokens=20, nano_usd=300),
            _usage(yesterday, "k", "t", "claude-3", tokens=40, nano_usd=5_000_000),
            _usage(long_ago, "k", "t", "claude-3", tokens=1, nano_usd=7),
            _usage(today, "", "", "other", tokens=1, nano_usd=1),
        ]
    )

    grouped = await cli("usage", "--group-by", "model,day", "--since", "7d", "--key", "k")
    assert grouped.code == 0, grouped.err
    rows = _table(grouped.out)
    header = ["MODEL", "DAY", "REQUESTS", "INPUT", "OUTPUT", "CACHED", "REASONING", "ERRORS", "CACHE HITS"]
    assert rows[0] == [*header, "COST USD"]
    day, previous = today.strftime("%Y-%m-%d"), yesterday.strftime("%Y-%m-%d")
    assert rows[1:] == [
        ["claude-3", previous, "1", "40", "20", "0", "0", "0", "0", "0.0050000"],
        ["gpt-4o-mini", previous, "1", "20", "10", "0", "0", "0", "0", "0.0000003"],
        ["gpt-4o-mini", day, "2", "110", "55", "0", "0", "1", "0", "0.0000012"],
        ["TOTAL", "4", "170", "85", "0", "0", "1", "0", "0.0050015"],
    ]
    # --json, every page (one row per page), filters and --until
    paged = (await cli("usage", "--group-by", "model", "--group-by", "day", "--page-size", "1", "--json")).json()
    assert [(r["model"], r["requests"]) for r in paged["rows"]] == [
        ("claude-3", "1"),
        ("claude-3", "1"),
        ("gpt-4o-mini", "1"),
        ("gpt-4o-mini", "2"),
        ("other", "1"),
    ]
    totals = (await cli("usage", "--team", "teams/t", "--model", "claude-3", "--provider", "openai", "--json")).json()
    assert [(r["requests"], r["input_tokens"]) for r in totals["rows"]] == [("2", "41")]
    until = (await cli("usage", "--group-by", "key", "--until", today.strftime("%Y-%m-%d"), "--json")).json()
    assert [(r["key"], r["requests"]) for r in until["rows"]] == [("keys/k", "3")]  # yesterday and long ago
    nothing = ["usage", "--since", "2h", "--until", "1h", "--model", "none"]
    assert (await cli(*nothing, "--group-by", "model")).out.strip() == "no usage"
    assert _table((await cli(*nothing)).out)[1] == ["0", "0", "0", "0", "0", "0", "0", "0.0000000"]  # the totals

    # spend: a key with a monthly budget, a team without one (lifetime)
    spend = await cli("spend", "keys/k")
    assert spend.code == 0, spend.err
    details = _details(spend.out)
    month = today.replace(day=1, minute=0)
    assert details["name"] == "keys/k" and details["budget"].startswith("$1.00 monthly (")
    assert details["period"].startswith(month.strftime("%Y-%m-%dT00:00:00Z to "))
    spend_json = (await cli("spend", "teams/t", "--json")).json()
    assert spend_json["name"] == "teams/t" and spend_json["limit_usd"] == 0
    assert spend_json["spend_usd"] == pytest.approx(0.0050015 + 0.000000007)
    assert "none (lifetime spend)" in (await cli("spend", "teams/t")).out


async def test_errors_go_to_stderr_with_exit_1(cli: Cli) -> None:
    missing = await cli("keys", "get", "keys/nope")
    assert (missing.code, missing.out) == (1, "")
    assert missing.err.startswith("error: NOT_FOUND RESOURCE_NOT_FOUND: ") and "keys/nope" in missing.err
    assert (await cli("teams", "delete", "nope")).err.startswith("error: NOT_FOUND")

    invalid = await cli(
        "keys", "create", "--key-id", "Bad_Id!", "--display-name", "x", "--rpm", "0", "--allowed-model", "[",
        "--budget-usd", "-1", "--budget-period", "total",
    )  # fmt: skip
    assert (invalid.code, invalid.out) == (1, "")
    lines = invalid.err.splitlines()
    assert lines[0].startswith("error: INVALID_ARGUMENT INVALID_REQUEST: ")
    violated = {line.strip().split(":", 1)[0] for line in lines[1:]}
    assert {"key_id", "key.limits.rpm", "key.budget.limit_usd"} <= violated, invalid.err
    assert any(field.startswith("key.allowed_models") for field in violated), invalid.err

    wrong = await cli("keys", "list", admin_key="wrong-admin-key-SHOULD-NOT-ECHO")
    assert (wrong.code, wrong.out) == (1, "")
    assert wrong.err.startswith("error: UNAUTHENTICATED ADMIN_KEY_INVALID: ")
    assert "SHOULD-NOT-ECHO" not in wrong.err
    anonymous = await cli("keys", "list", admin_key=None)
    assert anonymous.code == 1 and "UNAUTHENTICATED" in anonymous.err
    assert "no admin key given: --admin-key or $LLM_GATEWAY_ADMIN_KEY" in anonymous.err
    assert ADMIN_KEY not in "".join(cli.outputs)


async def test_admin_key_from_the_environment_and_the_timeout(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(admin_cli.ADMIN_KEY_ENV, ADMIN_KEY)
    listed = await cli("keys", "list", admin_key=None)
    assert (listed.code, listed.out.strip()) == (0, "no keys")
    # An unreachable target fails within --timeout (a deadline on the call), exit 1.
    started = asyncio.get_running_loop().time()
    code = await asyncio.to_thread(
        client_cli.main, ["--target", "127.0.0.1:1", "admin", "--timeout", "0.5", "teams", "list"]
    )
    assert code == 1 and asyncio.get_running_loop().time() - started < 5
    err = capsys.readouterr().err
    assert err.startswith(("error: UNAVAILABLE", "error: DEADLINE_EXCEEDED")) and ADMIN_KEY not in err


async def test_admin_client_raises_admin_call_error(admin_api: AdminApi) -> None:
    def call() -> AdminCallError:
        with AdminClient(admin_api.target, admin_key=ADMIN_KEY, timeout_s=5) as client:
            with pytest.raises(AdminCallError) as raised:
                client.create_team(apb.Team(display_name=""))
            return raised.value

    error = await asyncio.to_thread(call)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.reason == "INVALID_REQUEST"
    assert [field for field, _ in error.violations] == ["team.display_name"]


async def test_installed_entry_point_as_a_subprocess(admin_api: AdminApi) -> None:
    """`llm-gateway-client` as installed (the console script), admin key from the environment."""
    script = shutil.which("llm-gateway-client", path=str(Path(sys.executable).parent))
    assert script is not None, "the client package's console script is not installed in this venv"
    environ = {**os.environ, admin_cli.ADMIN_KEY_ENV: ADMIN_KEY, "LLM_GATEWAY_TARGET": admin_api.target}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([script, *argv], capture_output=True, text=True, env=environ, timeout=60, check=False)

    made = await asyncio.to_thread(run, "admin", "keys", "create", "--display-name", "sub", "--json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["secret"] and created["key"]["display_name"] == "sub"
    listed = await asyncio.to_thread(run, "admin", "keys", "list")
    assert listed.returncode == 0 and created["key"]["name"] in listed.stdout
    missing = await asyncio.to_thread(run, "admin", "keys", "get", "keys/nope")
    assert missing.returncode == 1 and missing.stderr.startswith("error: NOT_FOUND")
    usage = await asyncio.to_thread(run, "admin", "keys", "frobnicate")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    for process in (made, listed, missing, usage):
        assert ADMIN_KEY not in process.stdout + process.stderr

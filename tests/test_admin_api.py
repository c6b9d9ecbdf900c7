"""The admin API (`llm_gateway.admin.v1.AdminService`) through its generated stubs over a real
channel: a grpc.aio server on 127.0.0.1:0 with the admin servicer behind the admin auth layer
(`InterceptorChain([AdminAuthInterceptor])`), on a real store — a SQLite file and the machine's
PostgreSQL (each test in its own database/schema, from the `sqlite_url` / `postgres_url`
fixtures), every test on both.

Covers every RPC, pagination, FieldMask updates (clearing fields, subfield paths), the bad-input
cases of issue 12's must-show (NOT_FOUND, ALREADY_EXISTS, INVALID_ARGUMENT with BadRequest field
violations, bad page tokens), secrets never logged or echoed after creation, admin auth, GetSpend
periods on an injected clock and QueryUsage over records written with `Store.write_usage`.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_gateway.admin.v1 import admin_pb2 as apb
from llm_gateway.admin.v1 import admin_pb2_grpc as apb_grpc
from llm_gateway_server.admin.auth import AdminAuthInterceptor
from llm_gateway_server.admin.servicer import ADMIN_SERVICE_NAME, AdminServicer, add_admin_service
from llm_gateway_server.config import StoreSettings
from llm_gateway_server.interceptors.auth import hash_key
from llm_gateway_server.interceptors.base import InterceptorChain
from llm_gateway_server.store.base import ScopeKind, Store
from llm_gateway_server.store.sql import SqlStore, open_store, resolve_database_url
from llm_gateway_server.telemetry.logging import configure_logging
from llm_gateway_server.tenancy.records import KeyRecord, TeamRecord, UsageRecord, usd_to_nano

from .conftest import PostgresSchema, RichError, expect_error, free_port, rich_error

ADMIN_KEY = "admin-0123456789-SECRET-admin"
ADMIN = (("authorization", f"Bearer {ADMIN_KEY}"),)
SECRET_RE = re.compile(r"^sk-gw-[A-Za-z0-9_-]{43}$")
CONFIGURED_SECRET = "sk-yaml-configured-0123456789"
CONFIGURED = (
    KeyRecord(id="k-03a", display_name="YAML key", secret_sha256=hash_key(CONFIGURED_SECRET), configured=True),
    KeyRecord(id="Ops_Key", display_name="YAML ops key", secret_sha256=hash_key("sk-yaml-ops-0123456789")),
)


class Clock:
    """The servicer's clock: real time unless a test sets `now`."""

    def __init__(self) -> None:
        self.now: datetime | None = None

    def __call__(self) -> datetime:
        return self.now or datetime.now(UTC)


@dataclass
class Admin:
    """A served admin API: stub (admin credential on every call), its store and what it reported."""

    stub: Any
    bare: Any  # the same server, no credential
    store: Store
    clock: Clock
    changes: list[tuple[str, str | None]] = field(default_factory=list)
    pending: dict[tuple[str, str], int] = field(default_factory=dict)


class _Credential(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = list(details.metadata or ())
        if not any(k in ("authorization", "x-api-key") for k, _ in metadata):
            metadata.extend(ADMIN)
        return await continuation(details._replace(metadata=metadata), request)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test's own SQLite file (a copy of the migrated template), then its own schema on the
    machine's PostgreSQL (conftest fixtures)."""
    if request.param == "sqlite":
        url: str = request.getfixturevalue("migrated_sqlite_url")
        return url
    schema: PostgresSchema = request.getfixturevalue("postgres_url")
    return schema.url


@pytest.fixture
async def store(database_url: str, tmp_path: Path) -> AsyncIterator[Store]:
    opened = await open_store(resolve_database_url(database_url, tmp_path), StoreSettings())
    yield opened
    await opened.aclose()


AdminFactory = Callable[..., Any]


@pytest.fixture
async def make_admin(store: Store) -> AsyncIterator[AdminFactory]:
    """`await make_admin(digests=..., configured=..., on_change=...)` serves the admin API on `store`."""
    servers: list[tuple[grpc.aio.Server, list[grpc.aio.Channel]]] = []

    async def make(
        digests: tuple[str, ...] = (hash_key(ADMIN_KEY),),
        configured: tuple[KeyRecord, ...] = CONFIGURED,
        on_change: Any = None,
        store: Store = store,
        chain: bool = True,
    ) -> Admin:
        clock = Clock()
        admin = Admin(stub=None, bare=None, store=store, clock=clock)

        async def record_change(kind: str, resource_id: str | None) -> None:
            admin.changes.append((kind, resource_id))

        def pending_spend(kind: ScopeKind, scope_id: str, since: datetime | None) -> int:
            return admin.pending.get((kind, scope_id), 0)

        async def is_data_plane_key(secret: str) -> bool:
            digest = hash_key(secret)
            return any(k.secret_sha256 == digest for k in configured) or await store.find_key(digest) is not None

        servicer = AdminServicer(
            store,
            configured_keys=configured,
            on_change=on_change or record_change,
            pending_spend=pending_spend,
            clock=clock,
        )
        auth = AdminAuthInterceptor(digests, is_data_plane_key)
        server = grpc.aio.server(interceptors=[InterceptorChain([auth]) if chain else auth])
        add_admin_service(server, servicer)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        authorized = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=[_Credential()])
        bare = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        servers.append((server, [authorized, bare]))
        admin.stub = apb_grpc.AdminServiceStub(authorized)
        admin.bare = apb_grpc.AdminServiceStub(bare)
        return admin

    yield make
    for server, channels in servers:
        for channel in channels:
            await channel.close()
        await server.stop(None)


@pytest.fixture
async def admin(make_admin: AdminFactory) -> Admin:
    result: Admin = await make_admin()
    return result


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def violations(error: RichError) -> dict[str, str]:
    """field → description of the BadRequest violations."""
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT, error
    assert error.info.reason == "INVALID_REQUEST"
    assert error.bad_request is not None
    return {v.field: v.description for v in error.bad_request.field_violations}


async def new_key(admin: Admin, display_name: str, key_id: str = "", **fields: Any) -> apb.CreateKeyResponse:
    response: apb.CreateKeyResponse = await admin.stub.CreateKey(
        apb.CreateKeyRequest(key=apb.Key(display_name=display_name, **fields), key_id=key_id)
    )
    return response


async def new_team(admin: Admin, display_name: str, team_id: str = "", **fields: Any) -> apb.Team:
    team: apb.Team = await admin.stub.CreateTeam(
        apb.CreateTeamRequest(team=apb.Team(display_name=display_name, **fields), team_id=team_id)
    )
    return team


# --- keys --------------------------------------------------------------------------------------


async def test_create_and_get_key(admin: Admin) -> None:
    team = await new_team(admin, "Search", "search")
    expire = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    created = await new_key(
        admin,
        "search backend",
        "search-backend",
        team=team.name,
        allowed_models=["gpt-4o*", "claude-[0-9]*"],
        limits=apb.Limits(rpm=60, max_concurrent_streams=4),
        budget=apb.Budget(limit_usd=12.5, period=apb.BUDGET_PERIOD_MONTHLY),
        expire_time=ts(expire),
    )
    assert SECRET_RE.match(created.secret), "the secret is sk-gw- and 43 URL-safe characters"
    key = created.key
    assert key.name == "keys/search-backend"
    assert key.secret_prefix == created.secret[:10]
    assert key.team == "teams/search"
    assert list(key.allowed_models) == ["gpt-4o*", "claude-[0-9]*"]
    assert key.limits.rpm == 60 and not key.limits.HasField("tpm") and key.limits.max_concurrent_streams == 4
    assert key.budget.limit_usd == 12.5 and key.budget.period == apb.BUDGET_PERIOD_MONTHLY
    assert key.expire_time.ToDatetime(tzinfo=UTC) == expire
    assert key.HasField("create_time") and not key.HasField("revoke_time") and not key.configured
    assert await admin.stub.GetKey(apb.GetKeyRequest(name=key.name)) == key
    assert admin.changes == [("created", "search-backend")]
    stored = await admin.store.get_key("search-backend")
    assert stored is not None and stored.secret_sha256 == hash_key(created.secret)


async def test_generated_ids(admin: Admin) -> None:
    key = (await new_key(admin, "no id")).key
    team = await new_team(admin, "no id either")
    assert re.fullmatch(r"keys/[a-z2-7]{12}", key.name)
    assert re.fullmatch(r"teams/[a-z2-7]{12}", team.name)


async def test_list_keys_pages_in_id_order_with_configured_keys(admin: Admin) -> None:
    team = await new_team(admin, "Team", "team")
    for i in range(1, 8):
        await new_key(admin, f"key {i}", f"k-{i:02d}", team=team.name if i % 2 else "")
    await admin.stub.RevokeKey(apb.RevokeKeyRequest(name="keys/k-07"))

    async def all_pages(**request: Any) -> tuple[list[str], int]:
        names, pages, token = [], 0, ""
        while True:
            page = await admin.stub.ListKeys(apb.ListKeysRequest(page_size=3, page_token=token, **request))
            names += [k.name for k in page.keys]
            pages += 1
            token = page.next_page_token
            if not token:
                return names, pages

    names, pages = await all_pages()
    expected = ["keys/Ops_Key", "keys/k-01", "keys/k-02", "keys/k-03", "keys/k-03a", "keys/k-04", "keys/k-05"]
    assert names == [*expected, "keys/k-06"] and pages == 3
    names, _ = await all_pages(show_revoked=True)
    assert names == [*expected, "keys/k-06", "keys/k-07"]
    names, _ = await all_pages(team=team.name, show_revoked=True)
    assert names == ["keys/k-01", "keys/k-03", "keys/k-05", "keys/k-07"]
    page = await admin.stub.ListKeys(apb.ListKeysRequest())
    configured = {k.name: k.configured for k in page.keys}
    assert configured["keys/k-03a"] and configured["keys/Ops_Key"] and not configured["keys/k-01"]

    first = await admin.stub.ListKeys(apb.ListKeysRequest(page_size=2))
    other_query = await expect_error(
        admin.stub.ListKeys(apb.ListKeysRequest(page_size=2, page_token=first.next_page_token, show_revoked=True))
    )
    assert "another query" in violations(other_query)["page_token"]
    for token in ("not-a-token!", "eyJ4IjoxfQ", "x" * 600):
        assert "page_token" in violations(
            await expect_error(admin.stub.ListKeys(apb.ListKeysRequest(page_token=token)))
        )
    for size in (-1, 1001):
        assert "page_size" in violations(await expect_error(admin.stub.ListKeys(apb.ListKeysRequest(page_size=size))))
    await new_team(admin, "Team 2", "team-2")
    teams_token = (await admin.stub.ListTeams(apb.ListTeamsRequest(page_size=1))).next_page_token
    assert "page_token" in violations(
        await expect_error(admin.stub.ListKeys(apb.ListKeysRequest(page_token=teams_token)))
    )


async def test_update_key_with_field_masks(admin: Admin) -> None:
    await new_team(admin, "Team", "team")
    created = await new_key(
        admin,
        "before",
        "k",
        allowed_models=["gpt-*"],
        limits=apb.Limits(rpm=10, tpm=1000),
        budget=apb.Budget(limit_usd=5, period=apb.BUDGET_PERIOD_DAILY),
        expire_time=ts(datetime.now(UTC) + timedelta(days=1)),
    )
    admin.changes.clear()
    update = apb.Key(name="keys/k", display_name="after", team="teams/team", limits=apb.Limits(rpm=99))
    key = await admin.stub.UpdateKey(
        apb.UpdateKeyRequest(key=update, update_mask=mask("display_name", "team", "limits.rpm"))
    )
    assert key.display_name == "after" and key.team == "teams/team"
    assert key.limits.rpm == 99 and key.limits.tpm == 1000, "a subfield path changes only that subfield"
    assert list(key.allowed_models) == ["gpt-*"] and key.budget.limit_usd == 5, "fields outside the mask stay"
    assert key.secret_prefix == created.key.secret_prefix
    assert key.update_time.ToDatetime() >= created.key.update_time.ToDatetime()
    assert admin.changes == [("key", "k")]

    cleared = await admin.stub.UpdateKey(
        apb.UpdateKeyRequest(
            key=apb.Key(name="keys/k", disabled=True),
            update_mask=mask("team", "allowed_models", "limits.tpm", "budget", "expire_time", "disabled"),
        )
    )
    assert cleared.team == "" and list(cleared.allowed_models) == []
    assert cleared.limits.rpm == 99 and not cleared.limits.HasField("tpm")
    assert not cleared.HasField("budget") and not cleared.HasField("expire_time") and cleared.disabled
    no_limits = await admin.stub.UpdateKey(apb.UpdateKeyRequest(key=apb.Key(name="keys/k"), update_mask=mask("limits")))
    assert not no_limits.HasField("limits")
    assert await admin.stub.GetKey(apb.GetKeyRequest(name="keys/k")) == no_limits


async def test_update_mask_errors(admin: Admin) -> None:
    await new_key(admin, "k", "k")
    cases = {
        (): "update_mask",
        ("display_name", "colour"): "update_mask.paths[1]",
        ("create_time",): "update_mask.paths[0]",
        ("secret_prefix",): "update_mask.paths[0]",
        ("disabled", "disabled"): "update_mask.paths[1]",
        ("budget.limit_usd",): "update_mask.paths[0]",
        ("*",): "update_mask.paths[0]",
    }
    for paths, where in cases.items():
        request = apb.UpdateKeyRequest(key=apb.Key(name="keys/k", display_name="x"), update_mask=mask(*paths))
        found = violations(await expect_error(admin.stub.UpdateKey(request)))
        assert where in found, (paths, found)
    output_only = violations(
        await expect_error(
            admin.stub.UpdateKey(apb.UpdateKeyRequest(key=apb.Key(name="keys/k"), update_mask=mask("name")))
        )
    )
    assert "output only" in output_only["update_mask.paths[0]"]
    team_mask = violations(
        await expect_error(
            admin.stub.UpdateTeam(apb.UpdateTeamRequest(team=apb.Team(name="teams/t"), update_mask=mask("team")))
        )
    )
    assert "update_mask.paths[0]" in team_mask
    cleared_name = violations(
        await expect_error(
            admin.stub.UpdateKey(apb.UpdateKeyRequest(key=apb.Key(name="keys/k"), update_mask=mask("display_name")))
        )
    )
    assert "key.display_name" in cleared_name, "a display name cannot be cleared"


BAD_KEYS: list[tuple[dict[str, Any], str, str]] = [
    ({"budget": apb.Budget(limit_usd=-1, period=apb.BUDGET_PERIOD_DAILY)}, "key.budget.limit_usd", ">= 0"),
    ({"budget": apb.Budget(limit_usd=math.nan, period=apb.BUDGET_PERIOD_DAILY)}, "key.budget.limit_usd", "finite"),
    ({"budget": apb.Budget(limit_usd=math.inf, period=apb.BUDGET_PERIOD_DAILY)}, "key.budget.limit_usd", "finite"),
    ({"budget": apb.Budget(limit_usd=1e7, period=apb.BUDGET_PERIOD_DAILY)}, "key.budget.limit_usd", "at most"),
    ({"budget": apb.Budget(limit_usd=10)}, "key.budget.period", "required"),
    ({"budget": apb.Budget(limit_usd=10, period=42)}, "key.budget.period", "required"),  # type: ignore[arg-type]
    ({"allowed_models": ["gpt-*", "[z-a]"]}, "key.allowed_models[1]", "not a valid glob (empty range z-a"),
    ({"allowed_models": ["gpt-[4"]}, "key.allowed_models[0]", "not a valid glob (unclosed '['"),
    ({"allowed_models": [""]}, "key.allowed_models[0]", "empty"),
    ({"allowed_models": ["gpt\n4"]}, "key.allowed_models[0]", "control"),
    ({"allowed_models": ["m" * 257]}, "key.allowed_models[0]", "256"),
    ({"allowed_models": [f"m{i}" for i in range(65)]}, "key.allowed_models", "64"),
    ({"limits": apb.Limits(rpm=0)}, "key.limits.rpm", "between 1"),
    ({"limits": apb.Limits(tpm=-5)}, "key.limits.tpm", "between 1"),
    ({"limits": apb.Limits(max_concurrent_streams=2**31 + 1)}, "key.limits.max_concurrent_streams", "between 1"),
    ({"display_name": ""}, "key.display_name", "required"),
    ({"display_name": "   "}, "key.display_name", "required"),
    ({"display_name": "d" * 129}, "key.display_name", "128"),
    ({"team": "groups/x"}, "key.team", "teams/"),
    ({"team": "teams/Not_Valid"}, "key.team", "1-63"),
    ({"expire_time": ts(datetime(2020, 1, 1, tzinfo=UTC))}, "key.expire_time", "future"),
    ({"expire_time": timestamp_pb2.Timestamp(seconds=10**12)}, "key.expire_time", "valid timestamp"),
]


@pytest.mark.parametrize(("fields", "where", "says"), BAD_KEYS, ids=[c[1] + ":" + c[2] for c in BAD_KEYS])
async def test_create_key_bad_input(admin: Admin, fields: dict[str, Any], where: str, says: str) -> None:
    key = apb.Key(**{"display_name": "valid", **fields})
    found = violations(await expect_error(admin.stub.CreateKey(apb.CreateKeyRequest(key=key))))
    assert where in found and says in found[where], found
    listed = await admin.stub.ListKeys(apb.ListKeysRequest(show_revoked=True))
    assert all(k.configured for k in listed.keys), "nothing was created"


async def test_bad_input_lists_every_violation_and_bounds_echoes(admin: Admin) -> None:
    long = "x" * 10_000
    request = apb.CreateKeyRequest(
        key_id="Bad Id",
        key=apb.Key(display_name="", team="teams/" + long, budget=apb.Budget(limit_usd=-3), allowed_models=["gpt-[4"]),
    )
    error = await expect_error(admin.stub.CreateKey(request))
    found = violations(error)
    assert set(found) >= {"key_id", "key.display_name", "key.team", "key.budget.limit_usd", "key.budget.period"}
    assert set(found) >= {"key.allowed_models[0]"}
    assert all(len(d) < 300 for d in found.values()) and len(error.message) < 600
    for name in ("keys/UPPER", "teams/x", "keys/", "", "keys/" + long):
        get = violations(await expect_error(admin.stub.GetKey(apb.GetKeyRequest(name=name))))
        assert "name" in get and len(get["name"]) < 300
    team = violations(await expect_error(admin.stub.CreateTeam(apb.CreateTeamRequest(team_id="-x"))))
    assert {"team", "team_id", "team.display_name"} <= set(team)
    spend = violations(await expect_error(admin.stub.GetSpend(apb.GetSpendRequest(name="models/x"))))
    assert "name" in spend


async def test_not_found(admin: Admin) -> None:
    missing_key, missing_team = "keys/nope", "teams/nope"
    calls = [
        admin.stub.GetKey(apb.GetKeyRequest(name=missing_key)),
        admin.stub.UpdateKey(apb.UpdateKeyRequest(key=apb.Key(name=missing_key), update_mask=mask("disabled"))),
        admin.stub.RevokeKey(apb.RevokeKeyRequest(name=missing_key)),
        admin.stub.RotateKey(apb.RotateKeyRequest(name=missing_key)),
        admin.stub.GetSpend(apb.GetSpendRequest(name=missing_key)),
    ]
    for call in calls:
        error = await expect_error(call)
        assert (error.code, error.info.reason, error.info.metadata["name"]) == (
            grpc.StatusCode.NOT_FOUND,
            "RESOURCE_NOT_FOUND",
            missing_key,
        )
    calls = [
        admin.stub.GetTeam(apb.GetTeamRequest(name=missing_team)),
        admin.stub.UpdateTeam(apb.UpdateTeamRequest(team=apb.Team(name=missing_team), update_mask=mask("limits"))),
        admin.stub.DeleteTeam(apb.DeleteTeamRequest(name=missing_team)),
        admin.stub.GetSpend(apb.GetSpendRequest(name=missing_team)),
        admin.stub.CreateKey(apb.CreateKeyRequest(key=apb.Key(display_name="k", team=missing_team))),
    ]
    for call in calls:
        error = await expect_error(call)
        assert (error.code, error.info.reason, error.info.metadata["name"]) == (
            grpc.StatusCode.NOT_FOUND,
            "RESOURCE_NOT_FOUND",
            missing_team,
        )
    await new_key(admin, "k", "k")
    error = await expect_error(
        admin.stub.UpdateKey(
            apb.UpdateKeyRequest(key=apb.Key(name="keys/k", team=missing_team), update_mask=mask("team"))
        )
    )
    assert error.code == grpc.StatusCode.NOT_FOUND and error.info.metadata["name"] == missing_team


async def test_already_exists(admin: Admin) -> None:
    await new_key(admin, "taken", "k1")
    await new_key(admin, "other", "k2")
    await new_team(admin, "Team", "t1")
    await new_team(admin, "Team 2", "t2")
    cases = [
        (new_key(admin, "fresh", "k1"), "key_id"),
        (new_key(admin, "taken", "k3"), "display_name"),
        (new_key(admin, "fresh", "k-03a"), "key_id"),  # a configured key's id
        (new_key(admin, "YAML key", "k4"), "display_name"),  # a configured key's display name
        (new_team(admin, "Fresh", "t1"), "team_id"),
        (new_team(admin, "Team", "t3"), "display_name"),
        (
            admin.stub.UpdateKey(
                apb.UpdateKeyRequest(
                    key=apb.Key(name="keys/k2", display_name="taken"), update_mask=mask("display_name")
                )
            ),
            "display_name",
        ),
        (
            admin.stub.UpdateTeam(
                apb.UpdateTeamRequest(
                    team=apb.Team(name="teams/t2", display_name="Team"), update_mask=mask("display_name")
                )
            ),
            "display_name",
        ),
    ]
    for call, what in cases:
        error = await expect_error(call)
        assert (error.code, error.info.reason, error.info.metadata["field"]) == (
            grpc.StatusCode.ALREADY_EXISTS,
            "RESOURCE_ALREADY_EXISTS",
            what,
        )
    same = await admin.stub.UpdateKey(
        apb.UpdateKeyRequest(key=apb.Key(name="keys/k1", display_name="taken"), update_mask=mask("display_name"))
    )
    assert same.display_name == "taken", "keeping one's own display name is no conflict"


async def test_revoke_key(admin: Admin) -> None:
    await new_key(admin, "k", "k")
    admin.changes.clear()
    revoked = await admin.stub.RevokeKey(apb.RevokeKeyRequest(name="keys/k"))
    assert revoked.HasField("revoke_time")
    again = await admin.stub.RevokeKey(apb.RevokeKeyRequest(name="keys/k"))
    assert again.revoke_time == revoked.revoke_time, "revoking is idempotent"
    assert (await admin.stub.GetKey(apb.GetKeyRequest(name="keys/k"))).revoke_time == revoked.revoke_time
    assert admin.changes[0] == ("key", "k")
    stored = await admin.store.get_key("k")
    assert stored is not None and stored.revoke_time is not None
    for call in (
        admin.stub.UpdateKey(apb.UpdateKeyRequest(key=apb.Key(name="keys/k"), update_mask=mask("disabled"))),
        admin.stub.RotateKey(apb.RotateKeyRequest(name="keys/k")),
    ):
        error = await expect_error(call)
        assert (error.code, error.info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "KEY_REVOKED")


async def test_rotate_key_with_grace_period(admin: Admin) -> None:
    admin.clock.now = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    created = await new_key(admin, "k", "k")
    admin.changes.clear()
    rotated = await admin.stub.RotateKey(
        apb.RotateKeyRequest(name="keys/k", grace_period=duration_pb2.Duration(seconds=3600))
    )
    assert SECRET_RE.match(rotated.secret) and rotated.secret != created.secret
    assert rotated.key.secret_prefix == rotated.secret[:10]
    assert rotated.key.previous_secret_expire_time.ToDatetime(tzinfo=UTC) == admin.clock.now + timedelta(hours=1)
    assert admin.changes == [("key", "k")]
    by_old = await admin.store.find_key(hash_key(created.secret))
    by_new = await admin.store.find_key(hash_key(rotated.secret))
    assert by_old is not None and by_new is not None and by_old.id == by_new.id == "k"
    assert by_old.previous_secret_expire_time == admin.clock.now + timedelta(hours=1)

    admin.clock.now += timedelta(hours=2)  # the previous secret has stopped working: not shown
    assert not (await admin.stub.GetKey(apb.GetKeyRequest(name="keys/k"))).HasField("previous_secret_expire_time")
    at_once = await admin.stub.RotateKey(apb.RotateKeyRequest(name="keys/k"))
    assert not at_once.key.HasField("previous_secret_expire_time")
    assert await admin.store.find_key(hash_key(rotated.secret)) is None, "grace 0: the old secret stops at once"
    for grace in (duration_pb2.Duration(seconds=7 * 86400 + 1), duration_pb2.Duration(seconds=-1)):
        found = violations(
            await expect_error(admin.stub.RotateKey(apb.RotateKeyRequest(name="keys/k", grace_period=grace)))
        )
        assert "grace_period" in found


async def test_configured_keys_are_read_only(admin: Admin) -> None:
    key = await admin.stub.GetKey(apb.GetKeyRequest(name="keys/Ops_Key"))
    assert key.configured and key.display_name == "YAML ops key"
    for call in (
        admin.stub.UpdateKey(apb.UpdateKeyRequest(key=apb.Key(name="keys/k-03a"), update_mask=mask("disabled"))),
        admin.stub.RevokeKey(apb.RevokeKeyRequest(name="keys/k-03a")),
        admin.stub.RotateKey(apb.RotateKeyRequest(name="keys/Ops_Key")),
    ):
        error = await expect_error(call)
        assert (error.code, error.info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "KEY_READ_ONLY")
    assert admin.changes == []


# --- teams -------------------------------------------------------------------------------------


async def test_teams_crud_and_pagination(admin: Admin) -> None:
    created = await new_team(
        admin,
        "Research",
        "research",
        allowed_models=["*"],
        limits=apb.Limits(rpm=100, tpm=10_000),
        budget=apb.Budget(limit_usd=100, period=apb.BUDGET_PERIOD_WEEKLY),
    )
    assert created.name == "teams/research" and created.HasField("create_time")
    assert await admin.stub.GetTeam(apb.GetTeamRequest(name="teams/research")) == created
    for i in range(5):
        await new_team(admin, f"T{i}", f"t-{i}")
    names, token = [], ""
    while True:
        page = await admin.stub.ListTeams(apb.ListTeamsRequest(page_size=2, page_token=token))
        assert len(page.teams) <= 2
        names += [t.name for t in page.teams]
        token = page.next_page_token
        if not token:
            break
    assert names == ["teams/research", "teams/t-0", "teams/t-1", "teams/t-2", "teams/t-3", "teams/t-4"]

    updated = await admin.stub.UpdateTeam(
        apb.UpdateTeamRequest(
            team=apb.Team(name="teams/research", display_name="R&D", limits=apb.Limits()),
            update_mask=mask("display_name", "limits.tpm", "budget"),
        )
    )
    assert updated.display_name == "R&D" and updated.limits.rpm == 100 and not updated.limits.HasField("tpm")
    assert not updated.HasField("budget")
    assert admin.changes == [("team", "research")]

    await new_key(admin, "member", "member", team="teams/research")
    error = await expect_error(admin.stub.DeleteTeam(apb.DeleteTeamRequest(name="teams/research")))
    assert (error.code, error.info.reason, error.info.metadata["keys"]) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "TEAM_NOT_EMPTY",
        "1",
    )
    await admin.stub.RevokeKey(apb.RevokeKeyRequest(name="keys/member"))
    admin.changes.clear()
    await admin.stub.DeleteTeam(apb.DeleteTeamRequest(name="teams/research"))
    assert admin.changes == [("team", "research")]
    error = await expect_error(admin.stub.GetTeam(apb.GetTeamRequest(name="teams/research")))
    assert error.info.reason == "RESOURCE_NOT_FOUND"


# --- spend and usage ---------------------------------------------------------------------------


def usage(when: datetime, key: str, team: str = "", cost_usd: float = 0.0, **fields: Any) -> UsageRecord:
    return UsageRecord(
        time=when,
        request_id=f"r-{when.timestamp()}-{key}-{cost_usd}",
        key_id=key,
        team_id=team,
        cost_nano_usd=usd_to_nano(cost_usd),
        **fields,
    )


async def test_get_spend_periods(admin: Admin) -> None:
    now = datetime(2031, 3, 18, 15, 30, tzinfo=UTC)  # a Tuesday
    admin.clock.now = now
    await new_team(admin, "Team", "team", budget=apb.Budget(limit_usd=50, period=apb.BUDGET_PERIOD_WEEKLY))
    await new_key(
        admin,
        "monthly",
        "monthly",
        team="teams/team",
        budget=apb.Budget(limit_usd=10, period=apb.BUDGET_PERIOD_MONTHLY),
    )
    await new_key(admin, "daily", "daily", budget=apb.Budget(limit_usd=1, period=apb.BUDGET_PERIOD_DAILY))
    await new_key(admin, "lifetime", "lifetime", budget=apb.Budget(limit_usd=7, period=apb.BUDGET_PERIOD_TOTAL))
    await new_key(admin, "none", "none")
    await admin.store.write_usage(
        [
            usage(datetime(2031, 2, 27, tzinfo=UTC), "monthly", "team", 1.0),  # last month, last week
            usage(datetime(2031, 3, 1, tzinfo=UTC), "monthly", "team", 0.25),  # this month, not this week
            usage(datetime(2031, 3, 17, 0, 0, tzinfo=UTC), "monthly", "team", 0.5),  # this week (Monday 00:00)
            usage(datetime(2031, 3, 17, 23, 59, tzinfo=UTC), "daily", "", 0.125),  # yesterday
            usage(datetime(2031, 3, 18, 1, 0, tzinfo=UTC), "daily", "", 0.0625),  # today
            usage(datetime(2029, 1, 1, tzinfo=UTC), "lifetime", "", 2.0),
            usage(datetime(2031, 3, 18, tzinfo=UTC), "lifetime", "", 1.0),
            usage(datetime(2020, 1, 1, tzinfo=UTC), "none", "", 3.0),
        ]
    )
    admin.pending[("key", "monthly")] = usd_to_nano(0.001)  # this replica's calls not yet in the ledger

    monthly = await admin.stub.GetSpend(apb.GetSpendRequest(name="keys/monthly"))
    assert monthly.name == "keys/monthly" and monthly.spend_usd == pytest.approx(0.751)
    assert (monthly.limit_usd, monthly.period) == (10, apb.BUDGET_PERIOD_MONTHLY)
    assert monthly.period_start.ToDatetime(tzinfo=UTC) == datetime(2031, 3, 1, tzinfo=UTC)
    assert monthly.period_end.ToDatetime(tzinfo=UTC) == datetime(2031, 4, 1, tzinfo=UTC)

    team = await admin.stub.GetSpend(apb.GetSpendRequest(name="teams/team"))
    assert team.spend_usd == pytest.approx(0.5) and team.limit_usd == 50
    assert team.period_start.ToDatetime(tzinfo=UTC) == datetime(2031, 3, 17, tzinfo=UTC)
    assert team.period_end.ToDatetime(tzinfo=UTC) == datetime(2031, 3, 24, tzinfo=UTC)

    daily = await admin.stub.GetSpend(apb.GetSpendRequest(name="keys/daily"))
    assert daily.spend_usd == pytest.approx(0.0625)
    assert daily.period_start.ToDatetime(tzinfo=UTC) == datetime(2031, 3, 18, tzinfo=UTC)

    lifetime = await admin.stub.GetSpend(apb.GetSpendRequest(name="keys/lifetime"))
    assert lifetime.spend_usd == pytest.approx(3.0) and lifetime.period == apb.BUDGET_PERIOD_TOTAL
    assert lifetime.limit_usd == 7 and not lifetime.HasField("period_start") and not lifetime.HasField("period_end")

    none = await admin.stub.GetSpend(apb.GetSpendRequest(name="keys/none"))
    assert none.spend_usd == pytest.approx(3.0) and none.limit_usd == 0
    assert none.period == apb.BUDGET_PERIOD_UNSPECIFIED and not none.HasField("period_start")

    configured = await admin.stub.GetSpend(apb.GetSpendRequest(name="keys/Ops_Key"))
    assert configured.spend_usd == 0

    admin.clock.now = datetime(2031, 4, 1, tzinfo=UTC)  # the month starts over
    admin.pending.clear()
    assert (await admin.stub.GetSpend(apb.GetSpendRequest(name="keys/monthly"))).spend_usd == 0


async def test_query_usage_grouped_and_paged(admin: Admin) -> None:
    day1, day2 = datetime(2031, 6, 1, 10, tzinfo=UTC), datetime(2031, 6, 2, 10, tzinfo=UTC)
    records = [
        usage(day1, "a", "t", 0.01, model="gpt-4o", provider="openai", input_tokens=100, output_tokens=10),
        usage(day1, "a", "t", 0.02, model="gpt-4o", provider="openai", input_tokens=200, output_tokens=20),
        usage(day1, "b", "", 0.0, model="gpt-4o", provider="openai", cache_hit=True, saved_cost_nano_usd=5000),
        usage(day2, "a", "t", 0.04, model="claude", provider="anthropic", cached_input_tokens=7, reasoning_tokens=3),
        usage(
            day2, "b", "", 0.0, model="claude", provider="", status_code="RESOURCE_EXHAUSTED", reason="BUDGET_EXCEEDED"
        ),
        usage(day2, "b", "", 0.08, model="llama", provider="ollama", cache_write_tokens=11),
    ]
    await admin.store.write_usage(records)
    window: dict[str, Any] = {"start_time": ts(day1 - timedelta(hours=1)), "end_time": ts(day2 + timedelta(hours=1))}

    totals = await admin.stub.QueryUsage(apb.QueryUsageRequest(**window))
    assert len(totals.rows) == 1 and not totals.next_page_token
    row = totals.rows[0]
    assert (row.requests, row.errors, row.cache_hits) == (6, 1, 1)
    assert (row.input_tokens, row.output_tokens, row.cached_input_tokens, row.reasoning_tokens) == (300, 30, 7, 3)
    assert row.cache_write_tokens == 11
    assert row.cost_usd == pytest.approx(0.15) and row.saved_cost_usd == pytest.approx(5e-6)

    by_model_day = await admin.stub.QueryUsage(
        apb.QueryUsageRequest(group_by=[apb.USAGE_GROUP_BY_MODEL, apb.USAGE_GROUP_BY_DAY], **window)
    )
    got = [(r.model, r.day, r.requests, round(r.cost_usd, 6)) for r in by_model_day.rows]
    assert got == [
        ("claude", "2031-06-02", 2, 0.04),
        ("gpt-4o", "2031-06-01", 3, 0.03),
        ("llama", "2031-06-02", 1, 0.08),
    ]
    assert all(r.key == "" and r.provider == "" for r in by_model_day.rows)

    by_key = await admin.stub.QueryUsage(
        apb.QueryUsageRequest(group_by=[apb.USAGE_GROUP_BY_KEY, apb.USAGE_GROUP_BY_TEAM], **window)
    )
    assert [(r.key, r.team, r.requests) for r in by_key.rows] == [("keys/a", "teams/t", 3), ("keys/b", "", 3)]

    only_a = await admin.stub.QueryUsage(
        apb.QueryUsageRequest(filter=apb.UsageFilter(key="keys/a", model="gpt-4o"), **window)
    )
    assert only_a.rows[0].requests == 2
    day_one = await admin.stub.QueryUsage(
        apb.QueryUsageRequest(start_time=ts(day1), end_time=ts(day1 + timedelta(hours=1)))
    )
    assert day_one.rows[0].requests == 3, "start is inclusive, end exclusive"

    request = apb.QueryUsageRequest(group_by=[apb.USAGE_GROUP_BY_PROVIDER], page_size=2, **window)
    first = await admin.stub.QueryUsage(request)
    assert len(first.rows) == 2 and first.next_page_token
    request.page_token = first.next_page_token
    second = await admin.stub.QueryUsage(request)
    assert [r.provider for r in [*first.rows, *second.rows]] == ["", "anthropic", "ollama", "openai"]
    assert not second.next_page_token
    other = apb.QueryUsageRequest(
        group_by=[apb.USAGE_GROUP_BY_MODEL], page_size=2, page_token=first.next_page_token, **window
    )
    assert "page_token" in violations(await expect_error(admin.stub.QueryUsage(other)))

    # Without end_time, later pages count what the first page counted.
    admin.clock.now = day2 + timedelta(days=1)
    open_ended = apb.QueryUsageRequest(group_by=[apb.USAGE_GROUP_BY_PROVIDER], page_size=2)
    page1 = await admin.stub.QueryUsage(open_ended)
    await admin.store.write_usage([usage(admin.clock.now + timedelta(minutes=1), "c", "", 1.0, provider="zzz")])
    admin.clock.now += timedelta(hours=1)
    open_ended.page_token = page1.next_page_token
    page2 = await admin.stub.QueryUsage(open_ended)
    assert [r.provider for r in page2.rows] == ["ollama", "openai"] and not page2.next_page_token


async def test_query_usage_bad_input(admin: Admin) -> None:
    t0 = datetime(2031, 1, 1, tzinfo=UTC)
    cases: list[tuple[apb.QueryUsageRequest, str]] = [
        (apb.QueryUsageRequest(group_by=[apb.USAGE_GROUP_BY_MODEL, apb.USAGE_GROUP_BY_MODEL]), "group_by[1]"),
        (apb.QueryUsageRequest(group_by=[apb.USAGE_GROUP_BY_UNSPECIFIED]), "group_by[0]"),
        (apb.QueryUsageRequest(group_by=[99]), "group_by[0]"),  # type: ignore[list-item]
        (apb.QueryUsageRequest(start_time=ts(t0), end_time=ts(t0)), "end_time"),
        (apb.QueryUsageRequest(filter=apb.UsageFilter(key="teams/x")), "filter.key"),
        (apb.QueryUsageRequest(filter=apb.UsageFilter(team="keys/x")), "filter.team"),
        (apb.QueryUsageRequest(filter=apb.UsageFilter(model="m" * 300)), "filter.model"),
        (apb.QueryUsageRequest(page_size=5000), "page_size"),
        (apb.QueryUsageRequest(page_token="%%%"), "page_token"),
    ]
    for request, where in cases:
        assert where in violations(await expect_error(admin.stub.QueryUsage(request))), request


# --- auth, secrets, failures -------------------------------------------------------------------


async def test_admin_auth(admin: Admin, make_admin: AdminFactory) -> None:
    data_plane = (await new_key(admin, "client", "client")).secret
    cases = [
        ((), "UNAUTHENTICATED", "ADMIN_KEY_INVALID"),
        ((("authorization", "Bearer wrong-admin-key"),), "UNAUTHENTICATED", "ADMIN_KEY_INVALID"),
        ((("authorization", ADMIN_KEY),), "UNAUTHENTICATED", "ADMIN_KEY_INVALID"),  # no "Bearer"
        ((("authorization", f"Bearer {ADMIN_KEY}"), ("x-api-key", ADMIN_KEY)), "UNAUTHENTICATED", "ADMIN_KEY_INVALID"),
        ((("authorization", f"Bearer {data_plane}"),), "PERMISSION_DENIED", "NOT_AN_ADMIN_KEY"),
        ((("x-api-key", CONFIGURED_SECRET),), "PERMISSION_DENIED", "NOT_AN_ADMIN_KEY"),
    ]
    for metadata, code, reason in cases:
        error = await expect_error(admin.bare.ListTeams(apb.ListTeamsRequest(), metadata=metadata))
        assert (error.code.name, error.info.reason) == (code, reason), metadata
        assert ADMIN_KEY not in error.message and data_plane not in error.message
    assert await admin.bare.ListTeams(apb.ListTeamsRequest(), metadata=(("x-api-key", ADMIN_KEY),)) is not None

    unconfigured = await make_admin(digests=())
    error = await expect_error(unconfigured.stub.ListTeams(apb.ListTeamsRequest()))
    assert error.info.reason == "ADMIN_KEY_INVALID" and "LLM_GATEWAY_ADMIN_KEY" in error.message
    assert "no credential configured" in error.message

    standalone = await make_admin(chain=False)  # the auth layer as a gRPC interceptor by itself
    assert (await expect_error(standalone.bare.ListTeams(apb.ListTeamsRequest()))).info.reason == "ADMIN_KEY_INVALID"
    assert await standalone.stub.ListTeams(apb.ListTeamsRequest()) == apb.ListTeamsResponse()

    second = "second-admin-credential-0123"
    by_digest = await make_admin(digests=(hash_key(ADMIN_KEY).upper(), hash_key(second)))
    for credential in (ADMIN_KEY, second):
        await by_digest.bare.ListTeams(apb.ListTeamsRequest(), metadata=(("authorization", f"Bearer {credential}"),))


async def test_secrets_never_logged_or_echoed(admin: Admin, tmp_path: Path) -> None:
    log_file = tmp_path / "admin.log"
    configure_logging("debug", str(log_file))
    try:
        await new_team(admin, "Team", "team")
        created = await new_key(admin, "k", "k", team="teams/team")
        rotated = await admin.stub.RotateKey(
            apb.RotateKeyRequest(name="keys/k", grace_period=duration_pb2.Duration(seconds=60))
        )
        secrets = [created.secret, rotated.secret]
        responses: list[bytes] = [
            (await admin.stub.GetKey(apb.GetKeyRequest(name="keys/k"))).SerializeToString(),
            (await admin.stub.ListKeys(apb.ListKeysRequest(show_revoked=True))).SerializeToString(),
            (
                await admin.stub.UpdateKey(
                    apb.UpdateKeyRequest(
                        key=apb.Key(name="keys/k", display_name="k2"), update_mask=mask("display_name")
                    )
                )
            ).SerializeToString(),
            (await admin.stub.GetSpend(apb.GetSpendRequest(name="keys/k"))).SerializeToString(),
            (await admin.stub.RevokeKey(apb.RevokeKeyRequest(name="keys/k"))).SerializeToString(),
        ]
        errors = [
            await expect_error(admin.stub.RotateKey(apb.RotateKeyRequest(name="keys/k"))),
            await expect_error(admin.stub.DeleteTeam(apb.DeleteTeamRequest(name="teams/nope"))),
            await expect_error(
                admin.bare.GetKey(apb.GetKeyRequest(name="keys/k"), metadata=(("x-api-key", secrets[1]),))
            ),
        ]
        texts = [r.decode("utf-8", "replace") for r in responses]
        texts += [e.message + json.dumps(e.trailers) + str(e.info) for e in errors]
    finally:
        configure_logging("info")
    lines = log_file.read_text().splitlines()
    assert any(json.loads(line)["event"] == "admin_key_rotated" for line in lines), "the admin calls were logged"
    for secret in secrets:
        for text in [*texts, *lines]:
            assert secret not in text
            assert secret[10:30] not in text  # no part of it past the public prefix


async def test_on_change_failure_does_not_fail_the_call(make_admin: AdminFactory) -> None:
    async def broken(kind: str, resource_id: str | None) -> None:
        raise ConnectionError("redis is down")

    admin = await make_admin(on_change=broken)
    created = await new_key(admin, "k", "k")
    assert SECRET_RE.match(created.secret)
    assert (await admin.stub.RevokeKey(apb.RevokeKeyRequest(name="keys/k"))).HasField("revoke_time")


async def test_store_unavailable(make_admin: AdminFactory, store: Store, tmp_path: Path) -> None:
    assert isinstance(store, SqlStore)
    if store.dialect == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'no-such-directory' / 'gateway.db'}"
    else:
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test"  # nothing listens there
    dead = await open_store(url, StoreSettings(timeout_s=1), migrate=False)
    try:
        admin = await make_admin(store=dead)
        for call in (
            admin.stub.ListTeams(apb.ListTeamsRequest()),
            admin.stub.GetKey(apb.GetKeyRequest(name="keys/k")),
            admin.stub.CreateKey(apb.CreateKeyRequest(key=apb.Key(display_name="k"))),
            admin.stub.QueryUsage(apb.QueryUsageRequest()),
        ):
            error = await expect_error(call)
            assert (error.code, error.info.reason) == (grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE")
            assert error.retry is not None and "127.0.0.1" not in error.message
        configured = await admin.stub.GetKey(apb.GetKeyRequest(name="keys/k-03a"))
        assert configured.configured, "configured keys answer without the database"
    finally:
        await dead.aclose()


def test_service_name() -> None:
    assert ADMIN_SERVICE_NAME == "llm_gateway.admin.v1.AdminService"


# --- hostile requests (hypothesis) -------------------------------------------------------------


class ThreadedAdmin:
    """The admin API on a SQLite store in an event loop of its own thread, so that synchronous
    hypothesis examples can call it through a synchronous channel (see test_hostile_inputs.py)."""

    def __init__(self, directory: Path) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="admin-fuzz", daemon=True)
        self.thread.start()
        self.store, self.server, port = self._run(self._start(directory))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = apb_grpc.AdminServiceStub(self.channel)

    def _run(self, coro: Any) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _start(self, directory: Path) -> tuple[Store, grpc.aio.Server, int]:
        store = await open_store(resolve_database_url(f"sqlite:///{directory / 'fuzz.db'}", directory), StoreSettings())
        await store.create_team(TeamRecord(id="team", display_name="Team"))
        servicer = AdminServicer(store, configured_keys=CONFIGURED)
        server = grpc.aio.server(interceptors=[InterceptorChain([AdminAuthInterceptor([hash_key(ADMIN_KEY)])])])
        add_admin_service(server, servicer)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return store, server, port

    async def _stop(self) -> None:
        await self.server.stop(None)
        await self.store.aclose()

    def close(self) -> None:
        self.channel.close()
        self._run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def fuzz_admin(tmp_path_factory: pytest.TempPathFactory) -> Any:
    served = ThreadedAdmin(tmp_path_factory.mktemp("admin-fuzz"))
    yield served
    served.close()


_ODD_TEXT = st.sampled_from(
    ["", " ", "a", "keys/k", "teams/team", "keys/k-03a", "keys/Ops_Key", "x" * 129, "[z-a]", "gpt-[4", "\x00", "é"]
)
_TEXT = _ODD_TEXT | st.text(max_size=300)
_NAME = _ODD_TEXT | st.from_regex(r"\A(keys|teams)/[a-z0-9][a-z0-9-]{0,62}\Z") | st.text(max_size=80)
_INT64 = st.integers(-(2**63), 2**63 - 1)
_NUMBER = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e9, 1e7, 5e-324])


@st.composite
def hostile_limits(draw: Any) -> apb.Limits:
    limits = apb.Limits()
    for name in ("rpm", "tpm", "max_concurrent_streams"):
        if draw(st.booleans()):
            setattr(limits, name, draw(_INT64 | st.sampled_from([0, 1, 2**31, 2**31 + 1])))
    return limits


@st.composite
def hostile_key(draw: Any) -> apb.Key:
    key = apb.Key(
        name=draw(_NAME),
        display_name=draw(_TEXT),
        team=draw(_NAME),
        allowed_models=draw(st.lists(_TEXT, max_size=3) | st.lists(st.just("m*"), min_size=60, max_size=70)),
        disabled=draw(st.booleans()),
    )
    if draw(st.booleans()):
        key.limits.CopyFrom(draw(hostile_limits()))
    if draw(st.booleans()):
        key.budget.CopyFrom(apb.Budget(limit_usd=draw(_NUMBER), period=draw(st.integers(-3, 7))))
    if draw(st.booleans()):
        key.expire_time.CopyFrom(
            timestamp_pb2.Timestamp(seconds=draw(_INT64), nanos=draw(st.integers(-(2**31), 2**31 - 1)))
        )
    return key


_PATHS = st.lists(st.sampled_from(["display_name", "team", "limits.rpm", "budget", "expire_time", "name", "x"]))


def _answered(call: Callable[[], Any]) -> None:
    """The call succeeds or fails with a client error carrying a well-formed rich status."""
    try:
        call()
    except grpc.RpcError as error:
        rich = rich_error(error)  # type: ignore[arg-type]  # the sync error has the same accessors
        assert rich.code in {
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.ALREADY_EXISTS,
            grpc.StatusCode.FAILED_PRECONDITION,
        }, rich
        if rich.code == grpc.StatusCode.INVALID_ARGUMENT:
            assert rich.bad_request is not None and rich.bad_request.field_violations
            assert all(v.field and len(v.description) <= 256 for v in rich.bad_request.field_violations)
        assert len(rich.message.encode()) <= 512


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=hostile_key(), key_id=_TEXT | st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,62}\Z"), paths=_PATHS)
def test_hostile_key_requests(fuzz_admin: ThreadedAdmin, key: apb.Key, key_id: str, paths: list[str]) -> None:
    stub = fuzz_admin.stub
    _answered(lambda: stub.CreateKey(apb.CreateKeyRequest(key=key, key_id=key_id), metadata=ADMIN))
    _answered(lambda: stub.UpdateKey(apb.UpdateKeyRequest(key=key, update_mask=mask(*paths)), metadata=ADMIN))
    _answered(lambda: stub.GetKey(apb.GetKeyRequest(name=key.name), metadata=ADMIN))
    _answered(lambda: stub.GetSpend(apb.GetSpendRequest(name=key.team), metadata=ADMIN))
    team = apb.Team(name=key.team, display_name=key.display_name, allowed_models=key.allowed_models)
    team.limits.CopyFrom(key.limits)
    team.budget.CopyFrom(key.budget)
    _answered(lambda: stub.CreateTeam(apb.CreateTeamRequest(team=team, team_id=key_id), metadata=ADMIN))
    _answered(lambda: stub.UpdateTeam(apb.UpdateTeamRequest(team=team, update_mask=mask(*paths)), metadata=ADMIN))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    usage_filter=st.builds(apb.UsageFilter, key=_NAME, team=_NAME, model=_TEXT, provider=_TEXT),
    start=st.none() | _INT64,
    end=st.none() | _INT64,
    group_by=st.lists(st.integers(-2, 8), max_size=6),
    page_size=st.integers(-(2**31), 2**31 - 1),
    page_token=_TEXT | st.binary(max_size=200).map(lambda b: base64.urlsafe_b64encode(b).decode()),
    grace=st.integers(-(10**12), 10**12),
)
def test_hostile_queries(
    fuzz_admin: ThreadedAdmin,
    usage_filter: apb.UsageFilter,
    start: int | None,
    end: int | None,
    group_by: list[int],
    page_size: int,
    page_token: str,
    grace: int,
) -> None:
    stub = fuzz_admin.stub
    request = apb.QueryUsageRequest(filter=usage_filter, group_by=group_by, page_size=page_size, page_token=page_token)  # type: ignore[arg-type]
    if start is not None:
        request.start_time.seconds = start
    if end is not None:
        request.end_time.seconds = end
    _answered(lambda: stub.QueryUsage(request, metadata=ADMIN))
    _answered(
        lambda: stub.ListKeys(
            apb.ListKeysRequest(team=usage_filter.team, page_size=page_size, page_token=page_token), metadata=ADMIN
        )
    )
    _answered(lambda: stub.ListTeams(apb.ListTeamsRequest(page_size=page_size, page_token=page_token), metadata=ADMIN))
    _answered(
        lambda: stub.RotateKey(
            apb.RotateKeyRequest(name=usage_filter.key, grace_period=duration_pb2.Duration(seconds=grace)),
            metadata=ADMIN,
        )
    )

"""`llm-gateway-client admin …`: the gateway's control plane (`llm_gateway.admin.v1.AdminService`).

    export LLM_GATEWAY_ADMIN_KEY=…          # or --admin-key (visible to `ps`: prefer the variable)
    llm-gateway-client admin teams create --team-id search --display-name Search \
        --budget-usd 100 --budget-period monthly
    llm-gateway-client admin keys create --display-name ci --team search \
        --allowed-model 'gpt-4o*' --rpm 60 --expires-in 30d      # prints the secret, once
    llm-gateway-client admin keys list [--team search] [--show-revoked] [--page-size N] [--limit N]
    llm-gateway-client admin keys get keys/ID
    llm-gateway-client admin keys update keys/ID --tpm 20000 --disabled --clear budget
    llm-gateway-client admin keys rotate keys/ID --grace-period 1h
    llm-gateway-client admin keys revoke keys/ID
    llm-gateway-client admin teams list|get|update|delete …
    llm-gateway-client admin usage --group-by model,day --since 7d [--until 1d] [--key ID] [--team ID]
    llm-gateway-client admin spend keys/ID
    llm-gateway-client --target gw:443 --tls admin keys list --json

The target and TLS options are the CLI's global ones (`--target` / `LLM_GATEWAY_TARGET`, `--tls`,
`--tls-ca`, `--tls-cert`, `--tls-key`), given before `admin`. The admin options (`--admin-key`,
`--json`, `--timeout`) go after `admin` or after the subcommand. Names may be given as `keys/ID` /
`teams/ID` or as the bare id.

Output is an aligned table (or `field value` lines for one resource); `--json` prints one JSON
document (protobuf JSON with the proto field names: a list is its `List…Response` with every
page). `create` and `rotate` print the new secret once. Exit codes: 0 done, 1 the call failed
(status code, message, ErrorInfo reason and BadRequest violations on stderr), 2 a usage error.
The admin key is never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, TextIO

import grpc
from google.protobuf import json_format, message, timestamp_pb2

from llm_gateway.admin.v1 import admin_pb2 as pb

from .admin import DEFAULT_ADMIN_TIMEOUT_S, AdminCallError, AdminClient

ADMIN_KEY_ENV = "LLM_GATEWAY_ADMIN_KEY"
PERIODS = {
    "daily": pb.BUDGET_PERIOD_DAILY,
    "weekly": pb.BUDGET_PERIOD_WEEKLY,
    "monthly": pb.BUDGET_PERIOD_MONTHLY,
    "total": pb.BUDGET_PERIOD_TOTAL,
}
PERIOD_NAMES = {value: name for name, value in PERIODS.items()}
GROUP_BY = {
    "key": pb.USAGE_GROUP_BY_KEY,
    "team": pb.USAGE_GROUP_BY_TEAM,
    "model": pb.USAGE_GROUP_BY_MODEL,
    "provider": pb.USAGE_GROUP_BY_PROVIDER,
    "day": pb.USAGE_GROUP_BY_DAY,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(w|d|h|m|s)")
_DURATION_UNITS = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION_HELP = "e.g. 30s, 30m, 12h, 7d, 2w, 1h30m"
# `--clear` names (dashes or underscores) -> update_mask paths.
_CLEAR_ALIASES = {
    "models": "allowed_models",
    "rpm": "limits.rpm",
    "tpm": "limits.tpm",
    "max_concurrent_streams": "limits.max_concurrent_streams",
    "streams": "limits.max_concurrent_streams",
}
_LIMIT_PATHS = ["limits", "limits.rpm", "limits.tpm", "limits.max_concurrent_streams"]
_KEY_CLEARABLE = ["team", "allowed_models", *_LIMIT_PATHS, "budget", "expire_time"]
_TEAM_CLEARABLE = ["allowed_models", *_LIMIT_PATHS, "budget"]


# ---------------------------------------------------------------------------------------------
# Durations and times
# ---------------------------------------------------------------------------------------------


def parse_duration(text: str) -> timedelta:
    """A duration such as `30s`, `30m`, `12h`, `7d`, `2w`, `1.5h` or `1h30m` (units w, d, h, m, s;
    `0` alone is zero).

    Raises:
        ValueError: anything else (no unit, an unknown unit, a sign, an empty string).
    """
    compact = text.strip().lower()
    if compact == "0":
        return timedelta(0)
    seconds = 0.0
    position = 0
    for part in _DURATION_PART.finditer(compact):
        if part.start() != position:
            break
        seconds += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        position = part.end()
    if not compact or position != len(compact):
        raise ValueError(f"not a duration: {text!r} ({_DURATION_HELP})")
    return timedelta(seconds=seconds)


def parse_time(text: str) -> datetime:
    """An RFC 3339 time with its offset (`2025-06-01T12:00:00Z`, `…+02:00`), or a date
    (`2025-06-01`: 00:00 UTC); returned timezone-aware.

    Raises:
        ValueError: not such a time, or a time without an offset.
    """
    stripped = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", stripped):
            return datetime.combine(date.fromisoformat(stripped), datetime.min.time(), UTC)
        when = datetime.fromisoformat(stripped)
    except ValueError:
        raise ValueError(f"not an RFC 3339 time: {text!r} (e.g. 2025-06-01T12:00:00Z)") from None
    if when.tzinfo is None:
        raise ValueError(f"{text!r} has no UTC offset: add Z or +hh:mm")
    return when


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A point in time given as a duration before `now` (`7d`: seven days ago) or as for
    `parse_time`.

    Raises:
        ValueError: neither.
    """
    try:
        return (now or datetime.now(UTC)) - parse_duration(text)
    except ValueError:
        pass
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(f"not a duration ({_DURATION_HELP}) or an RFC 3339 time: {text!r}") from None


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` as an argparse `type`: its ValueError becomes a usage error (exit code 2)."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parse.__name__.removeprefix("parse_")  # argparse names the type in errors
    return convert


# ---------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    """The admin options, accepted after `admin` and after each subcommand (SUPPRESS: a later
    placement overrides an earlier one, an absent one changes nothing)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("admin options")
    group.add_argument(
        "--admin-key",
        default=argparse.SUPPRESS,
        metavar="KEY",
        help=f"admin credential (default: ${ADMIN_KEY_ENV}; prefer the variable, arguments show in `ps`)",
    )
    group.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    group.add_argument(
        "--timeout",
        dest="admin_timeout",
        type=float,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help=f"deadline per call (default: {DEFAULT_ADMIN_TIMEOUT_S:g})",
    )
    return common


def _add_model_limit_budget(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allowed-model",
        dest="allowed_models",
        action="append",
        default=None,
        metavar="GLOB",
        help="model name glob it may call (repeatable; none: every model; update replaces the list)",
    )
    parser.add_argument("--rpm", type=int, default=None, help="requests per minute")
    parser.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    parser.add_argument("--max-concurrent-streams", type=int, default=None, metavar="N", help="streams at once")
    parser.add_argument("--budget-usd", type=float, default=None, metavar="USD", help="budget per period")
    parser.add_argument("--budget-period", choices=list(PERIODS), default=None, help="with --budget-usd")


def _add_key_fields(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--display-name", default=None, help="a human name, unique among keys")
    parser.add_argument("--team", default=None, metavar="TEAM", help="teams/ID (or ID) of the key's team")
    _add_model_limit_budget(parser)
    expiry = parser.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expire-time", type=_argument_type(parse_time), default=None, metavar="TIME", help="RFC 3339 time"
    )
    expiry.add_argument(
        "--expires-in", type=_argument_type(parse_duration), default=None, metavar="DURATION", help="e.g. 30d"
    )
    state = parser.add_mutually_exclusive_group()
    state.add_argument(
        "--disabled", dest="disabled", action="store_const", const=True, default=None, help="refuse its calls"
    )
    state.add_argument("--enabled", dest="disabled", action="store_const", const=False, help="accept them again")


def _add_paging(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--page-size", type=int, default=0, metavar="N", help="items per call (default: server's)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="stop after N items")


def _leaf(
    commands: Any, name: str, common: argparse.ArgumentParser, handler: Callable[..., int], help_text: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(name, parents=[common], help=help_text)
    parser.set_defaults(admin_handler=handler, admin_parser=parser)
    return parser


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Adds `admin` and its subcommands to the CLI's subparsers (`commands`); returns it."""
    common = _common()
    admin: argparse.ArgumentParser = commands.add_parser(
        "admin",
        parents=[common],
        help="manage keys, teams, spend and usage (admin API)",
        description="The gateway's control plane. Target and TLS: the global options, before `admin`.",
    )
    groups = admin.add_subparsers(dest="admin_group", required=True, metavar="{keys,teams,usage,spend}")

    keys = groups.add_parser("keys", parents=[common], help="virtual keys")
    key_commands = keys.add_subparsers(dest="admin_action", required=True)
    create = _leaf(key_commands, "create", common, _key_create, "create a key (its secret is shown once)")
    create.add_argument("--key-id", default="", metavar="ID", help="its id (keys/ID); default: generated")
    _add_key_fields(create)
    listing = _leaf(key_commands, "list", common, _key_list, "list keys")
    listing.add_argument("--team", default="", metavar="TEAM", help="only this team's keys")
    listing.add_argument("--show-revoked", action="store_true", help="include revoked keys")
    _add_paging(listing)
    _leaf(key_commands, "get", common, _key_get, "show a key").add_argument("name", metavar="keys/ID")
    update = _leaf(key_commands, "update", common, _key_update, "change a key (only the options given)")
    update.add_argument("name", metavar="keys/ID")
    _add_key_fields(update)
    update.add_argument(
        "--clear", action="append", default=[], metavar="FIELD", help=f"clear a field: {', '.join(_KEY_CLEARABLE)}"
    )
    _leaf(key_commands, "revoke", common, _key_revoke, "revoke a key for good").add_argument("name", metavar="keys/ID")
    rotate = _leaf(key_commands, "rotate", common, _key_rotate, "issue a new secret (shown once)")
    rotate.add_argument("name", metavar="keys/ID")
    rotate.add_argument(
        "--grace-period",
        type=_argument_type(parse_duration),
        default=None,
        metavar="DURATION",
        help="how long the old secret keeps working (default: it stops at once)",
    )

    teams = groups.add_parser("teams", parents=[common], help="teams")
    team_commands = teams.add_subparsers(dest="admin_action", required=True)
    create = _leaf(team_commands, "create", common, _team_create, "create a team")
    create.add_argument("--team-id", default="", metavar="ID", help="its id (teams/ID); default: generated")
    create.add_argument("--display-name", default=None, help="a human name, unique among teams")
    _add_model_limit_budget(create)
    _add_paging(_leaf(team_commands, "list", common, _team_list, "list teams"))
    _leaf(team_commands, "get", common, _team_get, "show a team").add_argument("name", metavar="teams/ID")
    update = _leaf(team_commands, "update", common, _team_update, "change a team (only the options given)")
    update.add_argument("name", metavar="teams/ID")
    update.add_argument("--display-name", default=None)
    _add_model_limit_budget(update)
    update.add_argument(
        "--clear", action="append", default=[], metavar="FIELD", help=f"clear a field: {', '.join(_TEAM_CLEARABLE)}"
    )
    _leaf(team_commands, "delete", common, _team_delete, "delete a team (refused while it has keys)").add_argument(
        "name", metavar="teams/ID"
    )

    usage = _leaf(groups, "usage", common, _usage, "sums of the usage ledger")
    usage.add_argument(
        "--group-by",
        action="append",
        default=[],
        metavar="FIELDS",
        help=f"comma-separated, in order: {','.join(GROUP_BY)} (default: one row of totals)",
    )
    usage.add_argument(
        "--since",
        type=_argument_type(parse_since),
        default=None,
        metavar="WHEN",
        help="from this time, or this long ago (7d); default: the first record",
    )
    usage.add_argument(
        "--until", type=_argument_type(parse_since), default=None, metavar="WHEN", help="before this; default: now"
    )
    usage.add_argument("--key", default="", metavar="KEY", help="only this key's calls (keys/ID or ID)")
    usage.add_argument("--team", default="", metavar="TEAM", help="only this team's calls")
    usage.add_argument("--model", default="", help="only calls that asked for this model")
    usage.add_argument("--provider", default="", help="only calls this provider served")
    _add_paging(usage)

    _leaf(groups, "spend", common, _spend, "spend of a key or team in its budget period").add_argument(
        "name", metavar="keys/ID|teams/ID"
    )
    return admin


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


class _UsageError(Exception):
    """A usage error found after parsing (exit code 2)."""


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Runs a parsed `admin …` command line (global target/TLS options in `args`); returns the exit
    code: 0 done, 1 the call failed (details on `err`), 2 a usage error (through argparse)."""
    out = out or sys.stdout
    err = err or sys.stderr
    parser: argparse.ArgumentParser = args.admin_parser
    admin_key: str | None = getattr(args, "admin_key", None) or os.environ.get(ADMIN_KEY_ENV) or None
    timeout = getattr(args, "admin_timeout", None)
    if timeout is None:
        timeout = args.timeout if getattr(args, "timeout", None) is not None else DEFAULT_ADMIN_TIMEOUT_S
    if timeout <= 0:
        parser.error("--timeout must be > 0")
    try:
        client = AdminClient(
            args.target,
            admin_key=admin_key,
            timeout_s=timeout,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        parser.error(f"cannot read {error.filename}: {error.strerror}")
    with client:
        try:
            handler: Callable[[AdminClient, argparse.Namespace, _Output], int] = args.admin_handler
            return handler(client, args, _Output(out, bool(getattr(args, "json", False))))
        except _UsageError as error:
            parser.error(str(error))
        except AdminCallError as error:
            _print_error(error, admin_key, err)
            return 1
        except BrokenPipeError:  # `… | head`: the reader is gone; no traceback
            if out is sys.stdout:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1


def _print_error(error: AdminCallError, admin_key: str | None, err: TextIO) -> None:
    """Status code, reason, message, ErrorInfo metadata and BadRequest violations, on `err`."""
    lines = [f"error: {error.code.name}" + (f" {error.reason}" if error.reason else "") + f": {error.message}"]
    if error.metadata:
        lines.append("  " + " ".join(f"{k}={v}" for k, v in sorted(error.metadata.items())))
    lines.extend(f"  {field}: {description}" for field, description in error.violations)
    if error.code == grpc.StatusCode.UNAUTHENTICATED and not admin_key:
        lines.append(f"  (no admin key given: --admin-key or ${ADMIN_KEY_ENV})")
    text = "\n".join(lines)
    if admin_key:
        text = text.replace(admin_key, "[admin key]")  # whatever the server says, never echo it
    print(text, file=err)


class _Output:
    """Where a command prints, and how (table or JSON)."""

    def __init__(self, out: TextIO, as_json: bool) -> None:
        self.out = out
        self.json = as_json

    def document(self, value: message.Message) -> None:
        """`value` as one JSON document: the protobuf JSON mapping with the proto field names and
        unset scalars and lists included, fields in their proto order."""
        data = json_format.MessageToDict(
            value, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        print(json.dumps(_in_field_order(value.DESCRIPTOR, data), indent=2), file=self.out)

    def lines(self, text: str) -> None:
        """Text as it is."""
        print(text, file=self.out)


def _in_field_order(descriptor: Any, data: dict[str, Any]) -> dict[str, Any]:
    """`MessageToDict` output with its keys in field order (it appends defaults last);
    `descriptor`: the message's `Descriptor` (the upb or the Python one)."""
    ordered: dict[str, Any] = {}
    for field in descriptor.fields:
        if field.name not in data:
            continue
        item = data[field.name]
        if field.message_type is not None:  # well-known types are strings by now: left as they are
            if isinstance(item, dict):
                item = _in_field_order(field.message_type, item)
            elif isinstance(item, list):
                item = [_in_field_order(field.message_type, x) if isinstance(x, dict) else x for x in item]
        ordered[field.name] = item
    ordered.update((key, value) for key, value in data.items() if key not in ordered)
    return ordered


def _name(collection: str, text: str) -> str:
    """`keys/ID` from `keys/ID` or `ID` (likewise teams); empty stays empty."""
    return text if not text or "/" in text else f"{collection}/{text}"


def _limits_and_budget(args: argparse.Namespace, target: pb.Key | pb.Team) -> list[str]:
    """Copies the allowed-model, limit and budget options into `target`; the mask paths given."""
    paths: list[str] = []
    if args.allowed_models is not None:
        target.allowed_models.extend(args.allowed_models)
        paths.append("allowed_models")
    for option in ("rpm", "tpm", "max_concurrent_streams"):
        value = getattr(args, option)
        if value is not None:
            setattr(target.limits, option, value)
            paths.append(f"limits.{option}")
    if (args.budget_usd is None) != (args.budget_period is None):
        raise _UsageError("--budget-usd and --budget-period go together")
    if args.budget_usd is not None:
        target.budget.CopyFrom(pb.Budget(limit_usd=args.budget_usd, period=PERIODS[args.budget_period]))
        paths.append("budget")
    return paths


def _key_fields(args: argparse.Namespace, key: pb.Key) -> list[str]:
    """Copies the key options given into `key`; the mask paths given."""
    paths: list[str] = []
    if args.display_name is not None:
        key.display_name = args.display_name
        paths.append("display_name")
    if args.team is not None:
        key.team = _name("teams", args.team)
        paths.append("team")
    paths.extend(_limits_and_budget(args, key))
    expire_time = args.expire_time
    if args.expires_in is not None:
        expire_time = datetime.now(UTC) + args.expires_in
    if expire_time is not None:
        key.expire_time.FromDatetime(expire_time)
        paths.append("expire_time")
    if args.disabled is not None:
        key.disabled = args.disabled
        paths.append("disabled")
    return paths


def _mask(paths: list[str], clear: Sequence[str], clearable: Sequence[str]) -> list[str]:
    """The update mask: the paths set plus the `--clear` ones (checked against `clearable`)."""
    mask = list(paths)
    for text in clear:
        field = text.strip().replace("-", "_")
        field = _CLEAR_ALIASES.get(field, field)
        if field not in clearable:
            raise _UsageError(f"--clear {text}: not a field that can be cleared ({', '.join(clearable)})")
        if any(path == field or path.startswith(field + ".") for path in paths):
            raise _UsageError(f"--clear {text} together with a new value for it")
        if field not in mask:
            mask.append(field)
    if not mask:
        raise _UsageError("nothing to update: give the options to change (or --clear FIELD)")
    return mask


def _key_create(client: AdminClient, args: argparse.Namespace, output: _Output) -> int:
    key = pb.Key()
    _key_fields(args, key)
    created = client.create_key(key, args.key_id)
    _secret(output, created, created.key, created.secret)
    return 0


def _key_list(client: AdminClient, args: argparse.Namespace, output: _Output) -> int:
    keys = list(
        client.list_keys(
            _name("teams", args.team), show_revoked=args.show_revoked, page_size=args.page_size, limit=args.limit
        )
    )
    if output.json:
        output.document(pb.ListKeysResponse(keys=keys))
    else:
        output.lines(_key_table(keys))
    return 0


def _key_get(client: AdminClient, args: argparse.Namespace, output: _Output) -> int:
    _key(output, client.get_key(_name("keys", args.name)))
    return 0


def _key_update(client: AdminClient, args: argparse.Namespace, output: _Output) -> int:
    key = pb.Key(name=_name("keys", args.name))
    mask = _mask(_key_fields(args, key), args.clear, _KEY_CLEARABLE)
    _key(output, client.update_key(key, mask))
    return 0


def _key_revoke(client: AdminClient, args: argparse.Namespace, output: _Output) -> int:
    _key(output, client.revoke_key(_name("keys", args.name)))
    return 0


def _key_rotate(client: AdminClient, args: argparse.Namespace, output: _Output) -> int:
    rotated = client.rotate_key(_name("keys", args.name), args.grace_period)
    _secret(output, rotated, rotated.key, rotated.secret)
    return 0


def _team_from_args(args: argparse.Namespace, team: pb.Team) -> list[str]:
    paths: list[str] = []
    if args.display_name is not None:
        team.display_name = args.display_name
        paths.append("display_name")
    return paths + _limits_and_budget(args, team)


def _team_create(client: AdminClient, args: argparse.Namespace, output: _Output) -> int:
    team = pb.Team()
    _team_from_args(args, team)
    _team(output, client.create_team(team, args.team_id))
    return 0


def _team_list(client: AdminClient, args: argparse.Namespace, output: _Output) -> int:
    teams = list(client.list_teams(page_size=args.page_size, limit=args.limit))
    if output.json:
        output.document(pb.ListTeamsResponse(teams=teams))
    else:
        output.lines(_team_table(teams))
    return 0


def _team_get(client: AdminClient, args: argparse.Namespace, output: _Output) -> int:
    _team(output, client.get_team(_name("teams", args.name)))
    return 0


def _team_update(client: AdminClient, args: argparse.Namespace, output: _Output) -> int:
    team = pb.Team(name=_name("teams", args.name))
    mask = _mask(_team_from_args(args, team), args.clear, _TEAM_CLEARABLE)
    _team(output, client.update_team(team, mask))
    return 0


def _team_delete(client: AdminClient, args: argparse.Namespace, output: _Output) -> int:
    name = _name("teams", args.name)
    client.delete_team(name)
    if output.json:
        output.lines("{}")
    else:
        output.lines(f"deleted {name}")
    return 0


def _group_by(texts: Iterable[str]) -> list[str]:
    """`--group-by model,day --group-by key` → ["model", "day", "key"], checked."""
    fields: list[str] = []
    for text in texts:
        for field in filter(None, (part.strip().lower() for part in text.split(","))):
            if field not in GROUP_BY:
                raise _UsageError(f"--group-by {field}: not one of {','.join(GROUP_BY)}")
            if field in fields:
                raise _UsageError(f"--group-by {field}: given twice")
            fields.append(field)
    return fields


def _usage(client: AdminClient, args: argparse.Namespace, output: _Output) -> int:
    fields = _group_by(args.group_by)
    if args.since is not None and args.until is not None and args.since >= args.until:
        raise _UsageError("--since must be before --until")
    rows = list(
        client.query_usage(
            pb.UsageFilter(
                key=_name("keys", args.key), team=_name("teams", args.team), model=args.model, provider=args.provider
            ),
            start_time=args.since,
            end_time=args.until,
            group_by=[GROUP_BY[field] for field in fields],
            page_size=args.page_size,
            limit=args.limit,
        )
    )
    if output.json:
        output.document(pb.QueryUsageResponse(rows=rows))
    else:
        output.lines(_usage_table(fields, rows))
    return 0


def _spend(client: AdminClient, args: argparse.Namespace, output: _Output) -> int:
    if not args.name.startswith(("keys/", "teams/")):
        raise _UsageError(f"{args.name!r}: give keys/ID or teams/ID")
    spend = client.get_spend(args.name)
    if output.json:
        output.document(spend)
        return 0
    pairs = [("name", spend.name), ("spend", f"${_money(spend.spend_usd)}")]
    if spend.period == pb.BUDGET_PERIOD_UNSPECIFIED:
        pairs.append(("budget", "none (lifetime spend)"))
    else:
        used = f" ({spend.spend_usd / spend.limit_usd:.1%} used)" if spend.limit_usd > 0 else ""
        pairs.append(("budget", f"${_money(spend.limit_usd)} {PERIOD_NAMES.get(spend.period, '?')}{used}"))
        if spend.HasField("period_start"):
            pairs.append(("period", f"{_time(spend.period_start)} to {_time(spend.period_end)}"))
    output.lines(_details(pairs))
    return 0


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def _money(usd: float) -> str:
    """USD with at least 2 and at most 7 decimals (the ledger's resolution): 10.00, 0.0000123."""
    whole, _, decimals = f"{usd:.7f}".partition(".")
    return f"{whole}.{decimals.rstrip('0').ljust(2, '0')}"


def _time(stamp: timestamp_pb2.Timestamp, short: bool = False) -> str:
    when = stamp.ToDatetime(tzinfo=UTC)
    return when.strftime("%Y-%m-%d %H:%M" if short else "%Y-%m-%dT%H:%M:%SZ")


def _models(globs: Sequence[str]) -> str:
    return ",".join(globs) if globs else "*"


def _limits(limits: pb.Limits) -> str:
    parts = [
        f"{label}={getattr(limits, field)}"
        for field, label in (("rpm", "rpm"), ("tpm", "tpm"), ("max_concurrent_streams", "streams"))
        if limits.HasField(field)
    ]
    return " ".join(parts) or "-"


def _budget(owner: pb.Key | pb.Team) -> str:
    if not owner.HasField("budget"):
        return "-"
    return f"${_money(owner.budget.limit_usd)} {PERIOD_NAMES.get(owner.budget.period, '?')}"


def key_state(key: pb.Key, now: datetime | None = None) -> str:
    """`revoked`, `expired`, `disabled` or `active` (the first that applies)."""
    if key.HasField("revoke_time"):
        return "revoked"
    if key.HasField("expire_time") and key.expire_time.ToDatetime(tzinfo=UTC) <= (now or datetime.now(UTC)):
        return "expired"
    return "disabled" if key.disabled else "active"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> str:
    """An aligned table: two spaces between columns, the `right` columns right-aligned."""
    right = set(right)
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [cell.rjust(width) if i in right else cell.ljust(width) for i, (cell, width) in pairs]
        return "  ".join(cells).rstrip()

    return "\n".join(line(row) for row in [headers, *rows])


def _details(pairs: Sequence[tuple[str, str]]) -> str:
    """`field  value` lines, the values aligned."""
    width = max(len(label) for label, _ in pairs)
    return "\n".join(f"{label.ljust(width)}  {value}".rstrip() for label, value in pairs)


def _key_table(keys: Sequence[pb.Key]) -> str:
    headers = ["NAME", "DISPLAY NAME", "TEAM", "MODELS", "LIMITS", "BUDGET", "STATE", "CREATED"]
    rows = [
        [
            key.name,
            key.display_name,
            key.team or "-",
            _models(key.allowed_models),
            _limits(key.limits),
            _budget(key),
            key_state(key),
            _time(key.create_time, short=True) if key.HasField("create_time") else "-",
        ]
        for key in keys
    ]
    return _table(headers, rows) if rows else "no keys"


def _team_table(teams: Sequence[pb.Team]) -> str:
    headers = ["NAME", "DISPLAY NAME", "MODELS", "LIMITS", "BUDGET", "CREATED"]
    rows = [
        [
            team.name,
            team.display_name,
            _models(team.allowed_models),
            _limits(team.limits),
            _budget(team),
            _time(team.create_time, short=True) if team.HasField("create_time") else "-",
        ]
        for team in teams
    ]
    return _table(headers, rows) if rows else "no teams"


_USAGE_SUMS = [
    ("REQUESTS", "requests"),
    ("INPUT", "input_tokens"),
    ("OUTPUT", "output_tokens"),
    ("CACHED", "cached_input_tokens"),
    ("REASONING", "reasoning_tokens"),
    ("ERRORS", "errors"),
    ("CACHE HITS", "cache_hits"),
]


def _usage_table(fields: Sequence[str], rows: Sequence[pb.UsageRow]) -> str:
    if not rows:
        return "no usage"
    headers = [field.upper() for field in fields] + [label for label, _ in _USAGE_SUMS] + ["COST USD"]
    cells = [
        [getattr(row, field) or "-" for field in fields]
        + [str(getattr(row, attribute)) for _, attribute in _USAGE_SUMS]
        + [f"{row.cost_usd:.7f}"]
        for row in rows
    ]
    if len(rows) > 1 and fields:
        total = ["TOTAL"] + [""] * (len(fields) - 1)
        total += [str(sum(getattr(row, attribute) for row in rows)) for _, attribute in _USAGE_SUMS]
        cells.append([*total, f"{sum(row.cost_usd for row in rows):.7f}"])
    return _table(headers, cells, right=range(len(fields), len(headers)))


def _key_pairs(key: pb.Key) -> list[tuple[str, str]]:
    pairs = [
        ("name", key.name),
        ("display name", key.display_name),
        ("team", key.team or "-"),
        ("models", _models(key.allowed_models)),
        ("limits", _limits(key.limits)),
        ("budget", _budget(key)),
        ("state", key_state(key)),
        ("expires", _time(key.expire_time) if key.HasField("expire_time") else "never"),
        ("secret prefix", key.secret_prefix or "-"),
    ]
    for label, field in (
        ("previous secret until", "previous_secret_expire_time"),
        ("created", "create_time"),
        ("updated", "update_time"),
        ("revoked", "revoke_time"),
    ):
        if key.HasField(field):
            pairs.append((label, _time(getattr(key, field))))
    if key.configured:
        pairs.append(("configured", "yes (from the YAML file: read-only here)"))
    return pairs


def _key(output: _Output, key: pb.Key) -> None:
    if output.json:
        output.document(key)
    else:
        output.lines(_details(_key_pairs(key)))


def _team(output: _Output, team: pb.Team) -> None:
    if output.json:
        output.document(team)
        return
    pairs = [
        ("name", team.name),
        ("display name", team.display_name),
        ("models", _models(team.allowed_models)),
        ("limits", _limits(team.limits)),
        ("budget", _budget(team)),
    ]
    for label, field in (("created", "create_time"), ("updated", "update_time")):
        if team.HasField(field):
            pairs.append((label, _time(getattr(team, field))))
    output.lines(_details(pairs))


def _secret(output: _Output, response: message.Message, key: pb.Key, secret: str) -> None:
    """A created or rotated key with its secret, which the gateway will not show again."""
    if output.json:
        output.document(response)
        return
    output.lines(_details([*_key_pairs(key), ("secret", secret)]))
    output.lines("The secret is shown this once and will not be shown again: store it now.")

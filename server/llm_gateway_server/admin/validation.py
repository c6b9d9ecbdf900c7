"""Validation of admin requests, with field paths for `google.rpc.BadRequest`.

Every check appends a `FieldViolation` (e.g. `key.budget.limit_usd`, `update_mask.paths[1]`) to
a list, so a client sees every problem of a request at once; the servicer raises
INVALID_ARGUMENT / INVALID_REQUEST (`errors.invalid_request`) when the list is not empty. Every
value echoed in a description is clipped to `MAX_ECHO_CHARS`.

Page tokens are opaque to clients: URL-safe base64 (no padding) of a small JSON object holding
the cursor (the last id of the page, or the offset of the next row for QueryUsage) and a
fingerprint of the request's filters, so a token is refused (INVALID_ARGUMENT `page_token`) by
any other query than the one that issued it. A token is not a secret and not signed: all it can
change is where the next page starts.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import json
import math
import re
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2

from llm_gateway.admin.v1 import admin_pb2 as apb

from ..errors import FieldViolation
from ..tenancy.records import MAX_NANO_USD, NANO_PER_USD
from .convert import GROUP_BY_FROM_PROTO, PERIOD_FROM_PROTO

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_ECHO_CHARS = 128
MAX_DISPLAY_NAME_CHARS = 128
MAX_ALLOWED_MODELS = 64
MAX_GLOB_CHARS = 256
MAX_LIMIT = 2**31
# The largest budget a counter holds exactly (2^53 - 1 nano-USD, about 9 million USD; see
# tenancy.records): a larger one would be clamped silently.
MAX_BUDGET_USD = MAX_NANO_USD / NANO_PER_USD
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_TOKEN_CHARS = 512
MAX_FILTER_CHARS = 256
MAX_CONFIGURED_ID_CHARS = 128  # ApiKeySettings.id
MAX_GRACE_PERIOD_S = 7 * 24 * 3600
MAX_OFFSET = 10**9
# Timestamp's valid range (0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z).
_MIN_TIMESTAMP_S = -62_135_596_800
_MAX_TIMESTAMP_S = 253_402_300_799
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

KEY_MASK_PATHS = (
    "display_name",
    "team",
    "allowed_models",
    "limits",
    "limits.rpm",
    "limits.tpm",
    "limits.max_concurrent_streams",
    "budget",
    "expire_time",
    "disabled",
)
KEY_OUTPUT_ONLY = frozenset(
    {"name", "create_time", "update_time", "revoke_time", "secret_prefix", "previous_secret_expire_time", "configured"}
)
TEAM_MASK_PATHS = (
    "display_name",
    "allowed_models",
    "limits",
    "limits.rpm",
    "limits.tpm",
    "limits.max_concurrent_streams",
    "budget",
)
TEAM_OUTPUT_ONLY = frozenset({"name", "create_time", "update_time"})


def clip(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`value` cut to `limit` characters (an ellipsis marks the cut)."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def echo(value: str) -> str:
    """`value` quoted and clipped, for a violation description or a message."""
    return repr(clip(value))


def page_size(v: list[FieldViolation], value: int, path: str = "page_size") -> int:
    """The page size to use (0 → `DEFAULT_PAGE_SIZE`); a violation outside 0-1000."""
    if not 0 <= value <= MAX_PAGE_SIZE:
        v.append(FieldViolation(path, f"must be between 0 and {MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE}); got {value}"))
        return DEFAULT_PAGE_SIZE
    return value or DEFAULT_PAGE_SIZE


# --- names ---------------------------------------------------------------------------------------


def parse_name(
    v: list[FieldViolation],
    path: str,
    value: str,
    collection: str,
    *,
    required: bool = True,
    extra_ids: Collection[str] = (),
) -> str:
    """The id of a `keys/{id}` / `teams/{id}` name (`collection` is `KEYS` or `TEAMS`), or "" with
    a violation. Ids follow `ID_PATTERN`; `extra_ids` (the YAML file's key ids, which may be
    spelled otherwise) are accepted as they are. An empty value is "" without a violation when
    not `required`."""
    if not value:
        if required:
            v.append(FieldViolation(path, f"required: `{collection}{{id}}`"))
        return ""
    if not value.startswith(collection):
        v.append(FieldViolation(path, f"must be `{collection}{{id}}`; got {echo(value)}"))
        return ""
    resource_id = value[len(collection) :]
    if ID_PATTERN.match(resource_id) or resource_id in extra_ids:
        return resource_id
    v.append(
        FieldViolation(
            path, f"the id must be 1-63 characters of [a-z0-9-] starting with a letter or digit; got {echo(value)}"
        )
    )
    return ""


def check_new_id(v: list[FieldViolation], path: str, value: str) -> None:
    """A violation unless `value` is empty (generated) or follows `ID_PATTERN`."""
    if value and not ID_PATTERN.match(value):
        v.append(
            FieldViolation(path, f"1-63 characters of [a-z0-9-] starting with a letter or digit; got {echo(value)}")
        )


# --- fields --------------------------------------------------------------------------------------


def check_display_name(v: list[FieldViolation], path: str, value: str) -> None:
    """1-128 characters, not blank, no control characters (required wherever it is set)."""
    if not value.strip():
        v.append(FieldViolation(path, f"required: 1-{MAX_DISPLAY_NAME_CHARS} characters, not blank"))
    elif len(value) > MAX_DISPLAY_NAME_CHARS:
        v.append(FieldViolation(path, f"at most {MAX_DISPLAY_NAME_CHARS} characters; got {len(value)}"))
    elif _CONTROL.search(value):
        v.append(FieldViolation(path, "must not contain control characters"))


def glob_problem(glob: str) -> str | None:
    """Why `glob` is not a usable fnmatch pattern, or None. fnmatch itself never refuses one: it
    takes an unclosed `[` literally and makes a reversed range (`[z-a]`) match nothing, both
    silent mistakes in an allow-list, so both are refused here (a literal `[` is `[[]`); the
    translated pattern must also compile."""
    i, n = 0, len(glob)
    while i < n:
        if glob[i] != "[":
            i += 1
            continue
        j = i + 1  # the set's end, scanned as fnmatch does: a leading `!` and `]` belong to it
        if j < n and glob[j] == "!":
            j += 1
        if j < n and glob[j] == "]":
            j += 1
        while j < n and glob[j] != "]":
            j += 1
        if j >= n:
            return f"unclosed '[' at {i}; write '[[]' for a literal '['"
        members = glob[i + 1 : j].removeprefix("!")
        k = 0
        while k < len(members):
            if k + 2 < len(members) and members[k + 1] == "-":
                if members[k] > members[k + 2]:
                    return f"empty range {members[k]}-{members[k + 2]} matches nothing"
                k += 3
            else:
                k += 1
        i = j + 1
    try:
        re.compile(fnmatch.translate(glob))
    except re.error as error:
        return error.msg
    return None


def check_allowed_models(v: list[FieldViolation], path: str, globs: Sequence[str]) -> None:
    """At most 64 globs of 1-256 characters without control characters, each compiling as an
    fnmatch pattern."""
    if len(globs) > MAX_ALLOWED_MODELS:
        v.append(FieldViolation(path, f"at most {MAX_ALLOWED_MODELS} patterns; got {len(globs)}"))
        return
    for i, glob in enumerate(globs):
        where = f"{path}[{i}]"
        if not glob:
            v.append(FieldViolation(where, "must not be empty (an empty list allows every model)"))
        elif len(glob) > MAX_GLOB_CHARS:
            v.append(FieldViolation(where, f"at most {MAX_GLOB_CHARS} characters; got {len(glob)}"))
        elif _CONTROL.search(glob):
            v.append(FieldViolation(where, "must not contain control characters"))
        else:
            problem = glob_problem(glob)
            if problem is not None:
                v.append(FieldViolation(where, f"not a valid glob ({problem}): {echo(glob)}"))


def check_limit(v: list[FieldViolation], path: str, limits: apb.Limits, name: str) -> None:
    """A set limit is in [1, 2^31]."""
    if limits.HasField(name):
        value = getattr(limits, name)
        if not 1 <= value <= MAX_LIMIT:
            v.append(FieldViolation(f"{path}.{name}", f"must be between 1 and {MAX_LIMIT} when set; got {value}"))


def check_limits(v: list[FieldViolation], path: str, limits: apb.Limits) -> None:
    """Every set limit is in [1, 2^31]."""
    for name in ("rpm", "tpm", "max_concurrent_streams"):
        check_limit(v, path, limits, name)


def check_budget(v: list[FieldViolation], path: str, budget: apb.Budget) -> None:
    """`limit_usd` finite in [0, 1e9]; `period` one of DAILY, WEEKLY, MONTHLY, TOTAL."""
    limit = budget.limit_usd
    if not math.isfinite(limit):
        v.append(FieldViolation(f"{path}.limit_usd", "must be a finite number"))
    elif limit < 0:
        v.append(FieldViolation(f"{path}.limit_usd", f"must be >= 0; got {limit:g}"))
    elif limit > MAX_BUDGET_USD:
        v.append(FieldViolation(f"{path}.limit_usd", f"at most {MAX_BUDGET_USD:.0f} USD; got {limit:g}"))
    if budget.period not in PERIOD_FROM_PROTO:
        v.append(
            FieldViolation(
                f"{path}.period",
                "required with a budget: BUDGET_PERIOD_DAILY, _WEEKLY, _MONTHLY or _TOTAL"
                + ("" if budget.period == apb.BUDGET_PERIOD_UNSPECIFIED else f"; got {budget.period}"),
            )
        )


def check_timestamp(v: list[FieldViolation], path: str, value: timestamp_pb2.Timestamp) -> bool:
    """Whether `value` is a valid Timestamp (years 1-9999, nanos in [0, 1e9)); a violation if not."""
    if _MIN_TIMESTAMP_S <= value.seconds <= _MAX_TIMESTAMP_S and 0 <= value.nanos < 1_000_000_000:
        return True
    v.append(FieldViolation(path, "not a valid timestamp (years 1-9999, nanos in [0, 1e9))"))
    return False


def grace_period_s(v: list[FieldViolation], path: str, value: duration_pb2.Duration) -> float:
    """The grace period in seconds, 0 to 7 days; a violation (and 0) otherwise."""
    seconds, nanos = value.seconds, value.nanos
    valid = abs(nanos) < 1_000_000_000 and not (seconds > 0 > nanos or seconds < 0 < nanos)
    total = seconds + nanos / 1e9
    if not valid or not 0 <= total <= MAX_GRACE_PERIOD_S:
        v.append(FieldViolation(path, f"must be between 0 and {MAX_GRACE_PERIOD_S} seconds (7 days)"))
        return 0.0
    return total


def check_filter_text(v: list[FieldViolation], path: str, value: str) -> None:
    """At most 256 characters, no control characters (no ledger value has any)."""
    if len(value) > MAX_FILTER_CHARS:
        v.append(FieldViolation(path, f"at most {MAX_FILTER_CHARS} characters; got {len(value)}"))
    elif _CONTROL.search(value):
        v.append(FieldViolation(path, "must not contain control characters"))


def group_by(v: list[FieldViolation], values: Iterable[int]) -> list[int]:
    """The group-by values, each known, not UNSPECIFIED and not repeated; violations otherwise."""
    seen: set[int] = set()
    out: list[int] = []
    for i, value in enumerate(values):
        if value not in GROUP_BY_FROM_PROTO:
            v.append(
                FieldViolation(
                    f"group_by[{i}]", "must be USAGE_GROUP_BY_KEY, _TEAM, _MODEL, _PROVIDER or _DAY" + f"; got {value}"
                )
            )
        elif value in seen:
            v.append(FieldViolation(f"group_by[{i}]", f"repeated: {apb.UsageGroupBy.Name(value)}"))
        else:
            seen.add(value)
            out.append(value)
    return out


# --- update masks --------------------------------------------------------------------------------


def mask_paths(
    v: list[FieldViolation], mask: field_mask_pb2.FieldMask, allowed: Sequence[str], output_only: Collection[str]
) -> list[str]:
    """The valid, distinct paths of a required update mask; a violation (`update_mask` or
    `update_mask.paths[i]`) for an empty mask and for each unknown, output-only or repeated path."""
    if not mask.paths:
        v.append(FieldViolation("update_mask", f"required: the fields to change, of {', '.join(allowed)}"))
        return []
    out: list[str] = []
    for i, path in enumerate(mask.paths):
        where = f"update_mask.paths[{i}]"
        if path in out:
            v.append(FieldViolation(where, f"repeated path {echo(path)}"))
        elif path in allowed:
            out.append(path)
        elif path.split(".", 1)[0] in output_only:
            v.append(FieldViolation(where, f"{echo(path)} is output only"))
        else:
            v.append(FieldViolation(where, f"unknown or not updatable path {echo(path)}; one of {', '.join(allowed)}"))
    return out


# --- page tokens ---------------------------------------------------------------------------------


def fingerprint(*filters: object) -> str:
    """16 hex chars identifying a query's filters (what a page token is bound to)."""
    canonical = json.dumps(filters, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_page_token(query: str, cursor: dict[str, Any]) -> str:
    """An opaque page token for the query with fingerprint `query` and this cursor."""
    raw = json.dumps({"q": query, **cursor}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_page_token(v: list[FieldViolation], token: str, query: str) -> dict[str, Any] | None:
    """The cursor of a page token issued for `query` (None for an empty token); None with a
    `page_token` violation for a malformed token or one issued for another query."""
    if not token:
        return None
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        v.append(FieldViolation("page_token", f"at most {MAX_PAGE_TOKEN_CHARS} characters"))
        return None
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        decoded = None
    if not isinstance(decoded, dict) or not isinstance(decoded.get("q"), str):
        v.append(FieldViolation("page_token", "not a page token: pass a `next_page_token` as it was returned"))
        return None
    if decoded["q"] != query:
        v.append(
            FieldViolation("page_token", "issued for another query: keep the filters of the request that returned it")
        )
        return None
    return decoded


def cursor_after(v: list[FieldViolation], cursor: dict[str, Any] | None) -> str:
    """The last id of the previous page from a decoded token ("" for the first page)."""
    if cursor is None:
        return ""
    after = cursor.get("a")
    if not isinstance(after, str) or not 0 < len(after) <= MAX_CONFIGURED_ID_CHARS:
        v.append(FieldViolation("page_token", "not a page token: pass a `next_page_token` as it was returned"))
        return ""
    return after


def cursor_until(v: list[FieldViolation], cursor: dict[str, Any] | None) -> datetime | None:
    """The end of the time range a decoded QueryUsage token carries (aware UTC), or None."""
    if cursor is None:
        return None
    try:
        until = datetime.fromisoformat(str(cursor.get("e")))
        if until.tzinfo is None:
            raise ValueError("naive")
        return until.astimezone(UTC)
    except (ValueError, OverflowError):
        v.append(FieldViolation("page_token", "not a page token: pass a `next_page_token` as it was returned"))
        return None


def cursor_offset(v: list[FieldViolation], cursor: dict[str, Any] | None) -> int:
    """The offset of the next row from a decoded QueryUsage token (0 for the first page)."""
    if cursor is None:
        return 0
    offset = cursor.get("o")
    if not isinstance(offset, int) or isinstance(offset, bool) or not 0 < offset <= MAX_OFFSET:
        v.append(FieldViolation("page_token", "not a page token: pass a `next_page_token` as it was returned"))
        return 0
    return offset

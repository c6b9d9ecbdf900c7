"""protobuf (`llm_gateway.admin.v1`) ↔ control-plane records (`tenancy.records`).

Requests arrive validated (`admin.validation`): these functions do not check ranges. Money is
USD (double) on the wire and integer nano-USD in records; times are `Timestamp`s on the wire and
timezone-aware UTC `datetime`s in records. Resource names are `keys/{id}` / `teams/{id}` on the
wire and bare ids in records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import timestamp_pb2

from llm_gateway.admin.v1 import admin_pb2 as apb

from ..tenancy.records import (
    Budget,
    BudgetPeriod,
    KeyRecord,
    Limits,
    TeamRecord,
    UsageGroupBy,
    UsageRow,
    nano_to_usd,
    usd_to_nano,
)

KEYS = "keys/"
TEAMS = "teams/"

PERIOD_TO_PROTO: dict[BudgetPeriod, apb.BudgetPeriod] = {
    BudgetPeriod.DAILY: apb.BUDGET_PERIOD_DAILY,
    BudgetPeriod.WEEKLY: apb.BUDGET_PERIOD_WEEKLY,
    BudgetPeriod.MONTHLY: apb.BUDGET_PERIOD_MONTHLY,
    BudgetPeriod.TOTAL: apb.BUDGET_PERIOD_TOTAL,
}
PERIOD_FROM_PROTO: dict[int, BudgetPeriod] = {int(v): k for k, v in PERIOD_TO_PROTO.items()}

GROUP_BY_FROM_PROTO: dict[int, UsageGroupBy] = {
    apb.USAGE_GROUP_BY_KEY: UsageGroupBy.KEY,
    apb.USAGE_GROUP_BY_TEAM: UsageGroupBy.TEAM,
    apb.USAGE_GROUP_BY_MODEL: UsageGroupBy.MODEL,
    apb.USAGE_GROUP_BY_PROVIDER: UsageGroupBy.PROVIDER,
    apb.USAGE_GROUP_BY_DAY: UsageGroupBy.DAY,
}


# --- times ---------------------------------------------------------------------------------------


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """An aware datetime → Timestamp (naive datetimes are taken as UTC)."""
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value if value.tzinfo is not None else value.replace(tzinfo=UTC))
    return out


def from_timestamp(value: timestamp_pb2.Timestamp) -> datetime:
    """Timestamp → aware UTC datetime (microsecond precision; the value must be in range, see
    `validation.check_timestamp`)."""
    return value.ToDatetime(tzinfo=UTC)


def _set_time(target: timestamp_pb2.Timestamp, value: datetime | None) -> None:
    if value is not None:
        target.CopyFrom(timestamp(value))


# --- names ---------------------------------------------------------------------------------------


def key_name(key_id: str) -> str:
    """`keys/{id}`, or "" for an empty id."""
    return f"{KEYS}{key_id}" if key_id else ""


def team_name(team_id: str) -> str:
    """`teams/{id}`, or "" for an empty id."""
    return f"{TEAMS}{team_id}" if team_id else ""


# --- limits and budgets --------------------------------------------------------------------------


def limits_out(limits: Limits) -> apb.Limits | None:
    """Limits → proto; None when no field is set (the message stays unset)."""
    if limits.rpm is None and limits.tpm is None and limits.max_concurrent_streams is None:
        return None
    out = apb.Limits()
    if limits.rpm is not None:
        out.rpm = limits.rpm
    if limits.tpm is not None:
        out.tpm = limits.tpm
    if limits.max_concurrent_streams is not None:
        out.max_concurrent_streams = limits.max_concurrent_streams
    return out


def limits_in(limits: apb.Limits) -> Limits:
    """proto → Limits (unset optional fields → None)."""
    return Limits(
        rpm=limits.rpm if limits.HasField("rpm") else None,
        tpm=limits.tpm if limits.HasField("tpm") else None,
        max_concurrent_streams=limits.max_concurrent_streams if limits.HasField("max_concurrent_streams") else None,
    )


def budget_out(budget: Budget) -> apb.Budget:
    """Budget (nano-USD) → proto (USD)."""
    return apb.Budget(limit_usd=nano_to_usd(budget.limit_nano_usd), period=PERIOD_TO_PROTO[budget.period])


def budget_in(budget: apb.Budget) -> Budget:
    """proto (USD, validated) → Budget (nano-USD, rounded to the nearest)."""
    return Budget(limit_nano_usd=usd_to_nano(budget.limit_usd), period=PERIOD_FROM_PROTO[budget.period])


# --- keys and teams ------------------------------------------------------------------------------


def key_out(record: KeyRecord, now: datetime) -> apb.Key:
    """KeyRecord → Key. `previous_secret_expire_time` is set only while the previous secret still
    works at `now`. The record's secret digest is never copied."""
    out = apb.Key(
        name=record.name,
        display_name=record.display_name,
        team=record.team_name,
        allowed_models=list(record.allowed_models),
        disabled=record.disabled,
        secret_prefix=record.secret_prefix,
        configured=record.configured,
    )
    limits = limits_out(record.limits)
    if limits is not None:
        out.limits.CopyFrom(limits)
    if record.budget is not None:
        out.budget.CopyFrom(budget_out(record.budget))
    _set_time(out.expire_time, record.expire_time)
    _set_time(out.create_time, record.create_time)
    _set_time(out.update_time, record.update_time)
    _set_time(out.revoke_time, record.revoke_time)
    previous = record.previous_secret_expire_time
    if record.previous_secret_sha256 and previous is not None and previous > now:
        _set_time(out.previous_secret_expire_time, previous)
    return out


def team_out(record: TeamRecord) -> apb.Team:
    """TeamRecord → Team."""
    out = apb.Team(name=record.name, display_name=record.display_name, allowed_models=list(record.allowed_models))
    limits = limits_out(record.limits)
    if limits is not None:
        out.limits.CopyFrom(limits)
    if record.budget is not None:
        out.budget.CopyFrom(budget_out(record.budget))
    _set_time(out.create_time, record.create_time)
    _set_time(out.update_time, record.update_time)
    return out


def team_in(team_id: str, team: apb.Team) -> TeamRecord:
    """A validated CreateTeam `team` → TeamRecord with id `team_id` (output-only fields ignored)."""
    return TeamRecord(
        id=team_id,
        display_name=team.display_name,
        allowed_models=tuple(team.allowed_models),
        limits=limits_in(team.limits),
        budget=budget_in(team.budget) if team.HasField("budget") else None,
    )


def _masked_limits(current: Limits, limits: apb.Limits, path: str) -> Limits:
    """`current` with the limit `path` names (`limits` or `limits.<field>`) taken from `limits`."""
    if path == "limits":
        return limits_in(limits)
    name = path.removeprefix("limits.")
    value = getattr(limits, name) if limits.HasField(name) else None
    return dataclasses.replace(current, **{name: value})


def _masked_common(record: Any, message: apb.Key | apb.Team, path: str, changes: dict[str, Any]) -> None:
    """The change `path` makes to a key's or team's shared fields, into `changes`."""
    if path == "display_name":
        changes["display_name"] = message.display_name
    elif path == "allowed_models":
        changes["allowed_models"] = tuple(message.allowed_models)
    elif path.startswith("limits"):
        changes["limits"] = _masked_limits(changes.get("limits", record.limits), message.limits, path)
    elif path == "budget":
        changes["budget"] = budget_in(message.budget) if message.HasField("budget") else None


def key_with_mask(record: KeyRecord, key: apb.Key, paths: Sequence[str]) -> KeyRecord:
    """`record` with the validated mask `paths` taken from `key`; a path whose field is unset in
    `key` clears it (no team, every model, default limits, no budget, no expiry, enabled)."""
    changes: dict[str, Any] = {}
    for path in paths:
        if path == "team":
            changes["team_id"] = key.team.removeprefix(TEAMS)
        elif path == "expire_time":
            changes["expire_time"] = from_timestamp(key.expire_time) if key.HasField("expire_time") else None
        elif path == "disabled":
            changes["disabled"] = key.disabled
        else:
            _masked_common(record, key, path, changes)
    return dataclasses.replace(record, **changes)


def team_with_mask(record: TeamRecord, team: apb.Team, paths: Sequence[str]) -> TeamRecord:
    """`record` with the validated mask `paths` taken from `team` (unset fields clear, as for keys)."""
    changes: dict[str, Any] = {}
    for path in paths:
        _masked_common(record, team, path, changes)
    return dataclasses.replace(record, **changes)


# --- usage ---------------------------------------------------------------------------------------


def usage_row_out(row: UsageRow) -> apb.UsageRow:
    """UsageRow (ids, nano-USD) → proto (names, USD)."""
    return apb.UsageRow(
        key=key_name(row.key_id),
        team=team_name(row.team_id),
        model=row.model,
        provider=row.provider,
        day=row.day,
        requests=row.requests,
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        cached_input_tokens=row.cached_input_tokens,
        reasoning_tokens=row.reasoning_tokens,
        cost_usd=nano_to_usd(row.cost_nano_usd),
        errors=row.errors,
        cache_hits=row.cache_hits,
        cache_write_tokens=row.cache_write_tokens,
        saved_cost_usd=nano_to_usd(row.saved_cost_nano_usd),
    )

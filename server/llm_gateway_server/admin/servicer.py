"""The `llm_gateway.admin.v1.AdminService` servicer: keys, teams, spend and usage on a `Store`.

Every RPC validates its request first (INVALID_ARGUMENT / INVALID_REQUEST with every BadRequest
field violation, `admin.validation`), then reads or changes the store. Failures a client can see:

- NOT_FOUND / RESOURCE_NOT_FOUND: no key or team of that name (also the team a key names);
- ALREADY_EXISTS / RESOURCE_ALREADY_EXISTS: a taken id or display name (configured keys' included);
- FAILED_PRECONDITION / KEY_READ_ONLY: changing a key from the YAML file; KEY_REVOKED: updating
  or rotating a revoked key; TEAM_NOT_EMPTY: deleting a team that still has keys;
- UNAVAILABLE / STORE_UNAVAILABLE: the database did not answer within its timeout;
- INTERNAL / INTERNAL_ERROR: a bug (logged with its traceback; the request id only on the wire).

Secrets: CreateKey and RotateKey generate them (`admin.secrets`) and return them once; the store
keeps only their SHA-256. No log line, other response or error carries one.

After every successful change the servicer awaits `on_change(kind, id)` so the data plane drops
what it cached: `("created", key_id)` for a new key, `("key", key_id)` after UpdateKey,
RevokeKey or RotateKey, `("team", team_id)` after UpdateTeam or DeleteTeam (the team's keys
change). A failing `on_change` is logged and does not fail the call: the change is stored, and the
key cache's TTL bounds how long a replica can miss it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import empty_pb2

from llm_gateway.admin.v1 import admin_pb2 as apb
from llm_gateway.admin.v1 import admin_pb2_grpc as apb_grpc

from ..errors import (
    FieldViolation,
    GatewayError,
    internal_error,
    invalid_request,
    key_read_only,
    key_revoked_precondition,
    resource_already_exists,
    resource_not_found,
    store_unavailable,
    team_not_empty,
)
from ..store.base import (
    AlreadyExistsError,
    NotFoundError,
    ScopeKind,
    Store,
    StoreUnavailableError,
    TeamNotEmptyError,
)
from ..tenancy.records import KeyRecord, TeamRecord, UsageQuery, nano_to_usd
from ..transport.call_record import CallRecord, current_call, request_id_from
from ..transport.status import abort
from . import convert
from . import validation as val
from .convert import KEYS, TEAMS
from .secrets import new_resource_id, new_secret

ADMIN_SERVICE_NAME: str = apb.DESCRIPTOR.services_by_name["AdminService"].full_name
ADMIN_METHOD_PREFIX = f"/{ADMIN_SERVICE_NAME}/"
# Tries at a generated id before giving up (60 random bits: a second try is already unheard of).
_ID_ATTEMPTS = 3

OnChange = Callable[[str, str | None], Awaitable[None]]
"""`(kind, id)` awaited after a change: kind "created" / "key" / "team"."""
PendingSpend = Callable[[ScopeKind, str, datetime | None], int | Awaitable[int]]
"""`(kind, id, since)` → nano-USD of this replica's calls not yet written to the ledger, at or
after `since` (None: ever); plain or async."""
Clock = Callable[[], datetime]

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext[Any, Any]], Awaitable[Response]]


def _log() -> Any:
    """The admin logger, looked up per call (admin calls are rare), so it always writes where
    logging is configured now."""
    return structlog.get_logger("llm_gateway.admin")


def _utcnow() -> datetime:
    return datetime.now(UTC)


async def _nothing_changed(kind: str, resource_id: str | None) -> None:
    """The default `on_change`: nothing to invalidate."""


def _no_pending(kind: ScopeKind, scope_id: str, since: datetime | None) -> int:
    """The default `pending_spend`: no ledger writer in this process."""
    return 0


def _rpc(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    """Wraps a unary handler: the request id (the call record's, else `x-request-id` or a new
    one) in the trailers, `GatewayError` → its rich status, `StoreUnavailableError` →
    UNAVAILABLE / STORE_UNAVAILABLE, anything else → logged, INTERNAL with the request id."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: grpc.aio.ServicerContext[Any, Any]) -> Response:
        record = current_call.get()
        if record is None:  # served without the observability interceptor (it sets the record)
            record = CallRecord(request_id_from(context.invocation_metadata()), handler.__name__, context.peer() or "")
            current_call.set(record)
        request_id = record.request_id
        context.set_trailing_metadata((("x-request-id", request_id),))
        try:
            return await handler(self, request, context)
        except GatewayError as error:
            await abort(context, error, request_id)
        except StoreUnavailableError as exc:  # its message names the database without a password
            _log().warning("admin_store_unavailable", method=handler.__name__, request_id=request_id, detail=str(exc))
            await abort(context, store_unavailable(), request_id)
        except Exception as exc:  # noqa: BLE001 - the one place that answers every failure
            _log().error("admin_rpc_bug", method=handler.__name__, request_id=request_id, exc_info=exc)
            await abort(context, internal_error(request_id), request_id)

    return wrapper


def _raise_if(violations: list[FieldViolation]) -> None:
    if violations:
        raise invalid_request(violations)


def _taken(error: AlreadyExistsError, name: str, id_field: str) -> GatewayError:
    """ALREADY_EXISTS for a store conflict on `name` (`id_field`: "key_id" / "team_id")."""
    if error.field == "id":
        return resource_already_exists(name, id_field, val.clip(error.value))
    if error.field == "display_name":
        return resource_already_exists("", "display_name", val.clip(error.value))
    # a secret digest collision (2^-256): never echo the digest
    return resource_already_exists("", "secret", "[redacted]")


class AdminServicer(apb_grpc.AdminServiceServicer):  # type: ignore[misc]  # generated base is untyped
    """gRPC servicer for `llm_gateway.admin.v1.AdminService` (see the module docstring).

    Args:
        store: keys, teams and the usage ledger.
        configured_keys: the YAML file's keys (`configured=True`): listed and readable, changed
            only in the file; their ids and display names are taken.
        on_change: awaited after every change (see the module docstring); default: nothing.
        pending_spend: this replica's spend not yet in the ledger, for GetSpend; default: 0.
        spend: when given, GetSpend's whole answer (nano-USD of a scope since a time: the ledger
            writer's `spend`, which reads the store and its own buffer under one lock, so no
            batch is missed or counted twice) instead of `store.spend` + `pending_spend`.
        clock: the current UTC time (budget periods, expiry checks, revoke and grace times).
        quota_guard: when set, the error that refuses any change leaving a key or team with
            rate limits or a budget (the gateway cannot enforce them exactly: `--workers` > 1
            without Redis); None: allowed.
    """

    def __init__(
        self,
        store: Store,
        *,
        configured_keys: Sequence[KeyRecord] = (),
        on_change: OnChange | None = None,
        pending_spend: PendingSpend | None = None,
        spend: Callable[[ScopeKind, str, datetime | None], Awaitable[int]] | None = None,
        clock: Clock | None = None,
        quota_guard: GatewayError | None = None,
    ) -> None:
        self._store = store
        self._configured = {k.id: dataclasses.replace(k, configured=True) for k in configured_keys}
        self._configured_sorted = sorted(self._configured.values(), key=lambda k: k.id)
        self._configured_names = {k.display_name: k for k in self._configured.values()}
        self._on_change = on_change or _nothing_changed
        self._pending = pending_spend or _no_pending
        self._spend = spend
        self._clock = clock or _utcnow
        self._quota_guard = quota_guard

    def _guard(self, record: KeyRecord | TeamRecord) -> None:
        """Raises the quota guard's error when `record` has limits or a budget."""
        limits = record.limits
        has_quota = record.budget is not None or any(
            v is not None for v in (limits.rpm, limits.tpm, limits.max_concurrent_streams)
        )
        if has_quota and self._quota_guard is not None:
            raise self._quota_guard

    # --- shared steps ----------------------------------------------------------------------------

    async def _changed(self, kind: str, resource_id: str, request_id: str) -> None:
        try:
            await self._on_change(kind, resource_id)
        except Exception as exc:  # noqa: BLE001 - the change is stored; the cache TTL bounds staleness
            _log().warning(
                "admin_invalidation_failed", kind=kind, id=resource_id, request_id=request_id, error=repr(exc)
            )

    @staticmethod
    def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """The call's request id (`_rpc` sets the call record)."""
        record = current_call.get()
        return record.request_id if record is not None else ""

    async def _key(self, key_id: str) -> KeyRecord:
        """The key (configured or stored), or NOT_FOUND."""
        record = self._configured.get(key_id) or await self._store.get_key(key_id)
        if record is None:
            raise resource_not_found(convert.key_name(key_id))
        return record

    async def _mutable_key(self, key_id: str) -> KeyRecord:
        """The stored key, refusing configured (KEY_READ_ONLY) and revoked (KEY_REVOKED) ones."""
        if key_id in self._configured:
            raise key_read_only(convert.key_name(key_id))
        record = await self._key(key_id)
        if record.revoke_time is not None:
            raise key_revoked_precondition(record.name)
        return record

    async def _team(self, team_id: str) -> TeamRecord:
        """The team, or NOT_FOUND."""
        record = await self._store.get_team(team_id)
        if record is None:
            raise resource_not_found(convert.team_name(team_id))
        return record

    def _display_name_free(self, display_name: str, key_id: str) -> None:
        """ALREADY_EXISTS when a configured key (other than `key_id`) has this display name."""
        holder = self._configured_names.get(display_name)
        if holder is not None and holder.id != key_id:
            raise resource_already_exists(holder.name, "display_name", val.clip(display_name))

    async def _update_key(self, record: KeyRecord) -> KeyRecord:
        self._guard(record)
        try:
            return await self._store.update_key(record)
        except NotFoundError:
            if await self._store.get_key(record.id) is None:
                raise resource_not_found(record.name) from None
            raise resource_not_found(record.team_name) from None
        except AlreadyExistsError as error:
            raise _taken(error, record.name, "key_id") from None

    # --- keys --------------------------------------------------------------------------------------

    @_rpc
    async def CreateKey(
        self, request: apb.CreateKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.CreateKeyResponse:
        """Creates a key with a new secret (returned here only)."""
        now = self._clock()
        v: list[FieldViolation] = []
        key = request.key
        val.check_new_id(v, "key_id", request.key_id)
        if not request.HasField("key"):
            v.append(FieldViolation("key", "required"))
        val.check_display_name(v, "key.display_name", key.display_name)
        team_id = val.parse_name(v, "key.team", key.team, TEAMS, required=False)
        val.check_allowed_models(v, "key.allowed_models", key.allowed_models)
        val.check_limits(v, "key.limits", key.limits)
        if key.HasField("budget"):
            val.check_budget(v, "key.budget", key.budget)
        expire_time = None
        if key.HasField("expire_time") and val.check_timestamp(v, "key.expire_time", key.expire_time):
            expire_time = convert.from_timestamp(key.expire_time)
            if expire_time <= now:
                v.append(FieldViolation("key.expire_time", "must be in the future"))
        _raise_if(v)

        if request.key_id in self._configured:
            raise resource_already_exists(convert.key_name(request.key_id), "key_id", request.key_id)
        self._display_name_free(key.display_name, "")
        if team_id:
            await self._team(team_id)
        secret = new_secret()
        stored: KeyRecord | None = None
        for _ in range(1 if request.key_id else _ID_ATTEMPTS):
            key_id = request.key_id or new_resource_id()
            if key_id in self._configured:
                continue
            record = KeyRecord(
                id=key_id,
                display_name=key.display_name,
                secret_sha256=secret.sha256,
                secret_prefix=secret.prefix,
                team_id=team_id,
                allowed_models=tuple(key.allowed_models),
                limits=convert.limits_in(key.limits),
                budget=convert.budget_in(key.budget) if key.HasField("budget") else None,
                expire_time=expire_time,
                disabled=key.disabled,
            )
            self._guard(record)
            try:
                stored = await self._store.create_key(record)
                break
            except AlreadyExistsError as error:
                if error.field == "id" and not request.key_id:
                    continue  # a generated id collided: draw another
                raise _taken(error, record.name, "key_id") from None
            except NotFoundError:
                raise resource_not_found(convert.team_name(team_id)) from None
        if stored is None:
            raise resource_already_exists("", "key_id", "(generated)")
        request_id = self._request_id(context)
        _log().info("admin_key_created", key_id=stored.id, team_id=stored.team_id, request_id=request_id)
        await self._changed("created", stored.id, request_id)
        return apb.CreateKeyResponse(key=convert.key_out(stored, now), secret=secret.secret)

    @_rpc
    async def GetKey(self, request: apb.GetKeyRequest, context: grpc.aio.ServicerContext[Any, Any]) -> apb.Key:
        """One key, revoked or not."""
        v: list[FieldViolation] = []
        key_id = val.parse_name(v, "name", request.name, KEYS, extra_ids=self._configured)
        _raise_if(v)
        return convert.key_out(await self._key(key_id), self._clock())

    @_rpc
    async def ListKeys(
        self, request: apb.ListKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.ListKeysResponse:
        """Keys ordered by id (stored and configured together), a page at a time."""
        v: list[FieldViolation] = []
        team_id = val.parse_name(v, "team", request.team, TEAMS, required=False)
        size = val.page_size(v, request.page_size)
        query = val.fingerprint("keys", team_id, request.show_revoked)
        after = val.cursor_after(v, val.decode_page_token(v, request.page_token, query))
        _raise_if(v)

        stored = await self._store.list_keys(team_id or None, after, size + 1, request.show_revoked)
        # Past the last stored row fetched, stored keys are unknown: configured ones there wait
        # for the next page.
        frontier = stored[-1].id if len(stored) > size else None
        configured = [
            k
            for k in self._configured_sorted
            if k.id > after
            and (frontier is None or k.id <= frontier)
            and (not team_id or k.team_id == team_id)
            and (request.show_revoked or k.revoke_time is None)
        ]
        merged = sorted([k for k in stored if k.id not in self._configured] + configured, key=lambda k: k.id)
        page = merged[:size]
        now = self._clock()
        token = val.encode_page_token(query, {"a": page[-1].id}) if len(merged) > size else ""
        return apb.ListKeysResponse(keys=[convert.key_out(k, now) for k in page], next_page_token=token)

    @_rpc
    async def UpdateKey(self, request: apb.UpdateKeyRequest, context: grpc.aio.ServicerContext[Any, Any]) -> apb.Key:
        """Changes the fields of the mask; a masked field unset in `key` is cleared."""
        v: list[FieldViolation] = []
        key = request.key
        key_id = val.parse_name(v, "key.name", key.name, KEYS, extra_ids=self._configured)
        paths = val.mask_paths(v, request.update_mask, val.KEY_MASK_PATHS, val.KEY_OUTPUT_ONLY)
        team_id = ""
        for path in paths:
            if path == "display_name":
                val.check_display_name(v, "key.display_name", key.display_name)
            elif path == "team":
                team_id = val.parse_name(v, "key.team", key.team, TEAMS, required=False)
            elif path == "allowed_models":
                val.check_allowed_models(v, "key.allowed_models", key.allowed_models)
            elif path == "limits":
                val.check_limits(v, "key.limits", key.limits)
            elif path.startswith("limits."):
                val.check_limit(v, "key.limits", key.limits, path.removeprefix("limits."))
            elif path == "budget" and key.HasField("budget"):
                val.check_budget(v, "key.budget", key.budget)
            elif path == "expire_time" and key.HasField("expire_time"):
                val.check_timestamp(v, "key.expire_time", key.expire_time)
        _raise_if(v)

        record = await self._mutable_key(key_id)
        if "display_name" in paths:
            self._display_name_free(key.display_name, key_id)
        if team_id:
            await self._team(team_id)
        updated = await self._update_key(convert.key_with_mask(record, key, paths))
        request_id = self._request_id(context)
        _log().info("admin_key_updated", key_id=key_id, fields=",".join(paths), request_id=request_id)
        await self._changed("key", key_id, request_id)
        return convert.key_out(updated, self._clock())

    @_rpc
    async def RevokeKey(self, request: apb.RevokeKeyRequest, context: grpc.aio.ServicerContext[Any, Any]) -> apb.Key:
        """Revokes a key for good (a revoked key is returned unchanged)."""
        v: list[FieldViolation] = []
        key_id = val.parse_name(v, "name", request.name, KEYS, extra_ids=self._configured)
        _raise_if(v)
        if key_id in self._configured:
            raise key_read_only(convert.key_name(key_id))
        record = await self._key(key_id)
        request_id = self._request_id(context)
        if record.revoke_time is None:
            record = await self._update_key(dataclasses.replace(record, revoke_time=self._clock()))
            _log().info("admin_key_revoked", key_id=key_id, request_id=request_id)
        # Published again for an already revoked key too: a retry repairs a publish that failed.
        await self._changed("key", key_id, request_id)
        return convert.key_out(record, self._clock())

    @_rpc
    async def RotateKey(
        self, request: apb.RotateKeyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.RotateKeyResponse:
        """A new secret; the current one keeps working for `grace_period`."""
        v: list[FieldViolation] = []
        key_id = val.parse_name(v, "name", request.name, KEYS, extra_ids=self._configured)
        grace_s = val.grace_period_s(v, "grace_period", request.grace_period)
        _raise_if(v)
        record = await self._mutable_key(key_id)
        now = self._clock()
        secret = new_secret()
        rotated = dataclasses.replace(
            record,
            secret_sha256=secret.sha256,
            secret_prefix=secret.prefix,
            previous_secret_sha256=record.secret_sha256 if grace_s > 0 else "",
            previous_secret_expire_time=now + timedelta(seconds=grace_s) if grace_s > 0 else None,
        )
        updated = await self._update_key(rotated)
        request_id = self._request_id(context)
        _log().info("admin_key_rotated", key_id=key_id, grace_period_s=grace_s, request_id=request_id)
        await self._changed("key", key_id, request_id)
        return apb.RotateKeyResponse(key=convert.key_out(updated, now), secret=secret.secret)

    # --- teams -------------------------------------------------------------------------------------

    @_rpc
    async def CreateTeam(self, request: apb.CreateTeamRequest, context: grpc.aio.ServicerContext[Any, Any]) -> apb.Team:
        """Creates a team."""
        v: list[FieldViolation] = []
        team = request.team
        val.check_new_id(v, "team_id", request.team_id)
        if not request.HasField("team"):
            v.append(FieldViolation("team", "required"))
        val.check_display_name(v, "team.display_name", team.display_name)
        val.check_allowed_models(v, "team.allowed_models", team.allowed_models)
        val.check_limits(v, "team.limits", team.limits)
        if team.HasField("budget"):
            val.check_budget(v, "team.budget", team.budget)
        _raise_if(v)

        stored: TeamRecord | None = None
        for _ in range(1 if request.team_id else _ID_ATTEMPTS):
            record = convert.team_in(request.team_id or new_resource_id(), team)
            self._guard(record)
            try:
                stored = await self._store.create_team(record)
                break
            except AlreadyExistsError as error:
                if error.field == "id" and not request.team_id:
                    continue
                raise _taken(error, record.name, "team_id") from None
        if stored is None:
            raise resource_already_exists("", "team_id", "(generated)")
        _log().info("admin_team_created", team_id=stored.id, request_id=self._request_id(context))
        return convert.team_out(stored)

    @_rpc
    async def GetTeam(self, request: apb.GetTeamRequest, context: grpc.aio.ServicerContext[Any, Any]) -> apb.Team:
        """One team."""
        v: list[FieldViolation] = []
        team_id = val.parse_name(v, "name", request.name, TEAMS)
        _raise_if(v)
        return convert.team_out(await self._team(team_id))

    @_rpc
    async def ListTeams(
        self, request: apb.ListTeamsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.ListTeamsResponse:
        """Teams ordered by id, a page at a time."""
        v: list[FieldViolation] = []
        size = val.page_size(v, request.page_size)
        query = val.fingerprint("teams")
        after = val.cursor_after(v, val.decode_page_token(v, request.page_token, query))
        _raise_if(v)
        rows = await self._store.list_teams(after, size + 1)
        page = rows[:size]
        token = val.encode_page_token(query, {"a": page[-1].id}) if len(rows) > size else ""
        return apb.ListTeamsResponse(teams=[convert.team_out(t) for t in page], next_page_token=token)

    @_rpc
    async def UpdateTeam(self, request: apb.UpdateTeamRequest, context: grpc.aio.ServicerContext[Any, Any]) -> apb.Team:
        """Changes the fields of the mask; a masked field unset in `team` is cleared."""
        v: list[FieldViolation] = []
        team = request.team
        team_id = val.parse_name(v, "team.name", team.name, TEAMS)
        paths = val.mask_paths(v, request.update_mask, val.TEAM_MASK_PATHS, val.TEAM_OUTPUT_ONLY)
        for path in paths:
            if path == "display_name":
                val.check_display_name(v, "team.display_name", team.display_name)
            elif path == "allowed_models":
                val.check_allowed_models(v, "team.allowed_models", team.allowed_models)
            elif path == "limits":
                val.check_limits(v, "team.limits", team.limits)
            elif path.startswith("limits."):
                val.check_limit(v, "team.limits", team.limits, path.removeprefix("limits."))
            elif path == "budget" and team.HasField("budget"):
                val.check_budget(v, "team.budget", team.budget)
        _raise_if(v)

        record = await self._team(team_id)
        changed = convert.team_with_mask(record, team, paths)
        self._guard(changed)
        try:
            updated = await self._store.update_team(changed)
        except NotFoundError:
            raise resource_not_found(record.name) from None
        except AlreadyExistsError as error:
            raise _taken(error, record.name, "team_id") from None
        request_id = self._request_id(context)
        _log().info("admin_team_updated", team_id=team_id, fields=",".join(paths), request_id=request_id)
        await self._changed("team", team_id, request_id)
        return convert.team_out(updated)

    @_rpc
    async def DeleteTeam(
        self, request: apb.DeleteTeamRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> empty_pb2.Empty:
        """Deletes a team without keys (revoked keys do not count)."""
        v: list[FieldViolation] = []
        team_id = val.parse_name(v, "name", request.name, TEAMS)
        _raise_if(v)
        name = convert.team_name(team_id)
        try:
            await self._store.delete_team(team_id)
        except NotFoundError:
            raise resource_not_found(name) from None
        except TeamNotEmptyError as error:
            raise team_not_empty(name, error.keys) from None
        request_id = self._request_id(context)
        _log().info("admin_team_deleted", team_id=team_id, request_id=request_id)
        await self._changed("team", team_id, request_id)
        return empty_pb2.Empty()

    # --- spend and usage ---------------------------------------------------------------------------

    @_rpc
    async def GetSpend(
        self, request: apb.GetSpendRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.GetSpendResponse:
        """Spend in the current budget period (lifetime without a budget or with a lifetime one)."""
        v: list[FieldViolation] = []
        kind: ScopeKind
        scope_id = ""
        if request.name.startswith(TEAMS):
            kind = "team"
            scope_id = val.parse_name(v, "name", request.name, TEAMS)
        else:
            kind = "key"
            if request.name and not request.name.startswith(KEYS):
                v.append(
                    FieldViolation("name", f"must be `keys/{{id}}` or `teams/{{id}}`; got {val.echo(request.name)}")
                )
            else:
                scope_id = val.parse_name(v, "name", request.name, KEYS, extra_ids=self._configured)
        _raise_if(v)
        budget = (await self._key(scope_id)).budget if kind == "key" else (await self._team(scope_id)).budget
        start, end = budget.bounds(self._clock()) if budget is not None else (None, None)
        if self._spend is not None:
            spend = await self._spend(kind, scope_id, start)
        else:
            spend = await self._store.spend(kind, scope_id, start)
            pending = self._pending(kind, scope_id, start)
            spend += await pending if inspect.isawaitable(pending) else pending
        out = apb.GetSpendResponse(name=request.name, spend_usd=nano_to_usd(spend))
        if budget is not None:
            out.limit_usd = budget.limit_usd
            out.period = convert.PERIOD_TO_PROTO[budget.period]
        if start is not None and end is not None:
            out.period_start.CopyFrom(convert.timestamp(start))
            out.period_end.CopyFrom(convert.timestamp(end))
        return out

    @_rpc
    async def QueryUsage(
        self, request: apb.QueryUsageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.QueryUsageResponse:
        """Ledger sums per group, ordered by the group values, a page at a time. Without
        `end_time` the first page fixes "now" and its token carries it, so later pages count the
        same records."""
        v: list[FieldViolation] = []
        usage_filter = request.filter
        key_id = val.parse_name(v, "filter.key", usage_filter.key, KEYS, required=False, extra_ids=self._configured)
        team_id = val.parse_name(v, "filter.team", usage_filter.team, TEAMS, required=False)
        val.check_filter_text(v, "filter.model", usage_filter.model)
        val.check_filter_text(v, "filter.provider", usage_filter.provider)
        start = end = None
        if request.HasField("start_time") and val.check_timestamp(v, "start_time", request.start_time):
            start = convert.from_timestamp(request.start_time)
        if request.HasField("end_time") and val.check_timestamp(v, "end_time", request.end_time):
            end = convert.from_timestamp(request.end_time)
        if start is not None and end is not None and end <= start:
            v.append(FieldViolation("end_time", "must be after start_time"))
        groups = val.group_by(v, request.group_by)
        size = val.page_size(v, request.page_size)
        query = val.fingerprint("usage", key_id, team_id, usage_filter.model, usage_filter.provider, start, end, groups)
        cursor = val.decode_page_token(v, request.page_token, query)
        offset = val.cursor_offset(v, cursor)
        until = end or val.cursor_until(v, cursor)
        _raise_if(v)

        until = until or self._clock()
        rows = await self._store.query_usage(
            UsageQuery(
                key_id=key_id,
                team_id=team_id,
                model=usage_filter.model,
                provider=usage_filter.provider,
                start=start,
                end=until,
                group_by=tuple(convert.GROUP_BY_FROM_PROTO[g] for g in groups),
                limit=size + 1,
                offset=offset,
            )
        )
        more = len(rows) > size
        token = val.encode_page_token(query, {"o": offset + size, "e": until.isoformat()}) if more else ""
        return apb.QueryUsageResponse(rows=[convert.usage_row_out(r) for r in rows[:size]], next_page_token=token)


def add_admin_service(server: grpc.aio.Server, servicer: AdminServicer) -> None:
    """Registers the AdminService on `server` (health and reflection list it as
    `ADMIN_SERVICE_NAME`)."""
    apb_grpc.add_AdminServiceServicer_to_server(servicer, server)

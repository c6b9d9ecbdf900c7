"""A small typed blocking client for the gateway's admin API (`llm_gateway.admin.v1.AdminService`).

    from llm_gateway.admin.v1 import admin_pb2 as admin
    from llm_gateway_client.admin import AdminClient

    with AdminClient("127.0.0.1:50051", admin_key=os.environ["LLM_GATEWAY_ADMIN_KEY"]) as client:
        created = client.create_key(admin.Key(display_name="ci", allowed_models=["gpt-4o*"]))
        print(created.key.name, created.secret)  # the secret is shown this once
        for key in client.list_keys():
            print(key.name, key.display_name)

Every call carries the admin credential as `authorization: Bearer <admin key>` and has a deadline
(`timeout_s`, 10 s by default). Failed calls raise `AdminCallError`: a `GatewayCallError` that also
holds the `google.rpc.BadRequest` field violations of an INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from llm_gateway.admin.v1 import admin_pb2 as pb
from llm_gateway.admin.v1 import admin_pb2_grpc as pb_grpc

from .client import DEFAULT_TARGET, GatewayCallError, PathLike, _credentials, _metadata

DEFAULT_ADMIN_TIMEOUT_S = 10.0


class AdminCallError(GatewayCallError):
    """A failed admin call: `GatewayCallError` (code, message, ErrorInfo reason and metadata,
    RetryInfo) plus `violations`, the `(field, description)` pairs of a `google.rpc.BadRequest`
    (INVALID_ARGUMENT), in the server's order; empty when it sent none."""

    def __init__(self, error: grpc.RpcError) -> None:
        super().__init__(error)
        self.violations: list[tuple[str, str]] = []
        for key, value in error.trailing_metadata() or ():
            if key == "grpc-status-details-bin" and isinstance(value, bytes):
                for detail in status_pb2.Status.FromString(value).details:
                    if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                        bad_request = error_details_pb2.BadRequest()
                        detail.Unpack(bad_request)
                        self.violations.extend((v.field, v.description) for v in bad_request.field_violations)


def _timestamp(when: datetime | None) -> timestamp_pb2.Timestamp | None:
    if when is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(when)
    return stamp


class AdminClient:
    """Blocking admin client. `admin_key` is sent as `authorization: Bearer …` on every call;
    `timeout_s` is the deadline of each call, seconds.

    Channel options as for `GatewayClient`: plaintext by default; TLS with `tls`, `tls_ca`,
    `tls_cert` + `tls_key` or `credentials`; or a ready `channel` (not closed by `close`).

    Raises:
        ValueError: `channel` together with TLS options, `credentials` together with TLS files,
            or only one of `tls_cert` / `tls_key`.
        OSError: a TLS file cannot be read.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        admin_key: str | None = None,
        timeout_s: float = DEFAULT_ADMIN_TIMEOUT_S,
        channel: grpc.Channel | None = None,
        tls: bool = False,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        secure = _credentials(tls, tls_ca, tls_cert, tls_key, credentials)
        if channel is not None and secure is not None:
            raise ValueError("TLS options apply to the client's own channel; configure the given channel instead")
        self._owns_channel = channel is None
        if channel is None:
            channel = grpc.insecure_channel(target) if secure is None else grpc.secure_channel(target, secure)
        self._channel = channel
        self._stub = pb_grpc.AdminServiceStub(channel)
        self._metadata = _metadata(admin_key)
        self._timeout_s = timeout_s

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel if this client created it."""
        if self._owns_channel:
            self._channel.close()

    def _call(self, method: str, request: Any) -> Any:
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise AdminCallError(error) from None

    # Keys -------------------------------------------------------------------------------------

    def create_key(self, key: pb.Key, key_id: str = "") -> pb.CreateKeyResponse:
        """Creates a key (under `keys/{key_id}`, or a generated id); the response holds its
        secret, which the gateway never shows again."""
        return cast(pb.CreateKeyResponse, self._call("CreateKey", pb.CreateKeyRequest(key=key, key_id=key_id)))

    def get_key(self, name: str) -> pb.Key:
        """The key `keys/{id}` (revoked keys included)."""
        return cast(pb.Key, self._call("GetKey", pb.GetKeyRequest(name=name)))

    def list_keys(
        self, team: str = "", *, show_revoked: bool = False, page_size: int = 0, limit: int | None = None
    ) -> Iterator[pb.Key]:
        """The keys (of `team` only, when given), ordered by id, following page tokens lazily;
        at most `limit` of them. `page_size`: keys per call (0: the server's default)."""
        request = pb.ListKeysRequest(team=team, show_revoked=show_revoked, page_size=page_size)
        return self._pages("ListKeys", request, "keys", limit)

    def update_key(self, key: pb.Key, update_mask: Sequence[str]) -> pb.Key:
        """Changes the fields of `key.name` named in `update_mask` (a listed field unset in `key`
        is cleared)."""
        mask = field_mask_pb2.FieldMask(paths=list(update_mask))
        return cast(pb.Key, self._call("UpdateKey", pb.UpdateKeyRequest(key=key, update_mask=mask)))

    def revoke_key(self, name: str) -> pb.Key:
        """Revokes `keys/{id}` for good and returns it."""
        return cast(pb.Key, self._call("RevokeKey", pb.RevokeKeyRequest(name=name)))

    def rotate_key(self, name: str, grace_period: timedelta | None = None) -> pb.RotateKeyResponse:
        """Issues a new secret for `keys/{id}` (in the response, shown this once); the old one
        keeps working for `grace_period` (None or 0: it stops at once)."""
        request = pb.RotateKeyRequest(name=name)
        if grace_period is not None:
            request.grace_period.FromTimedelta(grace_period)
        return cast(pb.RotateKeyResponse, self._call("RotateKey", request))

    # Teams ------------------------------------------------------------------------------------

    def create_team(self, team: pb.Team, team_id: str = "") -> pb.Team:
        """Creates a team (under `teams/{team_id}`, or a generated id)."""
        return cast(pb.Team, self._call("CreateTeam", pb.CreateTeamRequest(team=team, team_id=team_id)))

    def get_team(self, name: str) -> pb.Team:
        """The team `teams/{id}`."""
        return cast(pb.Team, self._call("GetTeam", pb.GetTeamRequest(name=name)))

    def list_teams(self, *, page_size: int = 0, limit: int | None = None) -> Iterator[pb.Team]:
        """The teams, ordered by id, following page tokens lazily; at most `limit` of them."""
        return self._pages("ListTeams", pb.ListTeamsRequest(page_size=page_size), "teams", limit)

    def update_team(self, team: pb.Team, update_mask: Sequence[str]) -> pb.Team:
        """Changes the fields of `team.name` named in `update_mask`."""
        mask = field_mask_pb2.FieldMask(paths=list(update_mask))
        return cast(pb.Team, self._call("UpdateTeam", pb.UpdateTeamRequest(team=team, update_mask=mask)))

    def delete_team(self, name: str) -> None:
        """Deletes `teams/{id}` (refused while keys that are not revoked belong to it)."""
        self._call("DeleteTeam", pb.DeleteTeamRequest(name=name))

    # Spend and usage --------------------------------------------------------------------------

    def get_spend(self, name: str) -> pb.GetSpendResponse:
        """Spend of `keys/{id}` or `teams/{id}` in its budget's current period (lifetime spend
        without a budget)."""
        return cast(pb.GetSpendResponse, self._call("GetSpend", pb.GetSpendRequest(name=name)))

    def query_usage(
        self,
        usage_filter: pb.UsageFilter | None = None,
        *,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        group_by: Sequence[pb.UsageGroupBy] = (),
        page_size: int = 0,
        limit: int | None = None,
    ) -> Iterator[pb.UsageRow]:
        """Sums of the usage ledger over `[start_time, end_time)` (timezone-aware datetimes; None:
        unbounded), grouped by `group_by` in that order, following page tokens lazily; at most
        `limit` rows."""
        request = pb.QueryUsageRequest(
            filter=usage_filter,
            start_time=_timestamp(start_time),
            end_time=_timestamp(end_time),
            group_by=list(group_by),
            page_size=page_size,
        )
        return self._pages("QueryUsage", request, "rows", limit)

    def _pages(self, method: str, request: Any, field: str, limit: int | None) -> Iterator[Any]:
        """The items in `field` of every page of `method`, until the last page or `limit`."""
        if limit is not None and not request.page_size:
            request.page_size = max(1, min(limit, 1000))  # no bigger pages than needed
        yielded = 0
        while limit is None or yielded < limit:
            page = self._call(method, request)
            for item in getattr(page, field):
                if limit is not None and yielded >= limit:
                    return
                yield item
                yielded += 1
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

"""The store interface: keys, teams and the usage ledger (implemented by `store/sql.py`).

Every method is bounded by the store's operation timeout and raises `StoreUnavailableError`
when the database cannot be reached in time; callers decide what that means (the key cache
serves stale records, the ledger writer retries, the admin API answers UNAVAILABLE).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from ..tenancy.records import KeyRecord, TeamRecord, UsageQuery, UsageRecord, UsageRow

ScopeKind = Literal["key", "team"]


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreUnavailableError(StoreError):
    """The database did not answer within the timeout, or refused the connection."""


class NotFoundError(StoreError):
    """No record with that id."""


class AlreadyExistsError(StoreError):
    """A unique field is taken.

    Attributes:
        field: "id" or "display_name". value: the value taken.
    """

    def __init__(self, field: str, value: str) -> None:
        super().__init__(f"{field} {value!r} is already taken")
        self.field = field
        self.value = value


class TeamNotEmptyError(StoreError):
    """A team cannot be deleted while keys that are not revoked belong to it.

    Attributes:
        keys: how many such keys there are.
    """

    def __init__(self, keys: int) -> None:
        super().__init__(f"the team still has {keys} key(s)")
        self.keys = keys


class Store(abc.ABC):
    """Keys, teams and the usage ledger."""

    # --- teams ---------------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_team(self, team: TeamRecord) -> TeamRecord:
        """Inserts a team (its create/update times are set here).

        Raises:
            AlreadyExistsError: the id or the display name is taken.
        """

    @abc.abstractmethod
    async def get_team(self, team_id: str) -> TeamRecord | None:
        """The team, or None."""

    @abc.abstractmethod
    async def list_teams(self, after_id: str, limit: int) -> list[TeamRecord]:
        """Up to `limit` teams with id > `after_id`, ordered by id."""

    @abc.abstractmethod
    async def update_team(self, team: TeamRecord) -> TeamRecord:
        """Replaces the team's mutable fields (display name, allowed models, limits, budget) with
        those of `team` and sets its update time.

        Raises:
            NotFoundError: no such team. AlreadyExistsError: the display name is taken.
        """

    @abc.abstractmethod
    async def delete_team(self, team_id: str) -> None:
        """Deletes a team.

        Raises:
            NotFoundError: no such team. TeamNotEmptyError: keys (not revoked) belong to it.
        """

    # --- keys ----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_key(self, key: KeyRecord) -> KeyRecord:
        """Inserts a key (its create/update times are set here).

        Raises:
            AlreadyExistsError: the id or display name is taken. NotFoundError: its team does
                not exist.
        """

    @abc.abstractmethod
    async def get_key(self, key_id: str) -> KeyRecord | None:
        """The key (revoked keys included), or None."""

    @abc.abstractmethod
    async def find_key(self, secret_sha256: str) -> KeyRecord | None:
        """The key whose current secret, or previous secret (whatever its expiry: the caller
        checks `previous_secret_expire_time`), has this SHA-256 hex digest; None if none."""

    @abc.abstractmethod
    async def list_keys(self, team_id: str | None, after_id: str, limit: int, include_revoked: bool) -> list[KeyRecord]:
        """Up to `limit` keys with id > `after_id` (of `team_id` when given), ordered by id."""

    @abc.abstractmethod
    async def update_key(self, key: KeyRecord) -> KeyRecord:
        """Replaces the key's mutable fields (everything but id and create time) with those of
        `key` and sets its update time.

        Raises:
            NotFoundError: no such key, or its new team does not exist. AlreadyExistsError: the
                display name or secret is taken.
        """

    @abc.abstractmethod
    async def count_keys(self) -> int:
        """How many keys were ever created, revoked ones included: auth applies as soon as one
        was, and revoking the last key must not open the gateway to anonymous calls again."""

    # --- usage ledger --------------------------------------------------------------------------

    @abc.abstractmethod
    async def write_usage(self, records: Sequence[UsageRecord]) -> None:
        """Inserts ledger records in one transaction (all or none)."""

    @abc.abstractmethod
    async def query_usage(self, query: UsageQuery) -> list[UsageRow]:
        """Sums of the matching records per group (see `UsageQuery`)."""

    @abc.abstractmethod
    async def spend(self, kind: ScopeKind, scope_id: str, since: datetime | None) -> int:
        """nano-USD recorded for a key's or team's calls at or after `since` (None: ever)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Succeeds when the database answers (health).

        Raises:
            StoreUnavailableError: it does not.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Closes the connection pool."""

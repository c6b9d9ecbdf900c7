"""Key secrets and generated resource ids.

A secret is `sk-gw-` followed by 43 URL-safe base64 characters (`secrets.token_urlsafe(32)`:
256 random bits), 49 characters in all. The gateway keeps only its SHA-256 hex digest
(`interceptors.auth.hash_key`, the digest the data plane looks keys up by) and its first
`SECRET_PREFIX_CHARS` characters (`sk-gw-` + 4 random ones: 24 bits, enough to tell keys apart,
never enough to use one). A secret is never logged, stored or echoed after the response that
creates it.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass

from ..interceptors.auth import hash_key

SECRET_PREFIX = "sk-gw-"
SECRET_RANDOM_CHARS = 43
SECRET_PREFIX_CHARS = 10
GENERATED_ID_CHARS = 12


@dataclass(frozen=True, slots=True)
class NewSecret:
    """A freshly generated secret.

    Attributes:
        secret: the full secret (49 chars); returned to the caller once, never stored.
        sha256: its SHA-256 hex digest (64 lower-case hex chars), what the store keeps.
        prefix: its first `SECRET_PREFIX_CHARS` characters.
    """

    secret: str
    sha256: str
    prefix: str

    def __repr__(self) -> str:  # never let a traceback or a debug print show the secret
        return f"NewSecret(prefix={self.prefix!r}, sha256={self.sha256[:8]}…)"


def new_secret() -> NewSecret:
    """A new random key secret with its digest and prefix."""
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)[:SECRET_RANDOM_CHARS]
    return NewSecret(secret=secret, sha256=hash_key(secret), prefix=secret[:SECRET_PREFIX_CHARS])


def new_resource_id() -> str:
    """A generated key or team id: `GENERATED_ID_CHARS` (12) lower-case base32 characters
    (`a-z`, `2-7`; 60 random bits), valid under the `[a-z0-9][a-z0-9-]{0,62}` id rule."""
    return base64.b32encode(secrets.token_bytes(10)).decode("ascii").lower()[:GENERATED_ID_CHARS]

"""TLS and mTLS for the gRPC port, with certificate reload without a restart.

`ServerTls` reads `tls.cert_file` / `tls.key_file` (and `tls.client_ca_file`, which turns on
mTLS: a client certificate is then required) and hands gRPC dynamic server credentials
(`grpc.dynamic_ssl_server_credentials`). gRPC calls the fetcher, `ServerTls.fetch`, before the
TLS handshake of every new connection; it returns a new certificate configuration when

- `reload()` loaded one (the SIGHUP handler in `app.serve` calls it), or
- a file's modification time, size or inode changed since the last load (one `os.stat` per file
  per new connection; an atomic rename and a Kubernetes secret's symlink swap count as changes).

A reload that finds invalid files (a half-written pair, a key that does not match the
certificate) logs one line and keeps serving the previous certificate; the same broken files are
not retried until they change again. Connections already open keep the certificate they
negotiated; new connections get the new one.

Minimum TLS version: TLS 1.2, maximum TLS 1.3. grpc python exposes no option for either; they are
gRPC core's defaults for SSL server credentials (`grpc_ssl_server_config` in
`src/core/credentials/transport/ssl/ssl_security_connector.h`: `min_tls_version =
grpc_tls_version::TLS1_2`, `max_tls_version = TLS1_3`), checked by `tests/test_tls.py`, which
offers TLS 1.1 and is refused.

The files are checked at start with Python's `ssl` module (the same OpenSSL-format PEM that
gRPC's BoringSSL reads): errors are one-line `ConfigError`s naming the setting and the file,
never the key material.
"""

from __future__ import annotations

import os
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from ..config import ConfigError, TlsSettings

log = structlog.get_logger(__name__)

# (setting name, path): the order of every signature and error message.
_Files = tuple[tuple[str, Path], ...]
# Per file: (st_ino, st_size, st_mtime_ns); a change of any of them means "reload".
_Signature = tuple[tuple[int, int, int], ...]
_STABLE_READ_ATTEMPTS = 3


@dataclass(frozen=True)
class _Loaded:
    signature: _Signature
    configuration: grpc.ServerCertificateConfiguration


def _files(settings: TlsSettings) -> _Files:
    files = [("tls.cert_file", settings.cert_file), ("tls.key_file", settings.key_file)]
    if settings.client_ca_file is not None:
        files.append(("tls.client_ca_file", settings.client_ca_file))
    return tuple((name, path) for name, path in files if path is not None)


def _signature(files: _Files) -> _Signature:
    signature = []
    for name, path in files:
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise ConfigError(f"{name} {path}: cannot read: {exc.strerror}") from None
        signature.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(signature)


def _read(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name} {path}: cannot read: {exc.strerror}") from None


def _no_password() -> bytes:
    # Called by OpenSSL only for an encrypted key (caught before): never prompt on the terminal.
    return b""


def _check(files: _Files, contents: dict[str, bytes]) -> None:
    """Raises ConfigError unless the certificate, key (and CA) are usable PEM and the key matches."""
    paths = dict(files)
    cert_path, key_path = paths["tls.cert_file"], paths["tls.key_file"]
    if b"-----BEGIN CERTIFICATE-----" not in contents["tls.cert_file"]:
        raise ConfigError(f"tls.cert_file {cert_path}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file")
    key = contents["tls.key_file"]
    if b"PRIVATE KEY-----" not in key:
        raise ConfigError(f"tls.key_file {key_path}: no PEM private key (-----BEGIN ... PRIVATE KEY-----) in the file")
    if b"BEGIN ENCRYPTED PRIVATE KEY" in key or b"Proc-Type: 4,ENCRYPTED" in key:
        raise ConfigError(f"tls.key_file {key_path}: the private key is encrypted; gRPC needs an unencrypted PEM key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert_path, key_path, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"tls.key_file {key_path}: the private key does not match tls.cert_file {cert_path}"
            ) from None
        raise ConfigError(
            f"tls.cert_file {cert_path} / tls.key_file {key_path}: not a usable certificate and key "
            f"({exc.reason or exc.library or 'invalid PEM'})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"tls.cert_file {cert_path} / tls.key_file {key_path}: cannot read: {exc.strerror}") from None
    if "tls.client_ca_file" in contents:
        ca_path = paths["tls.client_ca_file"]
        try:
            context.load_verify_locations(cadata=contents["tls.client_ca_file"].decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or "not PEM"
            raise ConfigError(f"tls.client_ca_file {ca_path}: no usable PEM CA certificate ({reason})") from None


def _load(files: _Files) -> _Loaded:
    """Reads and checks the files; retried while they change under the read (a rotation in flight).

    Raises:
        ConfigError: a file is missing, unreadable or invalid, or the key does not match.
    """
    for _ in range(_STABLE_READ_ATTEMPTS):
        before = _signature(files)
        contents = {name: _read(name, path) for name, path in files}
        _check(files, contents)
        if _signature(files) == before:
            configuration = grpc.ssl_server_certificate_configuration(
                [(contents["tls.key_file"], contents["tls.cert_file"])],
                root_certificates=contents.get("tls.client_ca_file"),
            )
            return _Loaded(before, configuration)
    names = ", ".join(name for name, _ in files)
    raise ConfigError(f"{names}: the files kept changing while they were read; try again once they are written")


class ServerTls:
    """Dynamic TLS (or mTLS) server credentials from certificate files, reloadable while serving.

    Thread-safe: `fetch` runs on gRPC's threads, `reload` on any thread.

    Attributes:
        credentials: the `grpc.ServerCredentials` to bind the port with (`add_secure_port`).
        mutual: True when `client_ca_file` is set (client certificates required).
        reloads: how many times new files were loaded since start (for tests and logs).
    """

    def __init__(self, settings: TlsSettings) -> None:
        """Loads and checks the files.

        Args:
            settings: `cert_file` and `key_file` (both required), optional `client_ca_file`.
        Raises:
            ConfigError: a file is missing, unreadable, not PEM, the key is encrypted or does not
                match the certificate, or the CA file holds no certificate (one line, no key
                material).
        """
        if settings.cert_file is None or settings.key_file is None:
            raise ConfigError("tls.cert_file and tls.key_file must be set together (TLS needs both)")
        self._files = _files(settings)
        self.mutual = settings.client_ca_file is not None
        loaded = _load(self._files)
        self._lock = threading.Lock()
        self._signature = loaded.signature
        self._failed_signature: _Signature | None = None
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.reloads = 0
        self.credentials: grpc.ServerCredentials = grpc.dynamic_ssl_server_credentials(
            loaded.configuration, self.fetch, require_client_authentication=self.mutual
        )

    @property
    def mode(self) -> str:
        """ "mtls" (client certificates required) or "tls"."""
        return "mtls" if self.mutual else "tls"

    @property
    def files(self) -> dict[str, str]:
        """Setting name → path of every file served (for logs)."""
        return {name: str(path) for name, path in self._files}

    def reload(self) -> bool:
        """Re-reads the files now; new connections then get the new certificate.

        Returns:
            True when the files are valid (served from the next handshake on); False when they are
            not (logged as `tls_reload_failed`; the previous certificate stays in use).
        """
        with self._lock:
            return self._reload_locked("explicit")

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate configuration fetcher, called before each new connection's handshake.

        Returns:
            A new configuration after `reload()` or a file change; None to keep the current one.
            Never raises.
        """
        try:
            with self._lock:
                try:
                    current: _Signature | None = _signature(self._files)
                except ConfigError:
                    current = None  # mid-rotation (a file briefly missing): wait for it
                if current is not None and current not in (self._signature, self._failed_signature):
                    self._reload_locked("file_change")  # on success, sets _pending
                pending, self._pending = self._pending, None
                return pending
        except Exception:  # the handshake must go on with the current certificate
            log.exception("tls_reload_failed", trigger="fetch")
            return None

    def _reload_locked(self, trigger: str) -> bool:
        try:
            loaded = _load(self._files)
        except ConfigError as exc:
            try:
                self._failed_signature = _signature(self._files)
            except ConfigError:
                self._failed_signature = None
            log.warning(
                "tls_reload_failed", trigger=trigger, error=str(exc), note="still serving the previous certificate"
            )
            return False
        self._signature, self._failed_signature = loaded.signature, None
        self._pending = loaded.configuration
        self.reloads += 1
        log.info("tls_reloaded", trigger=trigger, mode=self.mode, files=self.files)
        return True


def server_tls(settings: TlsSettings) -> ServerTls | None:
    """The server's TLS credentials, or None when TLS is not configured (no files set).

    Raises:
        ConfigError: only some of the files are set (a client CA without a certificate and key, a
            certificate without a key or the reverse), or the files are invalid (see `ServerTls`).
    """
    if settings.cert_file is None and settings.key_file is None:
        if settings.client_ca_file is not None:
            raise ConfigError("tls.client_ca_file is set without tls.cert_file and tls.key_file (mTLS needs all three)")
        return None
    return ServerTls(settings)

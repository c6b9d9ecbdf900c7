"""TLS and mTLS on the gRPC port (transport/tls.py): certificates from files, reload without a
restart (file change, explicit call, SIGHUP), TLS 1.2 minimum, plaintext only on loopback unless
allowed, and the Python client and CLI over TLS. Every CA and certificate is made here (trustme).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from llm_gateway.v1 import llm_gateway_pb2 as pb
from llm_gateway.v1 import llm_gateway_pb2_grpc as pb_grpc
from llm_gateway_client import AsyncGatewayClient, GatewayClient
from llm_gateway_client import cli as client_cli
from llm_gateway_client.client import channel_credentials
from llm_gateway_server.config import ConfigError, TlsSettings, load_settings
from llm_gateway_server.transport.tls import server_tls

from .conftest import FAST_RECONNECT, GATEWAY_PROCESSES, OPENAI_TEST_KEY, Gateway, GatewayFactory, chat, free_port
from .emulators.openai_server import OpenAIEmulator

# Every PEM file is padded to this size, so that a rewrite can keep size, inode and mtime (a
# rotation the file watcher cannot see) and only an explicit reload or SIGHUP picks it up.
PAD = 4096


@dataclass
class Pki:
    """A CA, and the server's certificate and key files (issued by `ca`) under `directory`."""

    ca: trustme.CA
    directory: Path

    @property
    def cert_file(self) -> Path:
        return self.directory / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.directory / "server.key"

    def ca_file(self, ca: trustme.CA | None = None, name: str = "ca.pem") -> Path:
        path = self.directory / name
        (ca or self.ca).cert_pem.write_to_path(str(path))
        return path


def _write(path: Path, data: bytes, *, silent: bool) -> None:
    padded = data.ljust(PAD, b"\n")
    if not path.exists():
        path.write_bytes(padded)
        return
    before = os.stat(path)
    with path.open("r+b") as file:  # same inode
        file.write(padded)
    if silent:  # same size (padded), inode and times: invisible to the mtime check
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:  # a visibly newer file even within the file system's timestamp granularity
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))


def issue_server_cert(pki: Pki, ca: trustme.CA, *, silent: bool = False) -> None:
    """Writes a certificate for localhost / 127.0.0.1 signed by `ca`, and its key, over pki's files."""
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    _write(pki.cert_file, leaf.cert_chain_pems[0].bytes(), silent=silent)
    _write(pki.key_file, leaf.private_key_pem.bytes(), silent=silent)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    pki = Pki(trustme.CA(), tmp_path)
    issue_server_cert(pki, pki.ca)
    return pki


def client_pair(pki: Pki, ca: trustme.CA, name: str = "client") -> tuple[Path, Path]:
    """A client certificate (signed by `ca`) and its key, as files."""
    leaf = ca.issue_cert(f"{name}@example.test")
    cert, key = pki.directory / f"{name}.pem", pki.directory / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def secure_stub(
    port: int, ca_file: Path, cert: Path | None = None, key: Path | None = None, options: Any = None
) -> Any:
    """A fresh TLS channel (a new connection, so a new handshake) to localhost:port, and its stub."""
    channel = grpc.aio.secure_channel(f"localhost:{port}", channel_credentials(ca_file, cert, key), options=options)
    return channel, pb_grpc.LLMGatewayServiceStub(channel)


async def chat_over(port: int, ca_file: Path, cert: Path | None = None, key: Path | None = None) -> str:
    channel, stub = secure_stub(port, ca_file, cert, key)
    async with channel:
        reply = await stub.Chat(chat("m", "over tls"), timeout=5)
        return str(reply.message.content[0].text)


async def refused(port: int, ca_file: Path, cert: Path | None = None, key: Path | None = None) -> grpc.StatusCode:
    """The status of a call that must fail (at the handshake), asserting it fails in time."""
    channel, stub = secure_stub(port, ca_file, cert, key)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Chat(chat("m"), timeout=5)
        return caught.value.code()


def openai_env(upstream: OpenAIEmulator) -> dict[str, str]:
    return {"OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": upstream.base_url}


async def tls_gateway(make_gateway: GatewayFactory, upstream: OpenAIEmulator, pki: Pki, **tls: Any) -> Gateway:
    return await make_gateway(
        openai_env(upstream), tls={"cert_file": str(pki.cert_file), "key_file": str(pki.key_file), **tls}
    )


async def test_tls_chat_with_the_right_ca_and_clean_refusals(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, pki: Pki
) -> None:
    gateway = await tls_gateway(make_gateway, openai_upstream, pki)
    assert gateway.running.tls is not None and gateway.running.tls.mode == "tls"
    assert await chat_over(gateway.running.port, pki.ca_file()) == "echo: over tls"
    # A plaintext client fails with a status, at once (no hang until the deadline).
    async with grpc.aio.insecure_channel(f"localhost:{gateway.running.port}") as plain:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await pb_grpc.LLMGatewayServiceStub(plain).Chat(chat("m"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA does not accept the server's certificate.
    other = pki.ca_file(trustme.CA(), "other-ca.pem")
    assert await refused(gateway.running.port, other) == grpc.StatusCode.UNAVAILABLE


async def test_mtls_requires_a_client_certificate_from_the_client_ca(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, pki: Pki
) -> None:
    client_ca = trustme.CA()
    gateway = await tls_gateway(
        make_gateway, openai_upstream, pki, client_ca_file=str(pki.ca_file(client_ca, "client-ca.pem"))
    )
    assert gateway.running.tls is not None and gateway.running.tls.mode == "mtls"
    port, ca = gateway.running.port, pki.ca_file()
    assert await refused(port, ca) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    stranger = client_pair(pki, trustme.CA(), "stranger")
    assert await refused(port, ca, *stranger) == grpc.StatusCode.UNAVAILABLE  # signed by another CA
    assert await chat_over(port, ca, *client_pair(pki, client_ca)) == "echo: over tls"


async def test_rotated_certificate_is_served_after_a_file_change(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, pki: Pki
) -> None:
    gateway = await tls_gateway(make_gateway, openai_upstream, pki)
    port, old_ca = gateway.running.port, pki.ca_file()
    assert await chat_over(port, old_ca) == "echo: over tls"
    new = trustme.CA()
    issue_server_cert(pki, new)  # written over the old files, newer mtimes
    new_ca = pki.ca_file(new, "new-ca.pem")
    assert await chat_over(port, new_ca) == "echo: over tls"
    assert await refused(port, old_ca) == grpc.StatusCode.UNAVAILABLE
    assert gateway.running.tls is not None and gateway.running.tls.reloads == 1


async def test_a_kubernetes_style_symlink_swap_is_a_file_change(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, tmp_path: Path
) -> None:
    # A Secret volume: tls.crt -> ..data/server.pem, ..data -> a version directory, swapped atomically.
    old, new = Pki(trustme.CA(), tmp_path / "v1"), Pki(trustme.CA(), tmp_path / "v2")
    for version in (old, new):
        version.directory.mkdir()
        issue_server_cert(version, version.ca)
    (tmp_path / "..data").symlink_to("v1")
    (tmp_path / "tls.crt").symlink_to("..data/server.pem")
    (tmp_path / "tls.key").symlink_to("..data/server.key")
    gateway = await make_gateway(
        openai_env(openai_upstream), tls={"cert_file": str(tmp_path / "tls.crt"), "key_file": str(tmp_path / "tls.key")}
    )
    port = gateway.running.port
    assert await chat_over(port, old.ca_file()) == "echo: over tls"
    (tmp_path / "..data_tmp").symlink_to("v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert await chat_over(port, new.ca_file()) == "echo: over tls"


async def test_rotation_invisible_to_the_file_check_is_served_after_an_explicit_reload(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, pki: Pki
) -> None:
    gateway = await tls_gateway(make_gateway, openai_upstream, pki)
    port, old_ca = gateway.running.port, pki.ca_file()
    new = trustme.CA()
    new_ca = pki.ca_file(new, "new-ca.pem")
    issue_server_cert(pki, new, silent=True)  # same size, inode and mtime
    assert await chat_over(port, old_ca) == "echo: over tls"  # not noticed: still the old one
    assert gateway.running.reload_tls() is True
    assert await chat_over(port, new_ca) == "echo: over tls"
    assert await refused(port, old_ca) == grpc.StatusCode.UNAVAILABLE


async def test_a_broken_rotation_keeps_the_previous_certificate(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, pki: Pki
) -> None:
    gateway = await tls_gateway(make_gateway, openai_upstream, pki)
    port, ca = gateway.running.port, pki.ca_file()
    tls = gateway.running.tls
    assert tls is not None
    # A new certificate whose key has not been written yet: the pair does not match.
    _write(pki.cert_file, trustme.CA().issue_cert("localhost").cert_chain_pems[0].bytes(), silent=False)
    assert await chat_over(port, ca) == "echo: over tls"  # the watcher saw it, refused it, kept the old one
    assert tls.reload() is False
    assert await chat_over(port, ca) == "echo: over tls"
    assert tls.reloads == 0
    issue_server_cert(pki, pki.ca)  # the rotation completes
    assert await chat_over(port, ca) == "echo: over tls"
    assert tls.reloads == 1


@GATEWAY_PROCESSES
async def test_sighup_reloads_the_certificate_in_a_served_process(openai_upstream: OpenAIEmulator, pki: Pki) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "OLLAMA_", "LLM_GATEWAY_"))}
    env.update(
        openai_env(openai_upstream),
        LLM_GATEWAY_METRICS_PORT="0",
        LLM_GATEWAY_TLS__CERT_FILE=str(pki.cert_file),
        LLM_GATEWAY_TLS__KEY_FILE=str(pki.key_file),
    )
    process = subprocess.Popen(  # noqa: ASYNC220 - a real process, so SIGHUP reaches the real signal handler
        [sys.executable, "-m", "llm_gateway_server", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        old_ca, new = pki.ca_file(), trustme.CA()
        new_ca = pki.ca_file(new, "new-ca.pem")
        channel, _ = secure_stub(port, old_ca, options=FAST_RECONNECT)  # the process is starting
        async with channel:
            await asyncio.wait_for(channel.channel_ready(), 20)
        issue_server_cert(pki, new, silent=True)  # invisible to the file check: only SIGHUP loads it
        assert await refused(port, new_ca) == grpc.StatusCode.UNAVAILABLE
        process.send_signal(signal.SIGHUP)
        for _ in range(100):  # the handler runs on the server's loop, shortly after the signal
            try:
                assert await chat_over(port, new_ca) == "echo: over tls"
                break
            except grpc.aio.AioRpcError:
                assert process.poll() is None
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the new certificate was not served after SIGHUP")
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.to_thread(process.communicate, timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert '"event": "tls_reloaded"' in output and '"trigger": "explicit"' in output
    assert '"tls": "tls"' in output  # in server_started


async def test_plaintext_off_loopback_needs_allow_plaintext(make_gateway: GatewayFactory) -> None:
    with pytest.raises(ConfigError) as caught:
        await make_gateway({}, host="0.0.0.0", auth={"disabled": True})
    message = str(caught.value)
    assert "\n" not in message
    assert "refusing plaintext on 0.0.0.0" in message
    assert "tls.cert_file" in message and "tls.allow_plaintext" in message
    gateway = await make_gateway({}, host="0.0.0.0", auth={"disabled": True}, tls={"allow_plaintext": True})
    assert gateway.running.tls is None
    assert (await gateway.stub.ListModels(pb.ListModelsRequest())).total_size > 0


async def test_tls_off_loopback_serves_without_allow_plaintext(make_gateway: GatewayFactory, pki: Pki) -> None:
    gateway = await make_gateway(
        {}, host="0.0.0.0", auth={"disabled": True}, tls={"cert_file": str(pki.cert_file), "key_file": pki.key_file}
    )
    channel, stub = secure_stub(gateway.running.port, pki.ca_file())
    async with channel:
        assert (await stub.ListModels(pb.ListModelsRequest(), timeout=5)).total_size > 0


def test_settings_names_from_yaml_and_environment(tmp_path: Path, pki: Pki) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"tls:\n  cert_file: {pki.cert_file}\n  key_file: /from/yaml.key\n  allow_plaintext: true\n")
    settings = load_settings(
        config,
        environ={"LLM_GATEWAY_TLS__KEY_FILE": str(pki.key_file), "LLM_GATEWAY_TLS__CLIENT_CA_FILE": "/ca.pem"},
    )
    assert settings.tls.cert_file == pki.cert_file
    assert settings.tls.key_file == pki.key_file  # the environment wins over the file
    assert settings.tls.client_ca_file == Path("/ca.pem")
    assert settings.tls.allow_plaintext is True
    assert load_settings(environ={}).tls == TlsSettings()


def _invalid_cases(pki: Pki) -> dict[str, tuple[dict[str, Any], str]]:
    d = pki.directory
    other_key = d / "other.key"
    other_key.write_bytes(trustme.CA().issue_cert("localhost").private_key_pem.bytes())
    garbage = d / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = d / "encrypted.key"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n")
    bad_ca = d / "bad-ca.pem"
    bad_ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64 !!\n-----END CERTIFICATE-----\n")
    cert, key = str(pki.cert_file), str(pki.key_file)
    return {
        "missing cert": ({"cert_file": str(d / "nope.pem"), "key_file": key}, "tls.cert_file"),
        "key does not match": ({"cert_file": cert, "key_file": str(other_key)}, "does not match tls.cert_file"),
        "cert without key": ({"cert_file": cert}, "must be set together"),
        "key without cert": ({"key_file": key}, "must be set together"),
        "ca alone": ({"client_ca_file": pki.ca_file()}, "tls.client_ca_file is set without"),
        "cert not pem": ({"cert_file": str(garbage), "key_file": key}, "no PEM certificate"),
        "key not pem": ({"cert_file": cert, "key_file": str(garbage)}, "no PEM private key"),
        "encrypted key": ({"cert_file": cert, "key_file": str(encrypted)}, "encrypted"),
        "unreadable ca": ({"cert_file": cert, "key_file": key, "client_ca_file": str(d / "no-ca.pem")}, "cannot read"),
        "invalid ca": ({"cert_file": cert, "key_file": key, "client_ca_file": str(bad_ca)}, "tls.client_ca_file"),
    }


CASES = [
    "missing cert",
    "key does not match",
    "cert without key",
    "key without cert",
    "ca alone",
    "cert not pem",
    "key not pem",
    "encrypted key",
    "unreadable ca",
    "invalid ca",
]


@pytest.mark.parametrize("case", CASES)
def test_invalid_tls_files_are_one_line_config_errors(pki: Pki, case: str) -> None:
    values, fragment = _invalid_cases(pki)[case]
    with pytest.raises(ConfigError) as caught:
        server_tls(TlsSettings(**values))
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message
    key_body = [line for line in pki.key_file.read_text().splitlines() if line and not line.startswith("-----")]
    assert key_body and not any(line in message for line in key_body)  # never key material


async def test_invalid_tls_stops_the_start(make_gateway: GatewayFactory, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="does not match"):
        await make_gateway({}, tls={"cert_file": str(pki.cert_file), "key_file": str(client_pair(pki, pki.ca)[1])})


def _handshake(port: int, ca_pem: str, version: ssl.TLSVersion) -> str:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca_pem)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.0/1.1 at all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        context.minimum_version = context.maximum_version = version
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return str(tls.version())


async def test_minimum_tls_version_is_1_2(make_gateway: GatewayFactory, pki: Pki) -> None:
    gateway = await make_gateway({}, tls={"cert_file": str(pki.cert_file), "key_file": str(pki.key_file)})
    port, ca = gateway.running.port, pki.ca.cert_pem.bytes().decode()
    assert await asyncio.to_thread(_handshake, port, ca, ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    assert await asyncio.to_thread(_handshake, port, ca, ssl.TLSVersion.TLSv1_3) == "TLSv1.3"
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(_handshake, port, ca, old)


async def test_python_clients_and_cli_over_tls_and_mtls(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    client_ca = trustme.CA()
    gateway = await tls_gateway(
        make_gateway, openai_upstream, pki, client_ca_file=str(pki.ca_file(client_ca, "client-ca.pem"))
    )
    target, ca = f"localhost:{gateway.running.port}", pki.ca_file()
    cert, key = client_pair(pki, client_ca)

    def sync_chat() -> str:
        with GatewayClient(target, tls_ca=ca, tls_cert=cert, tls_key=key, timeout_s=5) as client:
            return client.chat("m", "sync").message.content[0].text

    assert await asyncio.to_thread(sync_chat) == "echo: sync"
    credentials = channel_credentials(ca, cert, key)
    async with AsyncGatewayClient(target, credentials=credentials, timeout_s=5) as client:
        assert (await client.chat("m", "async")).message.content[0].text == "echo: async"
    argv = ["--target", target, "--timeout", "5", "--tls-ca", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]
    assert await asyncio.to_thread(client_cli.main, [*argv, "chat", "--model", "m", "from the cli"]) == 0
    assert "echo: from the cli" in capsys.readouterr().out.splitlines()  # (the server logs to stdout too)
    # Without the client certificate the CLI reports a failed call (exit 1), not a hang.
    assert await asyncio.to_thread(client_cli.main, [*argv[:6], "chat", "--model", "m", "x"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


async def test_cli_with_tls_ca_against_a_tls_server(
    make_gateway: GatewayFactory, openai_upstream: OpenAIEmulator, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    gateway = await tls_gateway(make_gateway, openai_upstream, pki)
    argv = ["--target", f"localhost:{gateway.running.port}", "--tls-ca", str(pki.ca_file())]
    assert await asyncio.to_thread(client_cli.main, [*argv, "chat", "--model", "m", "--stream", "streamed"]) == 0
    captured = capsys.readouterr()  # deltas on stdout (interleaved with the server's log lines)
    assert "streamed" in captured.out and '"finishReason": "FINISH_REASON_STOP"' in captured.err


def test_client_tls_arguments_are_checked(pki: Pki) -> None:
    with pytest.raises(ValueError, match="go together"):
        GatewayClient("localhost:1", tls_ca=pki.ca_file(), tls_cert=pki.cert_file)
    with pytest.raises(ValueError, match="not both"):
        GatewayClient("localhost:1", tls_ca=pki.ca_file(), credentials=grpc.ssl_channel_credentials())
    with grpc.insecure_channel("localhost:1") as channel, pytest.raises(ValueError, match="own channel"):
        GatewayClient(channel=channel, tls=True)
    with pytest.raises(SystemExit):
        client_cli.main(["--tls-ca", str(pki.directory / "missing.pem"), "models"])

"""A loopback TCP proxy in front of a real server (PostgreSQL, Redis), to make it unreachable on
demand without stopping it: `refuse()` closes the listening socket and every open connection
(connection refused, like a server that went away), `blackhole()` keeps connections open but
forwards nothing (like a partition or a frozen server: callers only see their own timeouts),
`restore()` serves again on the same port."""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    """Forwards `127.0.0.1:port` to `target_host:target_port` (see module docstring)."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._forwarding = asyncio.Event()
        self._forwarding.set()

    @property
    def port(self) -> int:
        """The proxy's port (fixed after `start`, kept across `refuse` / `restore`)."""
        return self._port

    async def start(self) -> None:
        """Listens on a free loopback port (or the previous one after `refuse`)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self._port, reuse_address=True)
        self._port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                await self._forwarding.wait()
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.close()

    def blackhole(self) -> None:
        """Stops forwarding bytes (connections stay open; new ones are accepted and hang)."""
        self._forwarding.clear()

    async def refuse(self) -> None:
        """Stops listening and closes every connection: clients get connection refused."""
        self._forwarding.set()
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def restore(self) -> None:
        """Serves again (on the same port) after `blackhole` or `refuse`."""
        self._forwarding.set()
        if self._server is None:
            await self.start()

    async def stop(self) -> None:
        """Closes everything."""
        await self.refuse()

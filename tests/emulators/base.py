"""What every loopback provider emulator shares: an aiohttp server on 127.0.0.1 (handlers are
cancelled when the client disconnects), the record of every request, and disconnect notes."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Recorded:
    """One request as the emulator saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class LoopbackEmulator:
    """Base class: subclasses add their routes in `_routes`; `start()` binds `port` (0: a free one)."""

    requests: list[Recorded] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    hang_started: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _runner: web.AppRunner | None = None

    def _routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Binds 127.0.0.1 and starts serving."""
        app = web.Application()
        self._routes(app)
        self._runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        """Stops serving."""
        if self._runner is not None:
            await self._runner.cleanup()

    def calls(self, path_suffix: str) -> list[Recorded]:
        """Recorded requests whose path ends with `path_suffix`."""
        return [r for r in self.requests if r.path.endswith(path_suffix)]

    async def _record(self, request: web.Request) -> Any:
        """Records the request; returns its JSON body (or its text when it is not JSON)."""
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            body = raw.decode(errors="replace")
        self.requests.append(Recorded(request.method, request.path, dict(request.headers), body))
        return body

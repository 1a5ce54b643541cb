"""The admin HTTP listener (aiohttp): `/metrics`, `/healthz`, `/readyz` and the chat page.

It runs on the process's own event loop, next to the gateway or the worker, so a
probe sees the state of the loop that serves clients: a loop too busy to answer
`/healthz` is one a liveness probe should restart. No access log: scrapes and
probes every few seconds would drown the events that matter.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger("portao.admin")

#: The chat page and its assets (written by the web UI; absent in a trimmed install).
STATIC_DIR = Path(__file__).with_name("static")

ReadyCheck = Callable[[], Awaitable[bool]]


def build_admin_app(
    *,
    metrics: Handler,
    ready: ReadyCheck,
    static_dir: Path = STATIC_DIR,
    routes: Sequence[web.RouteDef] = (),
) -> web.Application:
    """The admin application: `metrics` serves `/metrics`, `ready` decides `/readyz`."""

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        if await ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    app = web.Application()
    app.add_routes(
        [
            web.get("/metrics", metrics),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            *routes,
        ]
    )
    index = static_dir / "index.html"
    if index.is_file():

        async def page(request: web.Request) -> web.FileResponse:
            return web.FileResponse(index)

        app.add_routes([web.get("/", page)])
        app.router.add_static("/static", static_dir)
    return app


class AdminServer:
    """Serves an admin application on HOST:PORT (port 0: any free port)."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._host = host
        self._port = port
        self.port = 0

    async def start(self) -> None:
        """Bind and serve; raises `OSError` when the address is taken."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        self.port = self._runner.addresses[0][1]
        log.info("admin listener on http://%s:%d", self._host, self.port)

    async def aclose(self) -> None:
        await self._runner.cleanup()

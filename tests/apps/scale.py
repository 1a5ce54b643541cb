"""The demo's routes plus a few the scale and fault tests need."""

from __future__ import annotations

import asyncio
from typing import Any

from portao.demo import app as demo
from portao.worker import App, Context

app = App("scale")
for _route, _handler in demo.routes.items():
    app.route(_route)(_handler)


@app.route("poke")
async def poke(ctx: Context, data: Any) -> Any:
    """push_user to `data` (a user id), from whichever worker runs this."""
    await ctx.push_user(data, "poked", {"by": ctx.user})
    return True


@app.route("work")
async def work(ctx: Context, data: Any) -> Any:
    """Echo after a short sleep, so a worker holds messages when it is killed."""
    await asyncio.sleep(float(data.get("sleep", 0.005)))
    return data

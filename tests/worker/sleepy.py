"""A worker app for tests with real worker processes."""

from __future__ import annotations

import asyncio
from typing import Any

from portao.worker import App, Context

app = App("sleepy")


@app.route("nap")
async def nap(ctx: Context, data: Any) -> Any:
    """Sleep `data` seconds, then answer with it: a message in hand, and nothing else."""
    await asyncio.sleep(float(data))
    return data

"""Routes for the chaos suite: every run and every guarded effect is counted in Redis.

The counts are the evidence the suite judges by, so they live apart from the broker
under test: on `CHAOS_RECORD_URL` (default the shared Redis), in hashes under the
test's prefix (`PORTAO_PREFIX`), where a broker that is restarted, cut off or frozen
cannot take them along.

    {p}:chaos:runs      key -> handler runs (each attempt, each redelivery)
    {p}:chaos:effects   key -> runs of the effect guarded by `ctx.once(key)`
    {p}:chaos:running   key -> runs going on right now
    {p}:chaos:maxrun    key -> most runs of that key ever seen going on at once
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from redis.asyncio import Redis

from portao.demo import app as demo
from portao.worker import App, Context

RECORD_URL_ENV = "CHAOS_RECORD_URL"
DEFAULT_RECORD_URL = "redis://127.0.0.1:6379/0"

#: HINCRBY running, and raise maxrun to the new count if it is higher.
_ENTER = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
if n > tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0') then
  redis.call('HSET', KEYS[2], ARGV[1], n)
end
return n
"""

app = App("chaos")
app.route("echo")(demo.routes["echo"])

_record: Redis | None = None


def record_key(prefix: str, name: str) -> str:
    """The hash that counts `name` (runs, effects, running, maxrun) under `prefix`."""
    return f"{prefix}:chaos:{name}"


def _recorder() -> Redis:
    """One client per worker process, made on first use inside its event loop."""
    global _record
    if _record is None:
        _record = Redis.from_url(os.environ.get(RECORD_URL_ENV, DEFAULT_RECORD_URL))
    return _record


def _keys(*names: str) -> list[str]:
    prefix = os.environ["PORTAO_PREFIX"]
    return [record_key(prefix, name) for name in names]


@app.route("tally")
async def tally(ctx: Context, data: Any) -> Any:
    """Count the run, sleep `sleep` s (a worker killed now holds the message), then
    the effect once per key."""
    key = data["key"]
    runs, effects = _keys("runs", "effects")
    await _recorder().hincrby(runs, key, 1)
    await asyncio.sleep(float(data.get("sleep", 0)))
    if await ctx.once(key):
        await _recorder().hincrby(effects, key, 1)
    return {"key": key}


@app.route("slow")
async def slow(ctx: Context, data: Any) -> Any:
    """`tally` that outlives the visibility timeout, recording how many runs overlap."""
    key = data["key"]
    runs, effects, running, maxrun = _keys("runs", "effects", "running", "maxrun")
    record = _recorder()
    await record.hincrby(runs, key, 1)
    await record.eval(_ENTER, 2, running, maxrun, key)
    try:
        await asyncio.sleep(float(data["sleep"]))
    finally:
        await record.hincrby(running, key, -1)
    if await ctx.once(key):
        await record.hincrby(effects, key, 1)
    return {"key": key}

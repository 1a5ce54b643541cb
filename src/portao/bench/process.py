"""One load-generator process: connect its share, wait for the start, run, report.

Talks to the parent over a pipe: ("spawned") → ("connect") → ticks → ("ready")
→ ("go", start_at) → ticks → ("done", result). Ticks carry progress counters
twice a second so the parent can show a live line.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections.abc import Awaitable
from multiprocessing.connection import Connection
from typing import Any

import uvloop

from portao.bench.scenarios import SCENARIOS, Plan, Scenario

TICK_S = 0.5


def child_main(plan: Plan, pipe: Connection) -> None:
    """Entry point of a spawned load-generator process."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(_main(plan, pipe))


async def _main(plan: Plan, pipe: Connection) -> None:
    scenario = SCENARIOS[plan.scenario](plan)
    pipe.send(("spawned", None))
    await _receive(pipe)
    await _with_ticks(scenario, scenario.connect(), pipe)
    pipe.send(("ready", scenario.progress()))
    message = await _receive(pipe)
    if message[0] == "go":
        await _with_ticks(scenario, scenario.run(message[1]), pipe)
    pipe.send(("done", scenario.result()))
    await scenario.aclose()


async def _receive(pipe: Connection) -> tuple[str, Any]:
    message: tuple[str, Any] = await asyncio.to_thread(pipe.recv)
    return message


async def _with_ticks(scenario: Scenario, work: Awaitable[None], pipe: Connection) -> None:
    """Run `work`, sending progress to the parent while it runs."""
    task = asyncio.ensure_future(work)
    while not task.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), TICK_S)
        pipe.send(("tick", scenario.progress()))
    await task

"""Helpers for admin-listener tests: start one over a stack, scrape it, read values."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """One parsed `/metrics` answer: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a labelled counter that has not counted yet."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum over every sample of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


async def scrape(base: str) -> Scrape:
    status, text = await get(base + "/metrics")
    assert status == 200, text
    return Scrape(text)


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    """Wait (bounded) until `check()` holds, re-checking every 50 ms."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def status_is(url: str, status: int) -> bool:
    try:
        return (await get(url))[0] == status
    except aiohttp.ClientError:
        return False

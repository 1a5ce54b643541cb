"""End to end in a real browser: the chat page talks to `portao run` over WebSocket.

Headless Debian Chromium driven by Playwright opens the page from the admin
listener, joins a room, and chats with a TCP client. Skipped where Chromium or
Playwright is missing, except in CI (`.ci/run` installs both), where that fails.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import AsyncIterator

import pytest

from tests.conftest import IN_CI


def _missing() -> str | None:
    if shutil.which("chromium") is None:
        return "Debian's chromium is not installed (apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


if (reason := _missing()) is not None:
    if IN_CI:
        raise RuntimeError(reason + " (CI=true: the browser test must not skip)")
    pytest.skip(reason, allow_module_level=True)

from bench.screenshot_chat import (  # noqa: E402
    Portao,
    chromium,
    open_chat,
    running_portao,
    say_from_page,
)
from playwright.async_api import Browser  # noqa: E402

from portao.client import connect  # noqa: E402

pytestmark = pytest.mark.slow  # a browser and a `portao run` process: ~10 s


@pytest.fixture
async def portao() -> AsyncIterator[Portao]:
    async with running_portao() as running:
        yield running


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with chromium() as launched:
        yield launched


async def test_page_chats_with_a_tcp_client(portao: Portao, browser: Browser) -> None:
    async with await connect(portao.tcp_url, token=portao.token("alice")) as alice:
        await alice.call("chat.join", {"room": "lobby"})
        page = await open_chat(browser, portao, "bob")
        # the page's message reaches the TCP client
        await say_from_page(page, "hello from the browser")
        push = await alice.next_push(timeout_s=10)
        assert push.data == {"room": "lobby", "user": "bob", "text": "hello from the browser"}
        # the TCP client's message shows on the page, and so do both members
        await alice.call("chat.say", {"room": "lobby", "text": "hello from TCP"})
        line = page.locator("#messages li.message", has_text="hello from TCP")
        await line.wait_for(timeout=10_000)
        assert await line.locator(".who").text_content() == "alice"
        await page.locator("#who li", has_text="alice").wait_for(timeout=10_000)
        assert sorted(await page.locator("#who li").all_text_contents()) == ["alice", "bob"]

    # a refused token is shown readably, and the page does not retry it
    refused = await browser.new_page()
    await refused.goto(portao.page_url("not-a-token"))
    error = refused.locator("#messages li.error", has_text="sign-in refused")
    await error.wait_for(timeout=10_000)
    assert "unauthorized" in (await error.text_content() or "")
    assert await refused.locator("#join").is_disabled()
    assert await refused.locator("#connect").is_enabled()

"""Screenshot the browser chat page in a real conversation, so a person can look at it.

    python bench/screenshot_chat.py [OUT.png]      (default: chat.png)

Starts `portao run` (gateway, workers, admin page) on free loopback ports, joins
room `lobby` as `alice` over TCP with `portao.client` and as `bob` from the page in
headless Chromium (Debian's /usr/bin/chromium, driven by Playwright), lets them
exchange a message each way, and saves the page. The helpers are shared with the
browser end-to-end test (tests/test_browser_chat.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from playwright.async_api import Browser, Page, async_playwright

from portao.session.auth import mint_token

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT_S = 30.0
SECRET = "screenshot-secret-" + "s" * 32


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Portao:
    """A running `portao run`: where its listeners are, and tokens it accepts."""

    tcp_url: str
    ws_url: str
    admin_url: str
    process: subprocess.Popen[bytes]

    def token(self, sub: str) -> str:
        return mint_token(SECRET, sub, rooms=["*"], ttl_s=3600, now=time.time())

    def page_url(self, token: str, room: str = "lobby") -> str:
        return f"{self.admin_url}/?" + urlencode({"token": token, "ws": self.ws_url, "room": room})


@contextlib.asynccontextmanager
async def running_portao() -> AsyncIterator[Portao]:
    """`portao run` with TCP, WebSocket and admin listeners; SIGTERM (exit 0) at the end."""
    with tempfile.TemporaryDirectory(prefix="portao-run-") as tmp:
        log = Path(tmp) / "portao-run.log"
        portao = _spawn(log)
        try:
            await _wait_ready(portao, log)
            yield portao
        finally:
            code = await asyncio.to_thread(_stop, portao.process)
            if code != 0:
                text = await asyncio.to_thread(log.read_text)
                raise RuntimeError(f"portao run exited {code}; log:\n{text}")


def _spawn(log: Path) -> Portao:
    tcp, ws, admin = free_port(), free_port(), free_port()
    env = {**os.environ, "PORTAO_JWT_SECRET": SECRET, "PORTAO_PREFIX": f"shot{os.getpid()}"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "portao.cli", "run",
             "--listen", f"tcp://127.0.0.1:{tcp}", "--listen", f"ws://127.0.0.1:{ws}/",
             "--admin", f"127.0.0.1:{admin}"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    return Portao(
        f"tcp://127.0.0.1:{tcp}", f"ws://127.0.0.1:{ws}/", f"http://127.0.0.1:{admin}", process
    )


def _stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


async def _wait_ready(portao: Portao, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if portao.process.poll() is not None:
                break
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{portao.admin_url}/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.1)
    text = await asyncio.to_thread(log.read_text)
    raise RuntimeError(f"portao run did not get ready; log:\n{text}")


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Headless Debian Chromium under Playwright (never Playwright's own browser builds)."""
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


async def open_chat(browser: Browser, portao: Portao, user: str, room: str = "lobby") -> Page:
    """The chat page signed in as `user` (token from the URL), joined to `room`."""
    page = await browser.new_page(viewport={"width": 1200, "height": 760})
    await page.goto(portao.page_url(portao.token(user), room))
    await page.wait_for_selector(f"#status.online:has-text('connected as {user}')")
    await page.click("#join")
    await page.wait_for_selector(f"#messages li.system:has-text('joined {room}')")
    return page


async def say_from_page(page: Page, text: str) -> None:
    await page.fill("#text", text)
    await page.click("#send")


async def main(out: Path) -> None:
    from portao.client import connect

    async with (
        running_portao() as portao,
        chromium() as browser,
        await connect(portao.tcp_url, token=portao.token("alice")) as alice,
    ):
        await alice.call("chat.join", {"room": "lobby"})
        page = await open_chat(browser, portao, "bob")
        await alice.call("chat.say", {"room": "lobby", "text": "hi bob, this is alice on TCP"})
        await page.wait_for_selector("#messages li.message:has-text('this is alice')")
        await say_from_page(page, "hello alice, from the browser over WebSocket")
        await alice.next_push(timeout_s=5)  # her own line
        await alice.next_push(timeout_s=5)
        await page.wait_for_selector("#messages li.mine:has-text('from the browser')")
        await page.wait_for_selector("#who li:has-text('alice')")
        await page.screenshot(path=str(out))
    print(out)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else "chat.png")))

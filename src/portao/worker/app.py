"""An app: the routes a worker serves and the handler for each.

Handlers are registered by decorator so an app reads top to bottom like its API;
the CLI finds the app object by a `module:attr` path (`load_app`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

from portao.errors import ConfigError
from portao.names import is_valid_name

if TYPE_CHECKING:
    from portao.worker.context import Context

Handler = Callable[["Context", Any], Awaitable[Any]]
H = TypeVar("H", bound=Handler)


class App:
    """A named set of route handlers: `async def handler(ctx, data) -> reply`."""

    def __init__(self, name: str = "app") -> None:
        if not is_valid_name(name):
            raise ValueError(f"app name {name!r} must match [A-Za-z0-9_.:-]{{1,128}}")
        self.name = name
        self._routes: dict[str, Handler] = {}

    def __repr__(self) -> str:
        return f"App({self.name!r}, routes={sorted(self._routes)})"

    @property
    def routes(self) -> Mapping[str, Handler]:
        """Route name -> handler, read-only (registration goes through `route`)."""
        return MappingProxyType(self._routes)

    def route(self, name: str) -> Callable[[H], H]:
        """Register the decorated coroutine function as the handler of `name`.

        Checked here, at import time, so a bad app fails before it takes work.
        """
        if not is_valid_name(name):
            raise ValueError(f"route name {name!r} must match [A-Za-z0-9_.:-]{{1,128}}")
        if name in self._routes:
            raise ValueError(f"route {name!r} is already registered in app {self.name!r}")

        def register(handler: H) -> H:
            target: object = handler  # keep `handler` typed H past the check below
            if not inspect.iscoroutinefunction(target):
                raise TypeError(f"handler for route {name!r} must be an async function")
            if name in self._routes:
                raise ValueError(f"route {name!r} is already registered in app {self.name!r}")
            self._routes[name] = handler
            return handler

        return register


def load_app(path: str) -> App:
    """Import `module:attr` (attr defaults to `app`) and return the App it names.

    The current directory goes on `sys.path` first when it is not there (as uvicorn
    and celery do): the installed `portao` script does not put it there, and
    `portao run mymodule:app` beside mymodule.py must find it.
    """
    module_name, _, attr = path.partition(":")
    attr = attr or "app"
    if not module_name:
        raise ConfigError(f"app {path!r}: expected 'module:attr', e.g. 'portao.demo:app'")
    cwd = os.getcwd()
    if cwd not in (os.path.abspath(entry) for entry in sys.path):
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing app module is the user's path error; a missing import
        # inside the app is the app's own bug and keeps its traceback.
        if exc.name is None or not _is_prefix(exc.name, module_name):
            raise
        raise ConfigError(f"app {path!r}: no module named {exc.name!r}") from None
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"app {path!r}: module {module_name!r} has no {attr!r}") from None
    if not isinstance(obj, App):
        raise ConfigError(f"app {path!r}: {attr!r} is a {type(obj).__name__}, not a portao App")
    return obj


def _is_prefix(missing: str, module_name: str) -> bool:
    """True when `missing` is `module_name` or one of its parent packages."""
    return module_name == missing or module_name.startswith(missing + ".")

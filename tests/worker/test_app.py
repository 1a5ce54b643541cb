"""App registration rules and `load_app`, the CLI's way to find an app."""

from __future__ import annotations

from typing import Any

import pytest

from portao.errors import ConfigError
from portao.worker import App, Context, load_app


def test_route_registers_the_handler() -> None:
    app = App("a")

    @app.route("x.y")
    async def handler(ctx: Context, data: Any) -> Any:
        return data

    assert dict(app.routes) == {"x.y": handler}
    with pytest.raises(TypeError):
        app.routes["z"] = handler  # type: ignore[index]


def test_bad_and_duplicate_routes_are_refused() -> None:
    app = App()

    @app.route("dup")
    async def first(ctx: Context, data: Any) -> Any: ...

    with pytest.raises(ValueError, match="already registered"):
        app.route("dup")
    with pytest.raises(ValueError, match="route name 'no spaces'"):
        app.route("no spaces")
    with pytest.raises(TypeError, match="must be an async function"):
        app.route("sync")(lambda ctx, data: data)
    with pytest.raises(ValueError, match="app name"):
        App("")


def test_load_app_finds_the_demo() -> None:
    from portao.demo import app

    assert load_app("portao.demo:app") is app
    assert load_app("portao.demo") is app


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_x:app", "no module named 'no_such_module_x'"),
        ("portao.no_such:app", "no module named 'portao.no_such'"),
        ("portao.demo:nothing", "has no 'nothing'"),
        ("portao.demo:App", "not a portao App"),
        (":app", "expected 'module:attr'"),
    ],
)
def test_load_app_says_what_is_missing(path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_app(path)


def test_load_app_keeps_the_apps_own_import_errors(tmp_path: Any, monkeypatch: Any) -> None:
    (tmp_path / "broken_app_mod.py").write_text("import no_such_dependency_x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_x"):
        load_app("broken_app_mod:app")

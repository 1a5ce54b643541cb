"""The sans-I/O layers (wire, session, routing) never import I/O or a clock.

They take `now` as an argument and return the work to do; only the asyncio shell
owns sockets and timers. This walks every module of those packages and scans its
source for forbidden imports, including imports of portao's own I/O layers.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

SANS_IO_PACKAGES = ["portao.wire", "portao.session", "portao.routing"]
FORBIDDEN = {"asyncio", "socket", "selectors", "ssl", "uvloop", "time"}
FORBIDDEN_PORTAO = {"portao.gateway", "portao.worker", "portao.client", "portao.cli"}


def sans_io_modules() -> list[str]:
    names = []
    for package_name in SANS_IO_PACKAGES:
        package = importlib.import_module(package_name)
        names.append(package_name)
        for info in pkgutil.walk_packages(package.__path__, package_name + "."):
            names.append(info.name)
    return names


def imported_names(tree: ast.AST, package: str) -> list[str]:
    """Absolute names imported by a module of `package` (relative imports resolved)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            found += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return found


def is_forbidden(name: str) -> bool:
    if name.split(".")[0] in FORBIDDEN:
        return True
    return any(name == p or name.startswith(p + ".") for p in FORBIDDEN_PORTAO)


@pytest.mark.parametrize("module", sans_io_modules())
def test_no_io_imports(module: str) -> None:
    spec = importlib.util.find_spec(module)
    assert spec is not None
    assert spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text(), filename=spec.origin)
    package = module if spec.submodule_search_locations else module.rpartition(".")[0]
    bad = sorted({name for name in imported_names(tree, package) if is_forbidden(name)})
    assert bad == [], f"{module} imports {bad}: sans-I/O layers take `now` as an argument"


def test_the_scan_sees_the_wire_codecs() -> None:
    assert {"portao.wire.framing", "portao.wire.messages"} <= set(sans_io_modules())


def test_the_scan_catches_forbidden_imports() -> None:
    tree = ast.parse("import time\nfrom asyncio import sleep\nfrom ..gateway import x\n")
    names = imported_names(tree, "portao.session")
    assert [n for n in names if is_forbidden(n)] == [
        "time",
        "asyncio",
        "asyncio.sleep",
        "portao.gateway",
        "portao.gateway.x",
    ]

"""The deployment files parse, and every portao command line in them is valid.

No container engine or cluster exists here, so the files cannot run in CI; this
checks what can go wrong without one: syntax, the portao flags and settings each
command passes (through `portao config show`), probes aimed at the admin port,
and stop grace periods longer than the drain.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from portao.cli import main
from portao.supervisor import KILL_GRACE_S

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("PORTAO_"):
            monkeypatch.delenv(key)


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "jwt_secret"
    path.write_text("deploy-test-secret-" + "d" * 32)
    return str(path)


def effective(args: list[str], env: dict[str, str], secret_file: str) -> dict[str, Any]:
    """The settings `portao ARGS` would run with (the command's flags and `env`)."""
    command, *rest = args
    assert command in ("gateway", "worker")
    if command == "worker" and rest and not rest[0].startswith("--"):
        rest = rest[1:]  # the app
    env = {k: secret_file if k == "PORTAO_JWT_SECRET_FILE" else v for k, v in env.items()}
    result = CliRunner().invoke(main, ["config", "show", *rest], env=env)
    assert result.exit_code == 0, (args, result.output)
    shown: dict[str, Any] = json.loads(result.output)
    return shown


def admin_port(settings: dict[str, Any]) -> int:
    assert settings["admin"], "no admin listener: nothing for probes"
    return int(settings["admin"].rpartition(":")[2])


def expand(value: str) -> str:
    """Compose's `${VAR:-default}` with VAR unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_compose_has_brokers_two_gateways_two_workers(secret_file: str) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "rabbitmq", "gateway-1", "gateway-2", "worker-1", "worker-2"}
    host_ports: list[str] = []
    for name in ("gateway-1", "gateway-2", "worker-1", "worker-2"):
        service = services[name]
        env = {k: expand(str(v)) for k, v in service["environment"].items()}
        settings = effective(service["command"], env, secret_file)
        assert settings["broker"].startswith("redis://redis:")
        port = admin_port(settings)
        assert f"127.0.0.1:{port}/readyz" in " ".join(service["healthcheck"]["test"])
        assert int(service["stop_grace_period"].rstrip("s")) >= settings["drain_timeout_s"] + 5
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        gateway = name.startswith("gateway")
        assert ("portao_jwt" in service.get("secrets", [])) == gateway
        host_ports += [p.split(":")[0] for p in service.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)) == 6
    assert set(compose["secrets"]) == {"portao_jwt"}


@pytest.mark.parametrize("name", ["gateway.yaml", "worker.yaml"])
def test_kubernetes_probes_hit_the_admin_port_and_stops_outlast_the_drain(
    name: str, secret_file: str
) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()))
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = effective(container["args"], env, secret_file)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["admin"] == admin_port(settings)
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["admin"]
    pre_stop = 0
    if settings["listen"]:  # a gateway: leave the endpoints before draining
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        assert command[0] == "sleep"
        pre_stop = int(command[1])
        assert "jwt" in {v["name"] for v in pod["volumes"]}
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + settings["drain_timeout_s"] + 5


def test_systemd_unit_stops_through_the_supervisor(secret_file: str) -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string((DEPLOY / "portao-gateway.service").read_text())
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/portao")
    flags = argv[1:]
    at = flags.index("--config")
    del flags[at : at + 2]  # the host's file, absent here
    settings = effective(flags, {"PORTAO_JWT_SECRET_FILE": "x"}, secret_file)
    assert settings["processes"] > 1
    assert (service["KillSignal"], service["KillMode"]) == ("SIGTERM", "mixed")
    assert int(service["TimeoutStopSec"]) > settings["drain_timeout_s"] + KILL_GRACE_S
    assert "PORTAO_JWT_SECRET_FILE=%d/jwt_secret" in service["Environment"]
    assert int(service["LimitNOFILE"]) >= 65536


def test_dockerfile_runs_portao_unprivileged_with_the_admin_port_exposed(
    secret_file: str,
) -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    instructions = {line.split()[0]: line.split(maxsplit=1)[1] for line in lines}
    assert json.loads(instructions["ENTRYPOINT"]) == ["portao"]
    assert instructions["USER"] not in ("root", "0")
    assert instructions["STOPSIGNAL"] == "SIGTERM"
    settings = effective(json.loads(instructions["CMD"]), {}, secret_file)
    assert str(admin_port(settings)) in instructions["EXPOSE"].split()
    assert [line.split()[0] for line in lines].count("FROM") == 2  # build, then runtime

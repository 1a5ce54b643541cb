"""Settings: file < environment < flags, errors that name the setting, secrets kept out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from portao.cli import settings_reference
from portao.config import (
    COMMAND_SETTINGS,
    Settings,
    describe_os_error,
    for_command,
    load_settings,
    mask_url,
)
from portao.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SECRET = "config-test-secret-" + "k" * 32


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("PORTAO_"):
            monkeypatch.delenv(key)


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "portao.toml"
    path.write_text(text)
    return path


def test_precedence_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = toml(tmp_path, "[portao]\nrate-burst = 10\nprefix = 'file'\ncall_timeout_s = 3\n")
    monkeypatch.setenv("PORTAO_PREFIX", "env")
    monkeypatch.setenv("PORTAO_CALL_TIMEOUT_S", "4")
    monkeypatch.setenv("PORTAO_LISTEN", '["tcp://127.0.0.1:1"]')
    settings = load_settings(path, call_timeout_s=5.0, max_frame_bytes=None)
    assert settings.rate_burst == 10  # file (dashes accepted)
    assert settings.prefix == "env"  # env beats file
    assert settings.call_timeout_s == 5.0  # flag beats both
    assert settings.listen == ["tcp://127.0.0.1:1"]
    assert settings.max_frame_bytes == 65536  # an unset flag falls through


def test_rules_across_settings_see_the_merged_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Alone, heartbeat 20 s is longer than the default presence TTL; with the file's
    # TTL it is fine. Validating the environment on its own would have refused it.
    monkeypatch.setenv("PORTAO_HEARTBEAT_S", "20")
    settings = load_settings(toml(tmp_path, "presence_ttl_s = 60\n"))
    assert (settings.heartbeat_s, settings.presence_ttl_s) == (20, 60)
    with pytest.raises(ConfigError, match="heartbeat_s must be shorter than presence_ttl_s"):
        load_settings(toml(tmp_path, "presence_ttl_s = 10\n"))


@pytest.mark.parametrize(
    ("env", "file", "flags", "expected"),
    [
        ({"PORTAO_MAX_FRAME_BYTES": "lots"}, "", {},
         "max_frame_bytes (from environment PORTAO_MAX_FRAME_BYTES)"),
        ({"PORTAO_LISTEN": "tcp://x:1"}, "", {},
         "listen (from environment PORTAO_LISTEN): not valid JSON"),
        ({}, "max_fram_bytes = 1\n", {},
         "unknown setting 'max_fram_bytes' (from config file"),
        ({}, "max_fram_bytes = 1\n", {}, "did you mean 'max_frame_bytes'?"),
        ({}, "rate_burst = 'many'\n", {}, "rate_burst (from config file"),
        ({}, "", {"admin": "localhost"}, "admin (from flag --admin): expected HOST:PORT"),
        ({}, "", {"processes": 0}, "processes (from flag --processes)"),
        ({}, "", {"jwt_secret_file": "/nonexistent/secret"},
         "jwt_secret_file: '/nonexistent/secret' is not a readable file"),
        ({"PORTAO_JWT_SECRET": SECRET}, "", {"jwt_secret_file": __file__},
         "jwt_secret and jwt_secret_file: set one, not both"),
        ({}, "prefix = [1\n", {}, "config file"),
        ({}, "prefix = 'top'\n[portao]\nrate_burst = 1\n", {},
         "settings both in [portao] and at the top level (prefix)"),
        ({"PORTAO_JWT_SECRET": "short"}, "", {},
         "jwt_secret (from environment PORTAO_JWT_SECRET): the HS256 secret must be at least "
         "32 bytes"),
        ({}, "", {"broker": "redis://:pw@[::1/0"}, "broker (from flag --broker): malformed URL"),
        ({}, "", {"state": "redis://:pw@h:port/0"}, "state (from flag --state): malformed URL"),
    ],
)  # fmt: skip
def test_bad_values_name_the_setting_and_where_it_came_from(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    file: str,
    flags: dict[str, object],
    expected: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as caught:
        load_settings(toml(tmp_path, file) if file else None, **flags)
    assert expected in str(caught.value)
    assert SECRET not in str(caught.value)


def test_secret_from_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    settings = load_settings(jwt_secret_file=secret_file)
    assert settings.jwt_key() == SECRET
    assert SECRET not in repr(settings)
    secret_file.write_text("s" * 31 + "\n")
    with pytest.raises(ConfigError, match=r"the secret in .* must be at least 32 bytes"):
        load_settings(jwt_secret_file=secret_file)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("amqp://app:pw@rabbit:5672/v", "amqp://app:**********@rabbit:5672/v"),
        ("redis://:pw@[::1/0", "redis://:**********@[::1/0"),  # urlsplit refuses it
        ("amqp://app:p/w#x@rabbit/", "amqp://app:**********@rabbit/"),  # unquoted / and #
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("redis://user@cache/0", "redis://user@cache/0"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_for_command_fills_only_what_is_unset() -> None:
    unset = Settings()
    assert for_command(unset, "run").listen == ["tcp://127.0.0.1:7878", "ws://127.0.0.1:7879"]
    assert for_command(unset, "gateway").admin_address is None
    given = Settings(listen=["tcp://127.0.0.1:1"], admin="127.0.0.1:2")
    assert for_command(given, "gateway") == given
    assert set().union(*COMMAND_SETTINGS.values()) <= set(Settings.model_fields)


def test_describe_os_error() -> None:
    assert describe_os_error(ConnectionRefusedError(111, "Connect call failed")) == (
        "connection refused"
    )
    assert describe_os_error(OSError(-2, "Name or service not known")) == (
        "name or service not known"
    )
    assert describe_os_error(TimeoutError()) == "timed out"


def test_repr_and_public_dict_hide_secrets_and_url_passwords(tmp_path: Path) -> None:
    settings = Settings(
        jwt_secret=SECRET,
        broker="amqp://app:hunter2-pw@rabbit:5672/vhost",
        state="redis://:redis-pw@cache:6379/0",
    )
    shown = settings.public_dict()
    assert shown["jwt_secret"] == "**********"
    assert shown["broker"] == "amqp://app:**********@rabbit:5672/vhost"
    assert shown["state"] == "redis://:**********@cache:6379/0"
    for text in (repr(settings), json.dumps(shown)):
        for secret in (SECRET, "hunter2-pw", "redis-pw"):
            assert secret not in text


def portao(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PORTAO_")}
    return subprocess.run(
        [sys.executable, "-m", "portao.cli", *args], capture_output=True, text=True,
        env={**clean, **env}, timeout=60, cwd=ROOT,
    )  # fmt: skip


def test_config_show_never_prints_a_secret(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("file-secret-" + "f" * 32)
    from_env = portao(
        "config", "show", "--broker", "redis://:pw-in-url@127.0.0.1:6379/0",
        env={"PORTAO_JWT_SECRET": SECRET},
    )  # fmt: skip
    from_file = portao("config", "show", "--jwt-secret-file", str(secret_file), env={})
    for result in (from_env, from_file):
        assert result.returncode == 0, result.stderr
        for secret in (SECRET, "pw-in-url", "file-secret-"):
            assert secret not in result.stdout + result.stderr
    assert json.loads(from_file.stdout)["jwt_secret_file"] == str(secret_file)
    bad = portao("config", "show", env={"PORTAO_ADMIN": "nope", "PORTAO_JWT_SECRET": SECRET})
    assert bad.returncode == 2
    assert "admin (from environment PORTAO_ADMIN)" in bad.stderr
    assert SECRET not in bad.stderr


def test_the_docs_list_every_setting() -> None:
    """docs/configuration.md carries `portao config reference` verbatim."""
    docs = (ROOT / "docs" / "configuration.md").read_text()
    table = settings_reference()
    assert table in docs, "regenerate the table with `portao config reference`"
    for name in Settings.model_fields:
        assert f"| `{name}` |" in table

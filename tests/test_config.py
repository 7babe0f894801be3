"""Settings: every variable validated at startup, every bad one reported on its own line, exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.config import ENV_DOCS, Settings
from service.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

# The values a new user tried; each was accepted (or crashed) before settings were validated.
BAD = {
    "HEALTH_CHECK_INTERVAL_S": "nan",
    "SHUTDOWN_GRACE_S": "-5",
    "RETRY_MAX_RETRIES": "-3",
    "METRICS_PORT": "99999",
    "REQUEST_TIMEOUT_S": "inf",
    "GRPC_LISTEN_ADDRESS": "localhost:abc",
    "LOG_LEVEL": "verbose",
}


def test_startup_refuses_every_bad_variable_with_one_line_each() -> None:
    env = {k: v for k, v in os.environ.items() if k not in BAD} | BAD
    proc = subprocess.run(
        [sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert len(lines) == len(BAD), lines
    for var, value in BAD.items():
        (line,) = [ln for ln in lines if f"{var}=" in ln]
        assert value.upper() in line.upper(), line  # the value as given
        assert line.startswith("configuration error: ")


@pytest.mark.parametrize(
    ("var", "value", "accepted"),
    [
        ("HEALTH_CHECK_INTERVAL_S", "nan", "finite number"),
        ("REQUEST_TIMEOUT_S", "inf", "finite number"),
        ("SHUTDOWN_GRACE_S", "-5", "greater than or equal to 0"),
        ("RETRY_MAX_RETRIES", "-3", "greater than or equal to 0"),
        ("METRICS_PORT", "99999", "less than or equal to 65535"),
        ("GRPC_LISTEN_ADDRESS", "localhost:abc", "host:port"),
        ("LOG_LEVEL", "verbose", "'DEBUG', 'INFO', 'WARNING', 'ERROR' or 'CRITICAL'"),
        ("HEALTH_FAILURE_THRESHOLD", "0", "greater than 0"),
    ],
)
def test_each_bad_value_says_what_is_accepted(var: str, value: str, accepted: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({var: value})
    assert var in str(info.value) and accepted in str(info.value)


def test_secret_values_never_appear_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"ANTHROPIC_API_KEY": "sk-ant-visible", "METRICS_PORT": "-1", "NOT_A_SETTING": "x"})
    assert "sk-ant-visible" not in str(info.value)


def test_good_values_parse() -> None:
    s = Settings.from_env(
        {
            "LOG_LEVEL": "debug",
            "GRPC_LISTEN_ADDRESS": "[::1]:0",
            "PROVIDER_ORDER": "Anthropic, local",
            "METRICS_PORT": "0",
        }
    )
    assert s.log_level == "DEBUG" and s.provider_order == ("anthropic", "local")
    assert Settings.from_env({"GRPC_LISTEN_ADDRESS": "unix:/tmp/gw.sock"}).grpc_listen_address == "unix:/tmp/gw.sock"


def test_direct_construction_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_CONCURRENT_REQUESTS", "7")
    assert Settings().max_concurrent_requests == 32
    assert Settings.from_env().max_concurrent_requests == 7


def test_replace_validates() -> None:
    with pytest.raises(ConfigError, match="METRICS_PORT"):
        Settings().replace(metrics_port=70000)


def test_every_setting_is_documented() -> None:
    documented = " ".join(v for v, _, _ in ENV_DOCS)
    missing = [name.upper() for name in Settings.model_fields if name.upper() not in documented]
    assert not missing

"""The `gateway` command line: token minting and config checks, as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jwt

SECRET = "c" * 40


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=30,
                          env=full_env)


def test_example_config_is_valid_and_holds_no_secret() -> None:
    result = run("check-config", "config/gateway.yaml",
                 env={"STRATIX_API_KEY": "ll_example", "GATEWAY_JWT_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    text = Path("config/gateway.yaml").read_text()
    assert "${STRATIX_API_KEY}" in text and "${GATEWAY_JWT_SECRET}" in text


def test_token_command_mints_a_verifiable_token() -> None:
    result = run("token", "--config", "config/gateway.yaml", "--sub", "dev", "--ttl", "120",
                 "--claim", 'streams=["evaluations/*"]', "--claim", "team=red",
                 env={"STRATIX_API_KEY": "ll_example", "GATEWAY_JWT_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "dev" and claims["streams"] == ["evaluations/*"] and claims["team"] == "red"
    assert 100 <= claims["exp"] - claims["iat"] <= 120


def test_token_command_reports_bad_claims_and_missing_secret() -> None:
    bad = run("token", "--config", "config/gateway.yaml", "--sub", "dev", "--claim", "novalue",
              env={"STRATIX_API_KEY": "ll_example", "GATEWAY_JWT_SECRET": SECRET})
    assert bad.returncode != 0 and "NAME=VALUE" in bad.stderr
    unset = run("token", "--config", "config/gateway.yaml", "--sub", "dev",
                env={"STRATIX_API_KEY": "ll_example", "GATEWAY_JWT_SECRET": ""})
    assert unset.returncode != 0 and "GATEWAY_JWT_SECRET is not set" in unset.stderr

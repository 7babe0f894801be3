"""Proves the Dockerfile's image without Docker: replays it in Debian bookworm roots made by debootstrap.

No Docker engine runs on the development or CI machines, so ``docker build`` never runs here.
Instead, every run of ``python scripts/image/check.py`` (scripts/test.sh runs it):

1. Base root, cached under IMAGE_CHECK_CACHE (default /var/cache/inference-gateway/image-check):
   ``debootstrap --variant=minbase bookworm`` (what debian:bookworm-slim is made of), the Debian
   libraries python:3.11-slim-bookworm keeps for its interpreter, and Debian's python3.11 standing
   in for the image's /usr/local/bin/python3.11 (``python`` links to it). The packages only that
   stand-in brings are recorded, so a wheel that resolves a library only through them still fails.
2. Wheels: the host's pip downloads every lock file the Dockerfile COPYs, checking each hash.
3. Replay: each stage of the Dockerfile, in a fresh copy of the base root: ENV, WORKDIR, COPY
   (from this checkout, or from an earlier stage), RUN (``/bin/sh -c`` in a chroot, as USER), all as
   written. The one departure: pip finds the wheels in a local folder (PIP_NO_INDEX, PIP_FIND_LINKS);
   their hashes are still checked by --require-hashes. apt-get reaches the Debian mirror as in Docker.
4. Libraries: ``ldd`` inside the final root on every ELF file under /opt/venv: none may be missing,
   and none may come from a package only the stand-in interpreter brought.
5. Service: ENTRYPOINT as USER with the image's ENV (bound to a free loopback port instead of
   0.0.0.0), the HEALTHCHECK command until it passes, one Chat against the embedded model over the
   generated stubs, SIGTERM, exit status 0.
6. Control: the final stage's apt packages (libgomp1) are purged and ``ldd`` runs again: it must now
   report the libraries they provided as missing, or the check in step 4 proves nothing.

It skips (exit 0, with the reason) only when debootstrap cannot be had: not Linux, not root, or
``apt-get install debootstrap`` fails. Anything else that goes wrong is a failure (exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dockerfile  # sibling modules, not an installed package
import rootfs
from rootfs import CheckFailed, Replayed, admin_env, in_root, run_in, say

#: In the image lock only to build the project; the build stage removes it.
BUILD_ONLY = frozenset({"setuptools"})
CHAT = """
import json, sys
import grpc
from inference.v1 import inference_pb2 as pb, inference_pb2_grpc as rpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    reply = rpc.InferenceServiceStub(channel).Chat(
        pb.ChatRequest(messages=[pb.Message(role=pb.ROLE_USER, content="Say hello")], max_tokens=8),
        timeout=120,
    )
print(json.dumps({"provider": reply.provider, "text": reply.message.content,
                  "completion_tokens": reply.usage.completion_tokens}))
"""


# -- 4. libraries ------------------------------------------------------------------------------


def elf_files(root: Path, tree: str) -> list[str]:
    """In-root paths of the ELF files (not symlinks) under tree."""
    found: list[str] = []
    for path in sorted((root / tree.lstrip("/")).rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    found.append("/" + str(path.relative_to(root)))
    return found


def ldd(root: Path, files: Sequence[str]) -> tuple[dict[str, list[str]], set[str]]:
    """ldd inside root: {file: missing sonames} for files that miss any, and every system library
    (outside /opt/venv) something resolved to."""
    script = 'for f in "$@"; do echo "@@ $f"; ldd "$f" 2>&1 || true; done'
    out = run_in(root, ["/bin/sh", "-c", script, "sh", *files], env=admin_env(), capture=True, timeout_s=600)
    missing: dict[str, list[str]] = {}
    system: set[str] = set()
    current = ""
    for line in out.stdout.splitlines():
        if line.startswith("@@ "):
            current = line[3:]
        elif "=> not found" in line:
            missing.setdefault(current, []).append(line.split("=>")[0].strip())
        elif "=>" in line:
            target = line.split("=>")[1].strip().split(" (")[0]
            if target and not target.startswith("/opt/venv/"):
                system.add(target)
    return missing, system


def owners(root: Path, libraries: set[str]) -> dict[str, str]:
    """{library path: Debian package} for the libraries dpkg knows (usr-merge aware)."""
    patterns = sorted({f"*/{os.path.basename(p)}" for p in libraries})
    result = subprocess.run(
        in_root(root, ["dpkg-query", "-S", *patterns], env=admin_env()), text=True, capture_output=True, timeout=120
    )
    by_name: dict[str, str] = {}
    for line in result.stdout.splitlines():
        package, _, path = line.partition(": ")
        by_name.setdefault(os.path.basename(path), package.split(":")[0])
    return {p: by_name[os.path.basename(p)] for p in libraries if os.path.basename(p) in by_name}


def normalize(name: str) -> str:
    """A distribution name in PEP 503 form."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins(*locks: Path) -> dict[str, str]:
    """{name: version} of every pin in the lock files."""
    pins: dict[str, str] = {}
    for lock in locks:
        for name, version in re.findall(r"^([A-Za-z0-9][\w.-]*)==(\S+)", lock.read_text(), re.MULTILINE):
            pins[normalize(name)] = version
    return pins


def check_contents(final: Replayed) -> None:
    """The final venv holds exactly the image lock's pins (its build backend excepted), the model,
    the project and the venv's own pip: nothing unlocked, no build tool, no grpcio-tools."""
    site = next((final.root / "opt/venv/lib").glob("python3*/site-packages"))
    installed = {
        normalize(n): v for n, v in (d.name.removesuffix(".dist-info").rsplit("-", 1) for d in site.glob("*.dist-info"))
    }
    expected = lock_pins(rootfs.REPO / "requirements-image.lock", rootfs.REPO / "requirements-model.lock")
    expected = {n: v for n, v in expected.items() if n not in BUILD_ONLY}
    expected["inference-gateway"] = installed.get("inference-gateway", "(missing)")
    expected["pip"] = installed.get("pip", "(missing)")
    extra = sorted(f"{n}=={v}" for n, v in installed.items() if expected.get(n) != v)
    lacking = sorted(f"{n}=={v}" for n, v in expected.items() if installed.get(n) != v)
    if extra or lacking or "(missing)" in expected.values():
        raise CheckFailed(f"the final venv differs from the lock: not locked {extra}; locked but absent {lacking}")
    say(f"contents: the final venv holds the {len(expected) - 2} locked distributions and the project, no build tools")


def check_libraries(final: Replayed) -> list[str]:
    """Step 4; returns the ELF files checked."""
    files = elf_files(final.root, "/opt/venv")
    if not files:
        raise CheckFailed("no ELF file under /opt/venv: the replay installed nothing?")
    missing, system = ldd(final.root, files)
    if missing:
        lines = [f"  {f}: {', '.join(libs)}" for f, libs in missing.items()]
        raise CheckFailed("libraries missing in the final image:\n" + "\n".join(lines))
    standin_only = set((final.root / rootfs.STATE_IN_ROOT / "standin-only-packages").read_text().split())
    owned = owners(final.root, system)
    problems = [f"  {lib}: not from any Debian package" for lib in sorted(system - owned.keys())]
    problems += [
        f"  {lib}: from {pkg}, which only the check's stand-in interpreter brought (the image lacks it)"
        for lib, pkg in sorted(owned.items())
        if pkg in standin_only
    ]
    if problems:
        raise CheckFailed("libraries resolved only inside the check's root:\n" + "\n".join(problems))
    packages = sorted(set(owned.values()))
    say(f"ldd: {len(files)} ELF files under /opt/venv resolve every library (system ones from {', '.join(packages)})")
    return files


def control_without_apt_packages(final: Replayed, files: Sequence[str]) -> None:
    """Step 6: purge what the final stage's apt-get installed; ldd must now miss what they provided."""
    names = [p.split("=")[0] for p in final.apt_packages]
    if not names:
        say("control: the final stage installs no apt packages; nothing to take away")
        return
    run_in(final.root, ["dpkg", "--purge", *names], env=admin_env(), capture=True, timeout_s=120)
    missing, _ = ldd(final.root, files)
    if not missing:
        raise CheckFailed(
            f"control: without {', '.join(names)} every library still resolves, so the ldd step cannot tell "
            "they are needed; if no wheel needs them any more, drop them from the Dockerfile"
        )
    shown = "; ".join(f"{f.removeprefix('/opt/venv/lib/python3.11/site-packages/')} needs {', '.join(libs)}"
                      for f, libs in missing.items())  # fmt: skip
    say(f"control: without {', '.join(names)}, ldd reports missing: {shown}")


# -- 5. service --------------------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the chroot shares the host's network)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def namespace_child(pid: int) -> int | None:
    """The pid of unshare's forked child (the namespace's init), once it exists."""
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return int(children[0]) if children else None
    return None


def run_service(final: Replayed, log_path: Path) -> None:
    """Step 5: ENTRYPOINT, HEALTHCHECK, one Chat, SIGTERM."""
    if not final.entrypoint or not final.healthcheck:
        raise CheckFailed("the final stage declares no ENTRYPOINT or no HEALTHCHECK")
    if final.user in (None, "0", "0:0"):
        raise CheckFailed("the final stage runs as root")
    address = f"127.0.0.1:{free_port()}"
    env = {**final.env, "HOME": rootfs.home_of(final.root, final.user), "GRPC_LISTEN_ADDRESS": address}
    with log_path.open("w") as log:
        started = time.monotonic()
        service = subprocess.Popen(
            in_root(final.root, final.entrypoint, env=env, user=final.user), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            while True:
                probe = subprocess.run(
                    in_root(final.root, final.healthcheck, env=env, user=final.user), capture_output=True, timeout=30
                )
                if probe.returncode == 0:
                    break
                if service.poll() is not None:
                    raise CheckFailed(f"the service exited {service.returncode} before serving:\n{tail(log_path)}")
                if time.monotonic() - started > 180:
                    raise CheckFailed(f"the HEALTHCHECK did not pass within 180 s:\n{tail(log_path)}")
                time.sleep(1)
            say(f"service up as uid {final.user.split(':')[0]}: HEALTHCHECK {' '.join(final.healthcheck)} passed "
                f"after {time.monotonic() - started:.1f} s")  # fmt: skip
            chat = run_in(
                final.root, ["python", "-c", CHAT, address], env=env, user=final.user, capture=True, timeout_s=180
            )
            reply = json.loads(chat.stdout.strip().splitlines()[-1])
            if reply["provider"] != "local" or reply["completion_tokens"] < 1:
                raise CheckFailed(f"unexpected Chat reply from the embedded model: {reply}")
            say(f"Chat answered by the embedded model: {reply['text']!r} ({reply['completion_tokens']} tokens)")
            child = namespace_child(service.pid)
            if child is None:
                raise CheckFailed("could not find the service's process to stop it")
            os.kill(child, signal.SIGTERM)
            status = service.wait(timeout=60)
            if status != 0:
                raise CheckFailed(f"after SIGTERM the service exited {status}:\n{tail(log_path)}")
            say("SIGTERM: the service drained and exited 0")
        finally:
            if service.poll() is None:
                service.kill()  # --kill-child takes the whole namespace with it
                service.wait(timeout=30)


def tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file, indented."""
    return "\n".join("  " + line for line in path.read_text(errors="replace").splitlines()[-lines:])


# -- main --------------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(cache: Path) -> Iterator[None]:
    """One run at a time per cache (two CI checkouts on one machine share it)."""
    with (cache / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the check; 0 when the image holds (or the check had to skip), 1 when it does not."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dockerfile", type=Path, default=rootfs.REPO / "Dockerfile")
    default_cache = os.environ.get("IMAGE_CHECK_CACHE", "/var/cache/inference-gateway/image-check")
    parser.add_argument("--cache", type=Path, default=Path(default_cache))
    options = parser.parse_args(argv)
    reason = rootfs.debootstrap_unavailable()
    if reason:
        say(f"SKIPPED: {reason}. The image is NOT verified on this machine.")
        return 0
    started = time.monotonic()
    try:
        stages = dockerfile.parse(options.dockerfile.read_text())
        options.cache.mkdir(parents=True, exist_ok=True)
        with locked(options.cache):
            base = rootfs.base_root(options.cache)
            wheels = rootfs.download_wheels(options.cache, rootfs.lock_files(stages))
            work = options.cache / "run"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            replayed = rootfs.replay(stages, base, work, wheels)
            final = replayed[-1]
            check_contents(final)
            files = check_libraries(final)
            run_service(final, work / "service.log")
            control_without_apt_packages(final, files)
            shutil.rmtree(work)
    except (CheckFailed, dockerfile.Unsupported, subprocess.TimeoutExpired) as exc:
        say(f"FAILED: {exc}")
        return 1
    say(f"passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate the Python stubs for protos/ into gen/ (importable as ``inference.v1``).

Usage: ``python scripts/gen_protos.py`` to write, ``python scripts/gen_protos.py --check`` to
fail (exit 1) when the committed stubs differ from what the protos generate.
"""

from __future__ import annotations

import filecmp
import pathlib
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "gen"


def generate(out: pathlib.Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *protos,
        ],
        check=True,
    )
    # protoc writes no package markers; add them so `import inference.v1` works.
    for d in [p for p in out.rglob("*") if p.is_dir()]:
        (d / "__init__.py").touch()


def main() -> int:
    if "--check" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = pathlib.Path(tmp)
            generate(fresh)
            stale = [
                str(p.relative_to(fresh))
                for p in fresh.rglob("*")
                if p.is_file()
                and not (
                    (OUT / p.relative_to(fresh)).is_file() and filecmp.cmp(p, OUT / p.relative_to(fresh), shallow=False)
                )
            ]
            if stale:
                print(f"stale generated stubs: {stale}; run `python scripts/gen_protos.py`")
                return 1
            print("generated stubs are up to date")
            return 0
    shutil.rmtree(OUT / "inference", ignore_errors=True)
    generate(OUT)
    print(f"wrote stubs to {OUT.relative_to(ROOT)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

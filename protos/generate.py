"""Regenerate the checked-in Python code for the service API: `python protos/generate.py`.

Runs grpcio-tools' bundled protoc on every .proto under protos/ with the repository root as
the include path, so the generated modules import each other as `protos.sim.v2.sim_pb2` and
the package installs with the rest of the project. `--check` regenerates into a temporary
folder and exits 1 if anything differs from the checked-in files (used by the tests).
"""
from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generated_names(proto: Path) -> list[Path]:
    """Checked-in generated files of one .proto, relative to the repository root."""
    rel = proto.relative_to(ROOT)
    return [rel.with_name(rel.stem + s) for s in SUFFIXES]


def generate(out_root: Path) -> list[Path]:
    """Generate code for every .proto into out_root (mirroring the repository layout)."""
    from grpc_tools import protoc

    written = []
    for proto in proto_files():
        rel = proto.relative_to(ROOT)
        args = ["grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out_root}", f"--pyi_out={out_root}",
                f"--grpc_python_out={out_root}", str(rel)]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed on {rel} (exit {rc})")
        written += generated_names(proto)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare fresh output with the checked-in files")
    args = ap.parse_args(argv)
    import os

    os.chdir(ROOT)  # protoc resolves the .proto paths relative to the include root
    if not args.check:
        for rel in generate(ROOT):
            print(f"wrote {rel}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [rel for rel in generate(Path(tmp))
                 if not (ROOT / rel).is_file() or not filecmp.cmp(Path(tmp) / rel, ROOT / rel, shallow=False)]
    for rel in stale:
        print(f"stale: {rel} (run python protos/generate.py)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

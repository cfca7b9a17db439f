"""Regenerates the committed protobuf/gRPC Python code from protos/slomesh/v1/*.proto.

Usage: python scripts/gen_protos.py [--out DIR]

Writes slomesh/v1/*_pb2.py, *_pb2.pyi and *_pb2_grpc.py under DIR (default: the repository
root, i.e. next to the `slomesh` package). tests/unit/test_protos.py runs it into a temporary
directory and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc (from grpcio-tools) on every proto; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(PROTO_ROOT.glob("slomesh/v1/*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files under {PROTO_ROOT}")
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}")
    pkg = out_dir / "slomesh" / "v1"
    init = pkg / "__init__.py"
    init.write_text('"""Generated protobuf and gRPC code for slomesh.v1 (scripts/gen_protos.py)."""\n')
    return sorted(pkg.glob("*"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

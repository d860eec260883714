"""Generate the Python code for proto/ (messages, gRPC stubs and .pyi types).

Run `python scripts/gen_proto.py` after editing a .proto file; `--check` regenerates into a
temporary folder and fails if the committed code differs (CI runs that).
The generated modules live next to their .proto under the `fleet.proto` package, so the
absolute imports protoc writes are rewritten to relative ones.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTOS = ["fleet/v1/fleet.proto", "inference/grpc_service.proto"]
# Packages whose messages go into a private descriptor pool: other libraries (tritonclient)
# register the same `inference.*` names in the default pool, and both must import in one process.
PRIVATE_POOL = {"inference"}
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    produced = sorted(p for p in out.rglob("*") if p.name.endswith(SUFFIXES))
    for path in produced:
        text = path.read_text()
        pkg = ".".join(path.relative_to(out).parent.parts)
        text = re.sub(rf"^from {re.escape(pkg)} import ", "from . import ", text, flags=re.M)
        if pkg in PRIVATE_POOL and path.name.endswith("_pb2.py"):
            text = text.replace(
                "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(",
                "_POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = _POOL.AddSerializedFile(",
            )
        path.write_text(text)
    return produced


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        produced = generate(out)
        stale = []
        for path in produced:
            rel = path.relative_to(out)
            target = PROTO_ROOT / rel
            if args.check:
                if not target.exists() or not filecmp.cmp(path, target, shallow=False):
                    stale.append(str(rel))
            else:
                shutil.copyfile(path, target)
        if stale:
            print("generated code is stale, run `python scripts/gen_proto.py`:", *stale, sep="\n  ")
            return 1
    print("generated code is up to date" if args.check else f"generated {len(produced)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())

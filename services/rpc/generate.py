"""Generates the protobuf and gRPC modules of `protos/*.proto` into this package.

protoc writes `import common_pb2`; the modules live in a package, so the imports of
sibling modules are made package-relative here, the one change applied to its output.
"""

import pathlib
import re
import sys

from grpc_tools import protoc

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
PROTO_DIR = PACKAGE_DIR.parent.parent / "protos"
_SIBLING_IMPORT = re.compile(r"^import (\w+_pb2)( as \w+)?$", re.MULTILINE)


def generate() -> None:
    protos = sorted(str(p.name) for p in PROTO_DIR.glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{pathlib.Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={PACKAGE_DIR}",
        f"--pyi_out={PACKAGE_DIR}",
        f"--grpc_python_out={PACKAGE_DIR}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    for path in PACKAGE_DIR.glob("*_pb2*.py*"):
        text = path.read_text()
        path.write_text(_SIBLING_IMPORT.sub(r"from services.rpc import \1\2", text))


if __name__ == "__main__":
    generate()

#!/usr/bin/env bash
# Generate Python code, .pyi message stubs and typed service stubs from protos/
# into the directory given (generated/ by default). Only this script writes there.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-generated}
bin=${VENV:-.venv}/bin
mkdir -p "$out"
find "$out" -mindepth 1 -not -name README.md -delete
"$bin/python" -m grpc_tools.protoc -I protos \
  --plugin=protoc-gen-mypy_grpc="$bin/protoc-gen-mypy_grpc" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" --mypy_grpc_out="$out" \
  $(find protos -name '*.proto' | sort)
# Packages, so that `from blog.v1 import user_pb2` works and mypy sees them.
find "$out" -mindepth 1 -type d -exec sh -c 'touch "$1/__init__.py"; touch "$1/py.typed"' _ {} \;

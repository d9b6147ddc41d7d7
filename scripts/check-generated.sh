#!/usr/bin/env bash
# Fail when generated/ is not exactly what the generator makes from protos/.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
./scripts/generate.sh "$tmp/generated" >/dev/null
if ! diff -r -x README.md -x __pycache__ generated "$tmp/generated"; then
  echo "error: generated/ is stale: run 'make generate' and commit the result" >&2
  exit 1
fi

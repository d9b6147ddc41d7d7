#!/usr/bin/env bash
# buf breaking (FILE) against main's last commit, once main has protos.
set -euo pipefail
cd "$(dirname "$0")/.."
buf=$1
against=${BUF_AGAINST:-main}
if ! git rev-parse --verify -q "$against" >/dev/null; then
  echo "buf breaking: no '$against' commit yet; nothing to compare against"
  exit 0
fi
if ! git ls-tree -r --name-only "$against" -- protos | grep -q '\.proto$'; then
  echo "buf breaking: '$against' has no protos yet; nothing to compare against"
  exit 0
fi
# Protos changed against main: compare with main. Unchanged (a clean clone of
# main, as in CI): compare main with the commit before it.
ref=$against
if git diff --quiet "$against" -- protos && [ -z "$(git ls-files --others --exclude-standard protos)" ]; then
  ref="$against~1"
  git rev-parse --verify -q "$ref" >/dev/null || { echo "buf breaking: first commit; nothing to compare against"; exit 0; }
  git ls-tree -r --name-only "$ref" -- protos | grep -q '\.proto$' || { echo "buf breaking: previous commit has no protos"; exit 0; }
fi
# Compare with the protos as they were at $ref, unpacked from git (no clone needed).
old=$(mktemp -d)
trap 'rm -rf "$old"' EXIT
git archive "$ref" -- buf.yaml protos | tar -x -C "$old"
echo "buf breaking: against $ref ($(git rev-parse --short "$ref"))"
"$buf" breaking --against "$old"

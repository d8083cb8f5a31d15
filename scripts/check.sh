#!/usr/bin/env bash
# The checks that keep the code honest: types, lints, formatting, and the committed typings of the addon.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "check: tsc --noEmit"
npx tsc -p tsconfig.json --noEmit
npx tsc -p __test__/tsconfig.json
echo "check: cargo fmt --check"
cargo fmt --all -- --check
echo "check: cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "check: committed index.d.ts matches the build"
if git rev-parse --git-dir >/dev/null 2>&1 && ! git diff --quiet -- index.d.ts index.js; then
  git --no-pager diff --stat -- index.d.ts index.js
  echo "check: index.d.ts / index.js differ from the committed ones: rebuild and commit them" >&2
  exit 1
fi

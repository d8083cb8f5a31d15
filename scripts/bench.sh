#!/usr/bin/env bash
# `npm run bench`: prints figures; asserts nothing. The Rust core's own benchmarks: `cargo bench -p tapmanager-core`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OXC_TSCONFIG_PATH=./__test__/tsconfig.json
for b in bench/fd.ts bench/tapfd.ts bench/footprint.ts; do
  [ -f "$b" ] || continue
  echo "== $b"
  node --import @oxc-node/core/register "$b"
done

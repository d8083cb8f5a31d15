#!/usr/bin/env bash
# `npm test`: sets itself up, then runs the checks, the Rust tests and the TypeScript (ava) tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check.sh
echo "test: cargo test"
cargo test --workspace --quiet -- --test-threads=2
echo "test: ava"
npx ava "$@"

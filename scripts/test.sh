#!/usr/bin/env bash
# `npm test`: sets itself up, then runs the checks, the Rust tests and the TypeScript (ava) tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check.sh
echo "test: cargo test"
# One test at a time: tests count this process's fds and hold taps, which a concurrent fork would copy.
cargo test --workspace --quiet -- --test-threads=1
echo "test: ava"
npx ava "$@"

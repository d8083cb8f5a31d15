#!/usr/bin/env bash
# `npm test`: sets itself up, then runs the checks, the Rust tests and the TypeScript (ava) tests; under CI
# (CI=true) or with TAPMANAGER_PACKAGE_TEST=1 also builds the release packages for linux-x64 and linux-arm64
# (`npm run package`) and proves them on every runtime (`npm run test:package`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check.sh
echo "test: cargo test"
# One test at a time: tests count this process's fds and hold taps, which a concurrent fork would copy.
cargo test --workspace --quiet -- --test-threads=1
echo "test: ava"
npx ava "$@"
if [ "${CI:-}" = true ] || [ "${TAPMANAGER_PACKAGE_TEST:-}" = 1 ]; then
  echo "test: npm run package"
  started=$(date +%s)
  npm run -s package
  echo "test: npm run test:package"
  npm run -s test:package
  echo "test: packages built and tested in $(($(date +%s) - started)) s"
fi

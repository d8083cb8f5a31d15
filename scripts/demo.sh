#!/usr/bin/env bash
# `npm run demo`: sets itself up like `npm test` does (Debian packages, npm packages, the native addon, the
# TypeScript build, the VM assets), then runs the demo (dist/demo.js, from src/demo.ts). Needs root; it works
# only inside network namespaces it makes and removes.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "demo: must run as root (it creates network namespaces)" >&2
  exit 1
fi
bash scripts/setup.sh
exec node dist/demo.js "$@"

#!/usr/bin/env bash
# `npm run bench`: prints figures; asserts nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
for b in bench/*.ts; do
  echo "== $b"
  node --import @oxc-node/core/register "$b"
done

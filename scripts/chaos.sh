#!/usr/bin/env bash
# `npm run chaos`: the long hardening campaign (bench/chaos.ts). Prints a table; fails only on a lost or stuck key
# or a leak. Sizes: CHAOS_WIRE_FRAMES, CHAOS_DHCP_PACKETS, CHAOS_LEAK_CYCLES, CHAOS_KILLS, CHAOS_LIVE_PODS,
# CHAOS_SEED (see bench/chaos.ts). A quick run:
#   CHAOS_WIRE_FRAMES=20000 CHAOS_DHCP_PACKETS=20000 CHAOS_LEAK_CYCLES=20 CHAOS_KILLS=10 CHAOS_LIVE_PODS=20 npm run chaos
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${CHAOS_SKIP_SETUP:-}" ] || bash scripts/setup.sh
npx tsc -p tsconfig.json
export OXC_TSCONFIG_PATH=./__test__/tsconfig.json
exec node --import @oxc-node/core/register bench/chaos.ts

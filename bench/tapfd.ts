/**
 * `npm run bench` part: TapFDSource AddFDs/ReleaseFDs latency (no-op and bridge plugins, 1 and 8 concurrent
 * pods), pods per second, memory per live pod. Prints figures; asserts nothing. Needs root.
 * The code is in __test__/helpers/tapfd-bench.ts: it uses the test harness (a CNI "node" netns, pods in a temp
 * netns dir), which loads under the tests' tsconfig (ESM, bundler resolution), as ava runs it. This file has
 * no static import so that it loads under any tsconfig; it re-runs itself under the tests' one.
 * Then the live-pod scaling part (__test__/helpers/tapfd-scale-bench.ts): the real daemon's add/release of one pod
 * with 0, N and again 0 live pods, broken down per step, and the recovery time of N live pods at start.
 * Knobs: TAPFD_BENCH_ROUNDS (pods at concurrency 1, default 30), TAPFD_BENCH_LIVE (live pods for memory, 100),
 * TAPFD_BENCH_SCALE_LIVE (live pods for scaling and recovery, 250), TAPFD_BENCH_SCALE_CYCLES (cycles per
 * phase, 20), TAPFD_BENCH_RECOVERY_CONC (recovery concurrencies to measure, "8,64"), TAPFD_BENCH_NETNS_POOL
 * (spare netns the daemon keeps, default 2 as `serve`; 0: none), TAPFD_BENCH_ONLY=scale (only the scaling part).
 */
const TEST_TSCONFIG = './__test__/tsconfig.json'

async function launch(): Promise<void> {
  if (process.env.OXC_TSCONFIG_PATH !== TEST_TSCONFIG) {
    const { spawnSync } = await import('node:child_process')
    const r = spawnSync(process.execPath, ['--import', '@oxc-node/core/register', 'bench/tapfd.ts'], {
      stdio: 'inherit',
      env: { ...process.env, OXC_TSCONFIG_PATH: TEST_TSCONFIG },
    })
    process.exit(r.status ?? 1)
  }
  const { main } = await import('../__test__/helpers/tapfd-bench')
  await main()
}

launch().catch((e) => {
  console.error(e)
  process.exit(1)
})

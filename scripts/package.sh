#!/usr/bin/env bash
# `npm run package`: builds the release addon for linux-x64 and linux-arm64 with a glibc 2.17 floor, places the two
# binaries in their platform packages (npm/<platform>/), keeps the three versions in sync and `npm pack`s the three
# packages into $TAPMANAGER_PACK_DIR (default .tmp/pack). Prints each tarball's size and each binary's glibc floor,
# and writes them to <pack dir>/manifest.json for the package test.
#
# Its tools come from registries only and are cached under .tmp/pkg: zig (PyPI `ziglang`) and cargo-zigbuild (PyPI
# `cargo-zigbuild`) in a Python venv, and the aarch64 Rust standard library through `rustup target add`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
pack_dir=${TAPMANAGER_PACK_DIR:-$root/.tmp/pack}
tools=$root/.tmp/pkg
ZIGLANG_VERSION=0.15.1
CARGO_ZIGBUILD_VERSION=0.20.1
GLIBC_FLOOR=2.17
# Rust target triple, napi platform name.
TARGETS=("x86_64-unknown-linux-gnu linux-x64-gnu" "aarch64-unknown-linux-gnu linux-arm64-gnu")

say() { echo "package: $*"; }
die() {
  echo "package: $*" >&2
  exit 1
}

command -v objdump >/dev/null || die "objdump is missing (Debian package binutils; scripts/setup.sh installs it)"

# --- tools -------------------------------------------------------------------------------------------------------
venv=$tools/venv
pip_version() { "$venv/bin/python" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p' || true; }
if [ "$(pip_version ziglang)" != "$ZIGLANG_VERSION" ] || [ "$(pip_version cargo-zigbuild)" != "$CARGO_ZIGBUILD_VERSION" ]; then
  say "installing ziglang==$ZIGLANG_VERSION and cargo-zigbuild==$CARGO_ZIGBUILD_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
fi
# cargo-zigbuild finds zig as `python -m ziglang` when `zig` is not on PATH; put a `zig` shim there for napi's check.
mkdir -p "$tools/bin"
cat >"$tools/bin/zig" <<EOF
#!/bin/sh
exec "$venv/bin/python" -m ziglang "\$@"
EOF
chmod +x "$tools/bin/zig"
export PATH="$tools/bin:$venv/bin:$PATH"
for t in "${TARGETS[@]}"; do
  triple=${t%% *}
  installed=$(rustup target list --installed)
  grep -qx "$triple" <<<"$installed" || rustup target add "$triple"
done

# --- build -------------------------------------------------------------------------------------------------------
artifacts=$pack_dir/artifacts
rm -rf "$pack_dir"
mkdir -p "$artifacts"
for t in "${TARGETS[@]}"; do
  triple=${t%% *}
  platform=${t##* }
  say "building $triple (glibc $GLIBC_FLOOR floor)"
  started=$(date +%s)
  # zigbuild reads the glibc version from the target's suffix; cargo's output still lands in target/<triple>/.
  cargo zigbuild --quiet --release -p tapmanager-napi --target "$triple.$GLIBC_FLOOR"
  cp "target/$triple/release/libtapmanager_napi.so" "$artifacts/tapmanager.$platform.node"
  say "built $triple in $(($(date +%s) - started)) s"
done

# glibc floor of each binary: the newest GLIBC_x.y symbol version it needs.
floor_of() { objdump -T "$1" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -n1; }
for t in "${TARGETS[@]}"; do
  platform=${t##* }
  f=$artifacts/tapmanager.$platform.node
  floor=$(floor_of "$f")
  [ "$(printf '%s\n%s\n' "$floor" "$GLIBC_FLOOR" | sort -V | tail -n1)" = "$GLIBC_FLOOR" ] ||
    die "$f needs GLIBC_$floor, above the $GLIBC_FLOOR floor"
done

# --- place, sync versions, pack ---------------------------------------------------------------------------------
say "tsc"
npx tsc -p tsconfig.json
# Platform package versions follow package.json's (napi version), and the optionalDependencies must name them.
npx napi version --npm-dir npm >/dev/null
node -e '
  const fs = require("fs")
  const root = JSON.parse(fs.readFileSync("package.json", "utf8"))
  for (const dir of fs.readdirSync("npm")) {
    const p = JSON.parse(fs.readFileSync(`npm/${dir}/package.json`, "utf8"))
    if (p.version !== root.version) throw new Error(`npm/${dir} is ${p.version}, package.json ${root.version}`)
    if ((root.optionalDependencies ?? {})[p.name] !== root.version)
      throw new Error(`package.json optionalDependencies must pin ${p.name} at ${root.version}`)
  }
'
# napi artifacts copies every matching .node it finds under its cwd (the repo root's own dev build included) into
# place: run it in a staging copy of the platform packages, so that the repo is left as it was.
stage=$pack_dir/stage
mkdir -p "$stage"
cp package.json "$stage/"
cp -r npm "$stage/npm"
rm -f "$stage"/npm/*/*.node
(cd "$stage" && npx --prefix "$root" napi artifacts --output-dir "$artifacts" --npm-dir npm >"$pack_dir/artifacts.log" 2>&1) || {
  cat "$pack_dir/artifacts.log" >&2
  die "napi artifacts failed"
}
for t in "${TARGETS[@]}"; do
  platform=${t##* }
  cmp "$artifacts/tapmanager.$platform.node" "$stage/npm/$platform/tapmanager.$platform.node" || die "napi artifacts did not place $platform"
done
tarballs=()
for dir in . "$stage/npm/linux-x64-gnu" "$stage/npm/linux-arm64-gnu"; do
  name=$(cd "$dir" && npm pack --silent --pack-destination "$pack_dir" | tail -n1)
  tarballs+=("$name")
done

# --- report -------------------------------------------------------------------------------------------------------
{
  echo '{'
  echo '  "version": "'"$(node -p 'require("./package.json").version')"'",'
  echo '  "glibcFloor": "'"$GLIBC_FLOOR"'",'
  echo '  "tarballs": ['
  for i in "${!tarballs[@]}"; do
    sep=,
    [ "$i" = $((${#tarballs[@]} - 1)) ] && sep=
    echo '    { "file": "'"${tarballs[$i]}"'", "bytes": '"$(stat -c %s "$pack_dir/${tarballs[$i]}")"' }'$sep
  done
  echo '  ],'
  echo '  "binaries": ['
  n=0
  for t in "${TARGETS[@]}"; do
    platform=${t##* }
    f=$artifacts/tapmanager.$platform.node
    sep=,
    n=$((n + 1))
    [ $n = ${#TARGETS[@]} ] && sep=
    echo '    { "platform": "'"$platform"'", "bytes": '"$(stat -c %s "$f")"', "glibc": "'"$(floor_of "$f")"'" }'$sep
  done
  echo '  ]'
  echo '}'
} >"$pack_dir/manifest.json"

say "packed into $pack_dir:"
for f in "${tarballs[@]}"; do
  printf 'package:   %-40s %8d bytes\n' "$f" "$(stat -c %s "$pack_dir/$f")"
done
for t in "${TARGETS[@]}"; do
  platform=${t##* }
  f=$artifacts/tapmanager.$platform.node
  printf 'package:   %-40s %8d bytes, needs GLIBC_%s (%s)\n' "tapmanager.$platform.node" "$(stat -c %s "$f")" "$(floor_of "$f")" \
    "$(file -b "$f" 2>/dev/null | cut -d, -f1-2 || true)"
done

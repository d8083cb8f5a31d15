#!/usr/bin/env bash
# Builds the Virtlet comparison for bench/fd.ts: this driver (main.go, ours) plus Virtlet's own
# pkg/tapmanager/fdserver.go from a Virtlet checkout you provide (its code is not part of this repository; the
# Virtlet module is not on the Go module proxy, its only import, glog, is). Nothing is downloaded but glog.
#   bash bench/virtlet-go/build.sh <virtlet checkout> [output binary]   (default target/virtlet-fd-bench)
#   FD_BENCH_GO=target/virtlet-fd-bench npm run bench
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
virtlet="${1:?usage: build.sh <virtlet checkout> [output]}"
out="$(realpath -m "${2:-$here/../../target/virtlet-fd-bench}")"
src="$virtlet/pkg/tapmanager/fdserver.go"
[ -f "$src" ] || { echo "build.sh: no $src (a Virtlet checkout, e.g. git clone of Mirantis/virtlet)" >&2; exit 2; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tapmanager"
cp "$src" "$work/tapmanager/"
cp "$here/main.go" "$work/"
printf 'module virtletbench\n\ngo 1.22\n' > "$work/go.mod"
cd "$work"
go mod tidy >/dev/null
go build -o "$out" .
echo "built $out"

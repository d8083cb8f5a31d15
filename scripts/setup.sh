#!/usr/bin/env bash
# Sets up everything tapmanager's tests, benchmarks and demo need on a fresh Debian machine, and is cheap
# when it is all there already: Debian packages (as root, with apt-get), npm packages, the native addon
# and the TypeScript build. Used by `npm test`, `npm run bench`, `npm run demo` and `.ci/run`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages: the command that proves each one is there, and the package that brings it.
declare -A need=(
  [/usr/lib/cni/bridge]=containernetworking-plugins
  [/usr/sbin/dhcpcd]=dhcpcd-base
  [/bin/busybox]=busybox-static
  [/usr/bin/tcpdump]=tcpdump
  [/usr/sbin/nft]=nftables
  [/usr/sbin/ebtables]=ebtables
  [/usr/bin/qemu-system-x86_64]=qemu-system-x86
  [/usr/bin/ip]=iproute2
  [/usr/bin/pgrep]=procps
  [/usr/bin/xz]=xz-utils
  [/usr/bin/python3]=python3-minimal
  [/usr/bin/dpkg-deb]=dpkg
  [/usr/bin/setpriv]=util-linux
  [/usr/bin/objdump]=binutils
)
missing=()
for f in "${!need[@]}"; do [ -e "$f" ] || missing+=("${need[$f]}"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages ${missing[*]} and not root to install them" >&2
    exit 1
  fi
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# QEMU 10 (for `-device igb`, an emulated SR-IOV NIC: the SR-IOV guest test) from Debian's bookworm-backports,
# replacing bookworm's 7.2 system-wide (a QEMU 10 beside 7.2 loads 7.2's modules and aborts). The suite is
# added as a deb822 sources entry on the Debian mirror apt already uses.
qemu_major=$( (qemu-system-x86_64 --version 2>/dev/null || true) | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p')
if [ "$(uname -m)" = x86_64 ] && [ "${qemu_major:-0}" -lt 10 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: QEMU ${qemu_major:-none} is older than 10 and not root to install QEMU 10 from bookworm-backports" >&2
    exit 1
  fi
  backports=/etc/apt/sources.list.d/tapmanager-bookworm-backports.sources
  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    mirror=$( (grep -rhs '^URIs:.*debian' /etc/apt/sources.list.d/*.sources || true) | awk '!/security/ && !m {m = $2} END {print m}')
    [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /debian/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
    [ -n "$mirror" ] || { echo "setup: no Debian mirror found in apt's sources to add bookworm-backports" >&2; exit 1; }
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$mirror" > "$backports"
  fi
  echo "setup: installing QEMU 10 from bookworm-backports"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -o DPkg::Lock::Timeout=600 -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
  devices=$(qemu-system-x86_64 -device help 2>/dev/null || true)
  grep -q '"igb"' <<<"$devices" || { echo "setup: QEMU after install has no igb device" >&2; exit 1; }
fi

# The real-VM test assets (a Debian kernel and a busybox initramfs), cached under .tmp/vm.
if [ "$(uname -m)" = x86_64 ] && [ "$(id -u)" = 0 ]; then
  bash scripts/vm-assets.sh >/dev/null
fi

# npm packages, exactly as locked.
if [ ! -d node_modules/.bin ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm install (locked)"
  # `npm install` with the lock, not `npm ci`: the optionalDependencies on the platform packages cannot be
  # locked before they are published, and `npm ci` refuses a lock without them. --no-save keeps the lock as is.
  npm install --no-save --no-audit --no-fund
fi

# The native addon, rebuilt when any Rust source is newer than it. TAPMANAGER_PROFILE=debug builds faster.
node_file=tapmanager.linux-x64-gnu.node
[ "$(uname -m)" = aarch64 ] && node_file=tapmanager.linux-arm64-gnu.node
if [ ! -f "$node_file" ] || [ -n "$(find crates Cargo.toml Cargo.lock -newer "$node_file" -type f -print -quit)" ]; then
  echo "setup: building the native addon"
  if [ "${TAPMANAGER_PROFILE:-release}" = debug ]; then
    npx napi build --platform --manifest-path crates/tapmanager-napi/Cargo.toml -p tapmanager-napi -o . --js index.js --dts index.d.ts
  else
    npm run -s build:native
  fi
fi

# The TypeScript build (dist/), used by the command line and by consumers.
if [ ! -f dist/index.js ] || [ -n "$(find src index.d.ts tsconfig.json -newer dist/index.js -type f -print -quit)" ]; then
  echo "setup: tsc"
  npx tsc -p tsconfig.json
fi

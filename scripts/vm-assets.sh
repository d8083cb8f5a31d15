#!/usr/bin/env bash
# Builds (once, then cached) the assets of the test VM from Debian packages, without installing anything:
#   <dir>/vmlinux         the uncompressed kernel of Debian's linux-image-6.1.0-N-amd64 (boots via PVH under TCG)
#   <dir>/initramfs.cpio  busybox-static, the virtio-net modules and an /init (see below)
#   <dir>/runner.cpio     the guest runner's initramfs (see step 4 below)
#   <dir>/stamp           what they were built from; a matching stamp makes this script a no-op
# <dir> is $TAPMANAGER_VM_DIR, default <project>/.tmp/vm (gitignored). Prints <dir> on stdout.
#
# Needs (Debian): apt (apt-get download, apt-cache), dpkg-deb, busybox-static, xz-utils, zstd, gzip, coreutils.
# The kernel package is fetched with `apt-get download` and unpacked with `dpkg-deb -x`: never installed.
#
# The guest's /init (busybox sh) speaks on the serial console in lines a test can parse:
#   TM_BOOT                                        init started
#   TM_LINK mac=<mac>                              eth0 is there (after loading the modules)
#   TM_LEASE ip=<a> mask=<n> subnet=<m> router=<r> mtu=<n> dns=<d,...> serverid=<s> lease=<secs>
#   TM_NOLEASE                                     udhcpc gave up
#   TM_PING target=<ip> ok=<0|1> tries=<n>         result of pinging tm.ping=<ip> from the kernel command line
#   TM_READY                                       with tm.stay=1: up, answering pings, reading commands
#   TM_OUT <id> <line> / TM_RC <id> <rc>           output and exit code of a command sent as "TM_CMD <id> <sh>"
#   TM_ERROR <what>                                something failed (module load, no eth0)
# Kernel command line parameters read by /init: tm.ping=<ip>, tm.stay=1, tm.dhcp=0 (skip DHCP).
# Without tm.stay=1 the guest powers off after the ping, so QEMU exits.
set -euo pipefail
cd "$(dirname "$0")/.."
project=$(pwd)
dir=${TAPMANAGER_VM_DIR:-$project/.tmp/vm}
mkdir -p "$dir"

modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net)

# Cached: the assets were built by this version of the script from this busybox. A newer kernel package in
# apt does not invalidate them (pass --refresh, or remove <dir>, to rebuild from the newest one).
self_hash=$(sha256sum "$0" | cut -c1-16)
busybox_hash=$(sha256sum /bin/busybox | cut -c1-16)
if [ "${1:-}" != --refresh ] && [ -s "$dir/vmlinux" ] && [ -s "$dir/initramfs.cpio" ] && [ -s "$dir/runner.cpio" ] \
  && [ -f "$dir/stamp" ] \
  && grep -q " script=$self_hash busybox=$busybox_hash\$" "$dir/stamp"; then
  echo "$dir"
  exit 0
fi

# The newest bookworm 6.1 kernel for plain amd64 (not -rt, not -cloud) that apt knows about.
find_pkg() { apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' | sort -V | tail -n 1; }
pkg=${TAPMANAGER_VM_KERNEL_PKG:-$(find_pkg)}
if [ -z "$pkg" ]; then
  apt-get update -qq
  pkg=$(find_pkg)
fi
[ -n "$pkg" ] || { echo "vm-assets: apt-cache knows no linux-image-6.1.0-*-amd64 package" >&2; exit 1; }
version=$(apt-cache policy "$pkg" | awk '/Candidate:/ {print $2}')
stamp="$pkg $version script=$self_hash busybox=$busybox_hash"
echo "vm-assets: building from $pkg $version into $dir" >&2

work=$(mktemp -d "$dir/build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# 1. The kernel package, unpacked (never installed). Keep the .deb in the cache dir for rebuilds.
deb=$(ls "$dir"/"${pkg}"_*.deb 2>/dev/null | head -n 1 || true)
if [ -z "$deb" ]; then
  (cd "$work" && apt-get download -q "$pkg" >/dev/null 2>"$work/apt.err") || { cat "$work/apt.err" >&2; exit 1; }
  mv "$work"/"${pkg}"_*.deb "$dir/"
  deb=$(ls "$dir"/"${pkg}"_*.deb | head -n 1)
fi
dpkg-deb -x "$deb" "$work/pkg"
vmlinuz=$(ls "$work"/pkg/boot/vmlinuz-*)
kver=${vmlinuz##*/vmlinuz-}

# 2. vmlinux out of the bzImage. The x86 boot header says where the compressed kernel is: setup_sects (byte
#    0x1f1; 0 means 4), payload_offset (u32 LE at 0x248, relative to the protected-mode code that starts at
#    (setup_sects+1)*512) and payload_length (u32 LE at 0x24c). The kernel build appends the uncompressed size
#    (4 bytes) to the stream, so the compressed stream is payload_length-4 bytes. Its magic picks the tool.
u8() { od -A n -t u1 -j "$2" -N 1 "$1" | tr -d ' '; }
u32() { od -A n -t u4 --endian=little -j "$2" -N 4 "$1" | tr -d ' '; }
[ "$(od -A n -t x1 -j 514 -N 4 "$vmlinuz" | tr -d ' ')" = 48647253 ] || { echo "vm-assets: $vmlinuz is not a bzImage (no HdrS)" >&2; exit 1; }
setup_sects=$(u8 "$vmlinuz" $((0x1f1)))
[ "$setup_sects" = 0 ] && setup_sects=4
payload_offset=$(u32 "$vmlinuz" $((0x248)))
payload_length=$(u32 "$vmlinuz" $((0x24c)))
start=$(( (setup_sects + 1) * 512 + payload_offset ))
dd if="$vmlinuz" of="$work/payload" bs=64K iflag=skip_bytes,count_bytes skip="$start" count=$((payload_length - 4)) status=none
magic=$(od -A n -t x1 -N 6 "$work/payload" | tr -d ' ')
case "$magic" in
  fd377a585a00) xz -dc --single-stream < "$work/payload" > "$work/vmlinux" ;;
  28b52ffd*) zstd -dcq < "$work/payload" > "$work/vmlinux" ;;
  1f8b08*) gzip -dc < "$work/payload" > "$work/vmlinux" ;;
  *) echo "vm-assets: unknown kernel payload magic $magic at offset $start" >&2; exit 1 ;;
esac
[ "$(od -A n -t x1 -N 4 "$work/vmlinux" | tr -d ' ')" = 7f454c46 ] || { echo "vm-assets: decompressed kernel is not an ELF file" >&2; exit 1; }

# 3. The initramfs: busybox-static, the modules (uncompressed; insmod takes them in dependency order), /init.
root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/modules}
cp /bin/busybox "$root/bin/busybox"
for m in "${modules[@]}"; do
  ko=$(find "$work/pkg/lib/modules/$kver" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n 1)
  [ -n "$ko" ] || { echo "vm-assets: module $m not found in $pkg" >&2; exit 1; }
  case "$ko" in
    *.ko.xz) xz -dc < "$ko" > "$root/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -dcq < "$ko" > "$root/lib/modules/$m.ko" ;;
    *.ko.gz) gzip -dc < "$ko" > "$root/lib/modules/$m.ko" ;;
    *) cp "$ko" "$root/lib/modules/$m.ko" ;;
  esac
done
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3

cat > "$root/etc/udhcpc.script" <<'EOF'
#!/bin/busybox sh
# udhcpc calls this with $1 = deconfig|bound|renew|leasefail|nak and the lease in the environment.
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    dnslist=$(echo $dns | tr ' ' ',')
    echo "TM_LEASE ip=$ip mask=$mask subnet=$subnet router=$router mtu=$mtu dns=$dnslist serverid=$serverid lease=$lease"
    ;;
  leasefail|nak) echo "TM_DHCP_EVENT $1" ;;
esac
exit 0
EOF
chmod 755 "$root/etc/udhcpc.script"

cat > "$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
stty -echo 2>/dev/null
echo TM_BOOT
param() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}"; return;; esac; done; }
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net; do
  insmod "/lib/modules/$m.ko" || echo "TM_ERROR insmod $m"
done
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
if [ -e /sys/class/net/eth0 ]; then
  echo "TM_LINK mac=$(cat /sys/class/net/eth0/address)"
  ip link set eth0 up
  if [ "$(param tm.dhcp)" != 0 ]; then
    udhcpc -i eth0 -f -n -q -t 20 -T 1 -A 1 -O mtu -O staticroutes -s /etc/udhcpc.script 2>/dev/null || echo TM_NOLEASE
  fi
else
  echo "TM_ERROR no eth0"
fi
target=$(param tm.ping)
if [ -n "$target" ]; then
  ok=0; tries=0
  while [ $tries -lt 10 ]; do
    tries=$((tries+1))
    if ping -c 1 -W 2 "$target" >/dev/null 2>&1; then ok=1; break; fi
  done
  echo "TM_PING target=$target ok=$ok tries=$tries"
fi
if [ "$(param tm.stay)" = 1 ]; then
  echo TM_READY
  # A tiny command channel on the serial console: "TM_CMD <id> <shell command>".
  while true; do
    if read -r tag id cmd; then
      [ "$tag" = TM_CMD ] || continue
      sh -c "$cmd" > /tmp/out 2>&1; rc=$?
      while IFS= read -r l; do echo "TM_OUT $id $l"; done < /tmp/out
      echo "TM_RC $id $rc"
    else
      sleep 1
    fi
  done
fi
echo TM_POWEROFF
poweroff -f
EOF
chmod 755 "$root/init"

(cd "$root" && find . | /bin/busybox cpio -o -H newc 2>/dev/null) > "$work/initramfs.cpio"

# 4. The guest runner's initramfs (__test__/helpers/guest.ts): busybox, the modules below with their dependencies
#    (read from each module's `depends=`, dependencies first), and an /init that
#    - loads every module, mounts the host's root (9p tag `hostroot`, read-only) under a tmpfs overlay as
#      /newroot and the job dir (9p tag `tmjob`, read-write) as /newroot/tmjob;
#    - chroots into /newroot with fresh proc, sysfs, devtmpfs, devpts, cgroup2 and a tmpfs /run (no fresh /tmp:
#      the checkout being tested may live under the host's /tmp, e.g. a CI clone; writes there go to the overlay);
#    - runs `sh /tmjob/run.sh` there (output on the serial console), prints `TM_EXIT <rc>` and powers off.
#    Lines: TM_BOOT (init started), TM_START (about to run the job), TM_ERROR <what>, TM_EXIT <rc>.
#    With `tm.probe=1` on the kernel command line it only loads the modules, prints `TM_NIC <name> <mac>
#    <driver>` per NIC and powers off (a nested guest checking a passed-through VF needs no host root).
runner_modules=(virtio_pci virtio_net crc32c_generic netfs fscache 9pnet 9pnet_virtio 9p overlay igb igbvf vfio vfio_iommu_type1 vfio_pci
  tun bridge veth nf_tables nft_meta_bridge)
modroot="$work/pkg/lib/modules/$kver"
rroot="$work/runner"
mkdir -p "$rroot"/{bin,dev,proc,sys,tmp,host,job,ovl,newroot,lib/modules}
ko_of() { find "$modroot" \( -name "$1.ko" -o -name "$1.ko.*" -o -name "${1//_/-}.ko" -o -name "${1//_/-}.ko.*" \) | head -n 1; }
unpack_ko() {
  case "$1" in
    *.ko.xz) xz -dc < "$1" ;;
    *.ko.zst) zstd -dcq < "$1" ;;
    *.ko.gz) gzip -dc < "$1" ;;
    *) cat "$1" ;;
  esac
}
declare -A seen=()
order=()
visit() {
  local m=${1//-/_} ko d
  [ -n "${seen[$m]:-}" ] && return 0
  seen[$m]=1
  ko=$(ko_of "$m")
  if [ -z "$ko" ]; then
    grep -qE "/(${m}|${m//_/-})\.ko\$" "$modroot/modules.builtin" && return 0
    echo "vm-assets: module $m not found in $pkg" >&2
    exit 1
  fi
  unpack_ko "$ko" > "$rroot/lib/modules/$m.ko"
  for d in $(tr '\0' '\n' < "$rroot/lib/modules/$m.ko" | sed -n 's/^depends=//p' | head -n 1 | tr ',' ' '); do
    visit "$d"
  done
  order+=("$m")
}
for m in "${runner_modules[@]}"; do visit "$m"; done
printf '%s\n' "${order[@]}" > "$rroot/lib/modules/order"
cp /bin/busybox "$rroot/bin/busybox"
mknod -m 600 "$rroot/dev/console" c 5 1
mknod -m 666 "$rroot/dev/null" c 1 3
cat > "$rroot/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
echo TM_BOOT
fail() { echo "TM_ERROR $*"; echo "TM_EXIT 255"; poweroff -f; }
while read -r m; do insmod "/lib/modules/$m.ko" || echo "TM_ERROR insmod $m"; done < /lib/modules/order
if grep -qw tm.probe=1 /proc/cmdline; then
  # Probe mode (no host root): wait for NICs, print each as "TM_NIC <name> <mac> <driver>", power off.
  i=0; while [ -z "$(ls /sys/class/net | grep -v '^lo$')" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
  sleep 1
  for n in /sys/class/net/*; do
    [ "${n##*/}" = lo ] && continue
    echo "TM_NIC ${n##*/} $(cat $n/address) $(basename $(readlink $n/device/driver) 2>/dev/null)"
  done
  echo "TM_EXIT 0"
  poweroff -f
fi
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /host || fail "mount hostroot"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 tmjob /job || fail "mount tmjob"
mount -t tmpfs -o mode=755 tmpfs /ovl && mkdir -p /ovl/upper /ovl/work || fail "mount the overlay's tmpfs"
mount -t overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work overlay /newroot || fail "mount the overlay"
r=/newroot
mkdir -p $r/tmjob && mount --bind /job $r/tmjob || fail "bind the job dir"
mount -t proc proc $r/proc && mount -t sysfs sysfs $r/sys && mount -t devtmpfs devtmpfs $r/dev \
  && mkdir -p $r/dev/pts && mount -t devpts devpts $r/dev/pts && mount -t tmpfs -o mode=755 tmpfs $r/run \
  && mount -t cgroup2 cgroup2 $r/sys/fs/cgroup || fail "mount the chroot's filesystems"
ip link set lo up
echo TM_START
chroot $r /bin/sh -c 'cd /tmjob && exec /bin/sh /tmjob/run.sh' </dev/null
rc=$?
sync
echo "TM_EXIT $rc"
poweroff -f
INIT
chmod 755 "$rroot/init"
(cd "$rroot" && find . | /bin/busybox cpio -o -H newc 2>/dev/null) > "$work/runner.cpio"

mv "$work/vmlinux" "$dir/vmlinux"
mv "$work/runner.cpio" "$dir/runner.cpio"
mv "$work/initramfs.cpio" "$dir/initramfs.cpio"
echo "$kver" > "$dir/kernel-release"
echo "$stamp" > "$dir/stamp"
echo "vm-assets: ready ($kver, vmlinux $(stat -c %s "$dir/vmlinux") bytes, initramfs $(stat -c %s "$dir/initramfs.cpio") bytes)" >&2
echo "$dir"

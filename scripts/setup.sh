#!/usr/bin/env bash
# Installs what Outboard needs on a fresh Debian 12 machine and builds it (release).
# Idempotent: installs only what is missing. Device peers the tests and the demo talk to
# come from here too, so the README's commands work on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the build, tests and benchmarks use:
#   gcc, libc6-dev, linux-libc-dev  the C shim and the C references
#   qemu-system-common              qemu-storage-daemon, the vhost-user-blk device
#   fio                             the kernel's own path, for context in `bench blk`
#   qemu-system-x86                 the guest lane's VM (TCG, emulated Intel IOMMU)
#   linux-image-amd64               the guest lane's kernel and its VFIO and virtio modules
#   busybox-static                  the guest lane's userland (sh, modprobe, switch_root)
#   cpio                            the guest lane's initramfs
#   xz-utils                        unpacking the kernel image (vmlinuz) for a faster boot
#   dpdk-dev                        dpdk-testpmd: the vhost-user-net device and `bench net`'s virtio-user reference
PACKAGES=(gcc libc6-dev linux-libc-dev qemu-system-common fio
          qemu-system-x86 linux-image-amd64 busybox-static cpio xz-utils dpdk-dev)
# The network tests' kernel peers:
#   iproute2                        `ip`: network namespaces, moving a TAP into one, addresses
#   iputils-ping                    ping through a TAP (answered from Swift) and through the bridges
#   iperf3                          TCP across the TAP bridges
PACKAGES+=(iproute2 iputils-ping iperf3)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# 2 MiB hugepages for DPDK's virtio-user, the reference driver of `bench net` and its tests.
scripts/hugepages.sh "${OUTBOARD_HUGEPAGES:-1024}"

. scripts/toolchain.sh
command -v swift >/dev/null || { echo "setup: the Swift 6 toolchain is required (swift not on PATH)" >&2; exit 1; }

swift build -c release

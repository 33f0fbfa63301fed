#!/usr/bin/env bash
# Ensures at least N (default 1024, 2 GiB) 2 MiB hugepages are reserved and hugetlbfs is
# mounted at /dev/hugepages: DPDK's virtio-user (the reference driver of `bench net`) needs
# its memory in hugepage files to share it with the vhost-user device. Idempotent: never
# lowers a larger reservation, never mounts twice. Needs root. Usage: hugepages.sh [N]
set -euo pipefail
want=${1:-1024}
nr=/proc/sys/vm/nr_hugepages
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi

have=$(cat "$nr")
if [ "$have" -lt "$want" ]; then
  echo "$want" | $SUDO tee "$nr" >/dev/null
  have=$(cat "$nr")
  if [ "$have" -lt "$want" ]; then
    # The kernel reserves what it can find contiguous; a fragmented machine gets fewer.
    echo "hugepages: asked for $want 2 MiB pages, the kernel reserved $have" >&2
    exit 1
  fi
fi

if ! awk '$2 == "/dev/hugepages" && $3 == "hugetlbfs" { found = 1 } END { exit !found }' /proc/mounts; then
  $SUDO mkdir -p /dev/hugepages
  $SUDO mount -t hugetlbfs -o pagesize=2M nodev /dev/hugepages
fi
echo "hugepages: $have 2 MiB pages reserved, hugetlbfs at /dev/hugepages"

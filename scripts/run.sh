#!/usr/bin/env bash
# The main job: set up, build, and run `outboard demo` (needs root: the manager puts
# drivers into new namespaces and switches them to an unprivileged user).
# The demo makes a disk image, starts qemu-storage-daemon on it as a vhost-user-blk
# device, starts the manager with the virtio-blk driver sandboxed, runs a verified random
# read/write workload, kills the driver half-way and shows the recovery, and ends with a
# summary. Extra arguments go to `outboard demo` (for example --json, --seconds 30).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .build/release/outboard demo "$@"

#!/usr/bin/env bash
# The whole test suite, on a fresh machine: set up, build, test. Release mode, because
# the cross-process tests move 10^8 descriptors and the workers are the `outboard`
# executable of the same build.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. scripts/toolchain.sh  # setup.sh's PATH went with its process
swift test -c release "$@"

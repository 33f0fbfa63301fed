#!/usr/bin/env bash
# The main job: set up, build, and run it. Until the block driver exists (issue 5) the
# main job is the shared-memory queue benchmark, Outboard's Swift queue against the C
# reference, two processes on two cores. Extra arguments go to `outboard bench ring`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .build/release/outboard bench ring "$@"

#!/usr/bin/env bash
# The main job: set up, build, and run it.
#  1. The manager with the example config (examples/outboard.json), a sandboxed test block
#     driver, and 200 injected driver faults (SIGKILL, SIGSEGV, hang, abort) under a
#     verified read/write workload: `outboard faults` (it starts the manager for the run
#     when none is listening on the config's socket). Needs root (namespaces, setuid).
#  2. The shared-memory queue benchmark, Outboard's Swift queue against the C reference,
#     two processes on two cores. Extra arguments go to `outboard bench ring`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.build/release/outboard faults --config examples/outboard.json --device mem0 --faults 200
exec .build/release/outboard bench ring "$@"

#!/usr/bin/env bash
# Instructions per descriptor of the ring workers, Swift against the C reference, counted
# by valgrind's callgrind: unlike the timing of `outboard bench ring`, the count does not
# depend on what else this (virtual) machine is doing. Sleep mode with no spinning, so
# that waiting costs a syscall instead of counted polling; each worker's count includes
# its rare sleeps (reported as sleeps/desc) and not its process start-up (measured
# separately with a tiny run and subtracted).
#   usage: scripts/ring-instructions.sh [batch (default 32)] [descriptors (default 1000000)]
set -euo pipefail
cd "$(dirname "$0")/.."
batch=${1:-32}
count=${2:-1000000}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
. scripts/toolchain.sh
[ -x .build/release/outboard ] || swift build -c release
work=$(mktemp -d /tmp/outboard-ringcg.XXXXXX)
trap 'rm -rf "$work"' EXIT
# valgrind 3.19 cannot read the DWARF 5 of Swift 6's toolchain: count on a copy without it.
objcopy --strip-debug .build/release/outboard "$work/outboard"

run() {  # $1: descriptors, $2: output folder
  mkdir -p "$2"
  "$work/outboard" bench ring --batches "$batch" --modes sleep --spin 0 --repeats 1 --count "$1" --json \
    --worker-wrapper "$(command -v valgrind) --tool=callgrind --callgrind-out-file=$2/cg.%p" 2>/dev/null
}
run 1000 "$work/base" > /dev/null
json=$(run "$count" "$work/full")

python3 - "$work" "$count" "$batch" "$json" <<'PY'
import glob, json, re, sys
work, count, batch, line = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def totals(folder):
    out = {}
    for f in glob.glob(folder + "/cg.*"):
        text = open(f).read()
        kind = ("C " if "ref_run_" in text else "Swift ") + ("producer" if re.search(r"ref_run_producer|SwiftRingLoopV7produce", text) else "consumer")
        out[kind] = int(re.search(r"^summary: (\d+)", text, re.M).group(1))
    return out
base, full = totals(work + "/base"), totals(work + "/full")
r = json.loads(line)
per = {k: (full[k] - base[k]) / (count - 1000) for k in full}
print(f"instructions per descriptor, batch {batch}, {count} descriptors, sleep mode, spin 0 "
      f"(sleeps/desc: Swift {r['sleeps_per_desc']}, C {r.get('c_sleeps_per_desc', '-')})")
for role in ("producer", "consumer"):
    s, c = per["Swift " + role], per["C " + role]
    print(f"  {role}: Swift {s:.1f}  C {c:.1f}  Swift/C {s / c:.3f}")
s, c = per["Swift producer"] + per["Swift consumer"], per["C producer"] + per["C consumer"]
print(f"  both:     Swift {s:.1f}  C {c:.1f}  Swift/C {s / c:.3f}")
PY

#!/usr/bin/env bash
# The guest lane: runs a shell command as root inside a QEMU guest that has an emulated
# Intel IOMMU and two virtio-blk-pci disks, so VFIO works there (the host has none), and
# exits with the command's exit status. docs/testing.md says what the guest holds.
#
# usage: scripts/guest-lane.sh [options] [--] COMMAND...
#   --disk-size SIZE   size of each of the two sparse disk images (default 64M; truncate(1) sizes)
#   --memory SIZE      guest memory (default 1G; QEMU -m syntax)
#   --timeout SECONDS  stop the guest after this long (default 600: TCG is slow)
#   --copy PATH        copy a file or folder into the guest's /opt (on PATH); repeatable
#   --outboard PATH    use this outboard binary as it is instead of building the static one
#   --build-only       build and strip the static outboard, print its path, boot nothing
#   --work-dir DIR     where the disk images, initramfs and logs go, kept afterwards
#                      (default: a new folder under .build-guest/runs/, deleted afterwards)
#   --keep             keep the default work folder (its path is printed on stderr)
#   --no-fio           leave fio out of the guest (it doubles the boot time, about 3 s)
#   --console          print the guest's console (kernel messages, init) on stderr afterwards
#   --result FILE      write the command's exit status to FILE once the guest reported it
#                      (callers that must tell the command's status from the lane's own)
#
# COMMAND's words are joined with spaces and run by the guest's sh (as ssh does), in
# /scratch (a tmpfs), stdin /dev/null. Its stdout and stderr come back on stdout, exactly.
# Exit status: the command's; 124 if the guest ran past --timeout; 125 if the lane failed
# (build, boot, a guest that died before reporting). Messages of the lane are on stderr.
# Boots wait for each other: one guest at a time on the machine (a lock in .build-guest).
#
# In the guest: /bin/outboard (static), busybox, fio (unless --no-fio); users root, outboard-driver (uid 999)
# and nobody (65534); the disks at PCI 0000:00:04.0 (serial "outboard-vfio", for Outboard's
# drivers through vfio-pci) and 0000:00:05.0 (serial "guest-kernel", for the guest kernel's
# own virtio_blk, the comparison). The kernel's virtio_blk binds both at boot.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
here="$root/scripts/guest"
cache="$root/.build-guest"   # kernel, base initramfs, stripped binary: kept across runs

disk_size=64M memory=1G timeout_s=600 outboard="" build_only=0 work_arg="" work="" keep=0 console=0 with_fio=1
result_file="" copies=()
usage() { sed -n '/^# usage:/,/^# own virtio_blk/s/^# \{0,1\}//p' "$0"; }
die() { echo "guest-lane: $*" >&2; exit 125; }
need_arg() { [ $# -ge 2 ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --disk-size) need_arg "$@"; disk_size=$2; shift 2 ;;
    --memory) need_arg "$@"; memory=$2; shift 2 ;;
    --timeout) need_arg "$@"; timeout_s=$2; shift 2 ;;
    --copy) need_arg "$@"; copies+=("$2"); shift 2 ;;
    --outboard) need_arg "$@"; outboard=$2; shift 2 ;;
    --build-only) build_only=1; shift ;;
    --work-dir) need_arg "$@"; work_arg=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --no-fio) with_fio=0; shift ;;
    --console) console=1; shift ;;
    --result) need_arg "$@"; result_file=$2; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) break ;;
  esac
done
[[ "$timeout_s" =~ ^[0-9]+$ ]] || die "--timeout takes whole seconds, not '$timeout_s'"
command_text="$*"
[ "$build_only" = 1 ] || [ -n "$command_text" ] || die "no command given (see --help)"
for c in "${copies[@]}"; do [ -e "$c" ] || die "--copy: $c does not exist"; done

# Phase timings, on stderr, so the cost of each part is visible in every run.
now_us() { echo "${EPOCHREALTIME/./}"; }
t0=$(now_us)
lap() { # lap NAME: seconds since the previous lap
  local now d
  now=$(now_us); d=$(((now - t0) / 100000))
  printf 'guest-lane: %s %d.%d s\n' "$1" $((d / 10)) $((d % 10)) >&2
  t0=$now
}
mkdir -p "$cache"
# Files in the cache are written as NAME.tmp.PID and renamed when complete, so that a
# failed or concurrent run never leaves or uses half a file.
# shellcheck disable=SC2317  # run by the EXIT trap
cleanup() {
  rm -f "$cache"/*.tmp.$$
  [ -n "$work" ] || return 0
  if [ "$keep" = 1 ]; then echo "guest-lane: work folder kept: $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

# --- The static outboard ------------------------------------------------------------------
# Fully static (glibc too), so the guest needs no shared library for it. swift build is
# incremental, so running it every time costs a few seconds when nothing changed.
if [ -z "$outboard" ]; then
  # shellcheck source=scripts/toolchain.sh
  . "$root/scripts/toolchain.sh"
  log="$cache/static-build.log"
  (cd "$root" && swift build -c release --static-swift-stdlib -Xswiftc -static-executable \
     --scratch-path .build-static --product outboard) >"$log" 2>&1 \
    || { tail -30 "$log" >&2; die "the static build failed (log: $log)"; }
  built="$root/.build-static/release/outboard"
  outboard="$cache/outboard"
  # Stripped (33 MB -> about a third), only when the build produced something newer.
  if [ ! -e "$outboard" ] || [ "$built" -nt "$outboard" ]; then
    strip -o "$outboard.tmp.$$" "$built" && mv -f "$outboard.tmp.$$" "$outboard"
  fi
  lap "static build"
fi
[ -x "$outboard" ] || die "$outboard is not an executable"
if [ "$build_only" = 1 ]; then echo "$outboard"; exit 0; fi

# --- The kernel ---------------------------------------------------------------------------
# The newest installed Debian kernel that has both its image and its modules.
kv=""
for m in $(printf '%s\n' /lib/modules/*/ | sort -V); do
  v=$(basename "$m"); [ -e "/boot/vmlinuz-$v" ] && kv=$v
done
[ -n "$kv" ] || die "no installed kernel (/boot/vmlinuz-* with /lib/modules/*): install linux-image-amd64"
vmlinux="$cache/vmlinux-$kv"
# Booting the uncompressed image saves about 2.5 s of decompression under TCG: vmlinuz is
# a loader followed by an xz stream; --single-stream ignores what follows the stream.
if [ ! -e "$vmlinux" ]; then
  # (No pipes into head or out of tail here: with pipefail, their early ends are failures.)
  offsets=$(LC_ALL=C grep -m1 -aboP '\xfd7zXZ\x00' "/boot/vmlinuz-$kv" | cut -d: -f1) \
    || die "/boot/vmlinuz-$kv has no xz payload"
  offset=${offsets%%$'\n'*}
  xz -dc --single-stream <(tail -c +$((offset + 1)) "/boot/vmlinuz-$kv") >"$vmlinux.tmp.$$" \
    || die "could not decompress /boot/vmlinuz-$kv"
  mv -f "$vmlinux.tmp.$$" "$vmlinux"
fi

# --- The base initramfs (cached) ------------------------------------------------------------
# Everything that does not change from run to run: busybox, the modules, users, /init.
# Uncompressed, because decompressing costs more under TCG than reading. Rebuilt when
# this script, init, busybox or the kernel's modules changed.
base="$cache/base-$kv.cpio"
stale() { # stale ARCHIVE INPUTS...: missing, or older than one of its inputs
  local a=$1 i; shift
  [ -e "$a" ] || return 0
  for i in "$@"; do [ ! "$i" -nt "$a" ] || return 0; done
  return 1
}
if stale "$base" "$0" "$here/init" /bin/busybox "/lib/modules/$kv/modules.dep"; then
  r=$(mktemp -d "$cache/base.XXXXXX")
  mkdir -p "$r"/{bin,etc,proc,sys,dev,tmp,root,scratch,newroot,guest,opt,lib64} \
           "$r/lib/x86_64-linux-gnu" "$r/lib/modules/$kv"
  cp /bin/busybox "$r/bin/busybox"
  # One relative link per applet; `busybox` itself is in the list and would link to itself.
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$r/bin/$a"; done
  # The modules the lane loads, with what modprobe says they depend on in this kernel.
  for m in vfio vfio_iommu_type1 vfio-pci virtio_pci virtio_blk; do
    modprobe -S "$kv" --show-depends "$m" | awk '$1 == "insmod" { print $2 }' | while read -r f; do
      mkdir -p "$r$(dirname "$f")"; cp -n "$f" "$r$f"
    done
  done
  for f in modules.dep modules.alias modules.softdep modules.builtin modules.order; do
    [ -e "/lib/modules/$kv/$f" ] && cp "/lib/modules/$kv/$f" "$r/lib/modules/$kv/"
  done
  # Users for the driver sandbox (it resolves them by name). No nsswitch.conf: glibc then
  # reads the files, which a static binary can do without loading an NSS module.
  cat >"$r/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
outboard-driver:x:999:999:Outboard drivers:/nonexistent:/bin/false
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
  cat >"$r/etc/group" <<'EOF'
root:x:0:
outboard-driver:x:999:
nogroup:x:65534:
EOF
  cp "$here/init" "$r/init"; chmod 0755 "$r/init"
  (cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$base.tmp.$$"
  mv -f "$base.tmp.$$" "$base"
  rm -rf "$r"
fi

# fio for the benchmark, with the closure of its shared libraries (84 MB with Debian's
# ceph and gluster engines, which doubles the boot time: --no-fio leaves it out). All of
# them go to the loader's default folder: there is no ld.so.cache to find others (ceph's).
fio_cpio="$cache/fio.cpio"
if [ "$with_fio" = 1 ] && stale "$fio_cpio" "$0" /usr/bin/fio; then
  command -v fio >/dev/null || die "fio is missing (scripts/setup.sh installs it)"
  r=$(mktemp -d "$cache/fio.XXXXXX")
  mkdir -p "$r/bin" "$r/lib/x86_64-linux-gnu" "$r/lib64"
  cp /usr/bin/fio "$r/bin/fio"
  ldd /usr/bin/fio | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | while read -r l; do
    cp -L "$l" "$r/lib/x86_64-linux-gnu/$(basename "$l")"
  done
  cp -L /lib64/ld-linux-x86-64.so.2 "$r/lib64/"
  (cd "$r" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$fio_cpio.tmp.$$"
  mv -f "$fio_cpio.tmp.$$" "$fio_cpio"
  rm -rf "$r"
fi

# --- This run ---------------------------------------------------------------------------
if [ -z "$work_arg" ]; then
  mkdir -p "$cache/runs"
  work=$(mktemp -d "$cache/runs/run.XXXXXX")
else
  mkdir -p "$work_arg"; work=$work_arg
  keep=1  # a folder the caller named is never deleted
fi
work=$(cd "$work" && pwd)

# Archives one after the other: the kernel unpacks them all, later files win.
s="$work/stage"
rm -rf "$s"; mkdir -p "$s/bin" "$s/guest" "$s/opt"
cp "$outboard" "$s/bin/outboard"
printf '%s\n' "$command_text" >"$s/guest/command"
for c in "${copies[@]}"; do cp -a "$c" "$s/opt/"; done
(cd "$s" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) >"$work/run.cpio"
archives=("$base")
if [ "$with_fio" = 1 ]; then archives+=("$fio_cpio"); fi
cat "${archives[@]}" "$work/run.cpio" >"$work/initramfs.cpio"
rm -rf "$s" "$work/run.cpio"

# Two identical sparse images: one for Outboard, one for the guest kernel's driver.
rm -f "$work/outboard.img" "$work/kernel.img"
truncate -s "$disk_size" "$work/outboard.img" "$work/kernel.img"
lap "initramfs and disks"

# --- Boot -------------------------------------------------------------------------------
# q35 with an emulated Intel IOMMU: interrupt remapping needs the split irqchip, and
# caching-mode lets VFIO map DMA through it. -nodefaults keeps the PCI bus to what is
# named here, at fixed addresses. iommu_platform makes the disks' DMA go through the
# IOMMU (each lands in its own IOMMU group); disable-legacy makes them virtio 1.x only.
# ttyS0: console; ttyS1: the command's output (see init). tsc=reliable: under TCG the guest
# kernel finds the vCPUs' TSCs unsynchronized and falls back to the emulated HPET, which
# makes every clock_gettime a system call and an emulated register read; a real machine
# reads the TSC in the vDSO.
: >"$work/console.log"; : >"$work/output.log"
q=${work//,/,,}  # QEMU option values escape a comma by doubling it
# One guest at a time on this machine: TCG guests side by side would slow each other past
# their timeouts (tests of several suites, benchmarks and people share the lock).
exec 9>"$cache/boot.lock"
flock 9
set +e
timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 -nodefaults -no-user-config \
  -accel tcg,thread=multi -cpu max -smp 2 -m "$memory" \
  -M q35,kernel-irqchip=split -device intel-iommu,intremap=on,caching-mode=on \
  -display none -no-reboot \
  -kernel "$vmlinux" -initrd "$work/initramfs.cpio" \
  -append "console=ttyS0 panic=-1 quiet intel_iommu=on iommu=pt tsc=reliable" \
  -chardev "file,id=console,path=$q/console.log" -serial chardev:console \
  -chardev "file,id=output,path=$q/output.log" -serial chardev:output \
  -drive "if=none,id=outboard,file=$q/outboard.img,format=raw,cache=unsafe" \
  -device virtio-blk-pci,drive=outboard,addr=0x4,serial=outboard-vfio,disable-legacy=on,iommu_platform=on \
  -drive "if=none,id=kernel,file=$q/kernel.img,format=raw,cache=unsafe" \
  -device virtio-blk-pci,drive=kernel,addr=0x5,serial=guest-kernel,disable-legacy=on,iommu_platform=on \
  </dev/null >"$work/qemu.log" 2>&1
qemu_status=$?
set -e
lap "boot and command"
if [ "$console" = 1 ]; then cat "$work/console.log" >&2; fi

# The command's output is everything before init's last "\nOUTBOARD-GUEST-LANE-EXIT N".
marker=$(LC_ALL=C grep -abo 'OUTBOARD-GUEST-LANE-EXIT [0-9]*$' "$work/output.log" | tail -1 || true)
if [ -z "$marker" ]; then
  cat "$work/output.log"
  if [ "$qemu_status" = 124 ] || [ "$qemu_status" = 137 ]; then
    echo "guest-lane: timed out after $timeout_s s; the console's end:" >&2
  else
    echo "guest-lane: the guest ended without reporting a status (qemu: $qemu_status); the console's end:" >&2
  fi
  tail -20 "$work/console.log" >&2
  cat "$work/qemu.log" >&2
  if [ "$qemu_status" = 124 ] || [ "$qemu_status" = 137 ]; then exit 124; fi
  exit 125
fi
offset=${marker%%:*}
status=${marker##* }
head -c $((offset > 0 ? offset - 1 : 0)) "$work/output.log"
if [ -n "$result_file" ]; then echo "$status" >"$result_file"; fi
exit "$status"

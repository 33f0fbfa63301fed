# Sourced by the other scripts (not run): puts the Swift toolchain on PATH when it is
# installed but not on PATH (as the toolchain's own tarballs and packages leave it), so
# that every script, not only the one that looked, finds the same `swift`.
if ! command -v swift >/dev/null; then
  for d in /opt/swift/usr/bin /usr/share/swift/usr/bin; do
    if [ -x "$d/swift" ]; then export PATH="$d:$PATH"; break; fi
  done
fi

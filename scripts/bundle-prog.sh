# Sourced by scripts/device-gateway.sh and scripts/device-bench.sh: copies
# a Debian program with every shared library it loads and the dynamic
# loader into a bundle for a machine without a package registry (the GPU
# machine), behind a wrapper that runs it through that loader, so the
# other machine's own libraries do not matter.
#
#   bundle_prog DIR PROG   ->  DIR/bin/PROG (wrapper), DIR/bin/real/PROG, DIR/lib/*
bundle_prog() {
  local d=$1 prog=$2 path
  path=$(command -v "$prog" || echo "/usr/sbin/$prog")
  [ -x "$path" ] || { echo "bundle_prog: $prog not found" >&2; return 1; }
  mkdir -p "$d/bin/real" "$d/lib"
  cp "$path" "$d/bin/real/$prog"
  ldd "$path" | awk '/=> \// {print $3} /^\t\/.*ld-linux/ {print $1}' | while read -r lib; do
    cp -L "$lib" "$d/lib/"
  done
  cat >"$d/bin/$prog" <<WRAP
#!/bin/sh
d=\$(cd "\$(dirname "\$0")/.." && pwd)
exec "\$d/lib/ld-linux-x86-64.so.2" --library-path "\$d/lib" "\$d/bin/real/$prog" "\$@"
WRAP
  chmod +x "$d/bin/$prog"
}

# Sourced by the scripts that pack binaries for a machine without a
# toolchain or a package registry (the GPU machine): device-bundle.sh,
# device-bench.sh and device-gateway.sh.
#
#   bundle_cnse DIR        ->  DIR/cnse-dp: the release build for baseline
#                              x86-64 (the other machine's CPU may lack this
#                              one's extensions, whatever RUSTFLAGS say here),
#                              stripped of its debug info
#   bundle_prog DIR PROG   ->  DIR/bin/PROG (wrapper), DIR/bin/real/PROG,
#                              DIR/lib/*: a Debian program with every shared
#                              library it loads and the dynamic loader,
#                              behind a wrapper that runs it through that
#                              loader, so the other machine's own libraries
#                              do not matter
#
# Both run from the checkout root.
bundle_cnse() {
  local d=$1
  (unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS && cargo build --release --bin cnse-dp)
  mkdir -p "$d"
  strip --strip-debug -o "$d/cnse-dp" target/release/cnse-dp
}

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

#!/usr/bin/env bash
# Regenerates kv-kernels/ptx/kv_kernels.ptx from the crate's sources with rustc's nvptx64 backend.
#
#   kv-kernels/build-ptx.sh          rebuild the committed PTX
#   kv-kernels/build-ptx.sh --check  rebuild into a temp file; fail if the committed PTX differs
#
# Needs the pinned toolchain (rustup toolchain install nightly-2026-10-30 --component rust-src
# --component llvm-tools --component llvm-bitcode-linker). The build is deterministic: same
# sources and toolchain, same bytes.
set -euo pipefail

TOOLCHAIN=nightly-2026-10-30
ARCH=sm_70            # PTX for compute capability 7.0+, JIT-compiled by the driver (Volta..Blackwell)
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out_file="$here/ptx/kv_kernels.ptx"

check=0
case "${1:-}" in
  --check) check=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

die() {
  echo "" >&2
  echo "##################################################################" >&2
  echo "## build-ptx.sh: $*" >&2
  echo "##################################################################" >&2
  echo "" >&2
  exit 1
}

if ! rustup run "$TOOLCHAIN" rustc --version >/dev/null 2>&1; then
  die "toolchain $TOOLCHAIN is missing. Install it with:
##   rustup toolchain install $TOOLCHAIN --profile minimal \\
##     --component rust-src --component llvm-tools --component llvm-bitcode-linker"
fi
sysroot=$(rustup run "$TOOLCHAIN" rustc --print sysroot)
[ -d "$sysroot/lib/rustlib/src/rust/library/core" ] ||
  die "toolchain $TOOLCHAIN lacks rust-src (rustup component add rust-src --toolchain $TOOLCHAIN)"

target_dir="${CARGO_TARGET_DIR:-$root/target}/kv-kernels-ptx"
# Determinism: a fixed path prefix for anything that could embed paths, no incremental state.
export CARGO_INCREMENTAL=0
export RUSTFLAGS="-C target-cpu=$ARCH --remap-path-prefix=$root=/vramkv --remap-path-prefix=$HOME=/home"
unset RUSTC_WRAPPER CARGO_BUILD_RUSTC_WRAPPER || true

log=$(mktemp)
(cd "$root" && rustup run "$TOOLCHAIN" cargo rustc \
  -p kv-kernels --lib --crate-type cdylib --release \
  --target nvptx64-nvidia-cuda -Zbuild-std=core \
  --target-dir "$target_dir" \
  --config 'profile.release.lto="fat"' \
  --config 'profile.release.codegen-units=1' \
  --config 'profile.release.panic="abort"' \
  --config 'profile.release.debug=false' \
  --config 'profile.release.opt-level=3' \
  --quiet) >"$log" 2>&1 || { cat "$log" >&2; rm -f "$log"; die "the nvptx64 build of kv-kernels failed (see above)"; }
# Show compiler warnings about our own crate (not the nightly cargo's workspace notes).
grep -A8 -E '^warning: .*' "$log" | grep -B1 -A7 -- '--> kv-kernels/' >&2 || true
rm -f "$log"

built="$target_dir/nvptx64-nvidia-cuda/release/kv_kernels.ptx"
[ -f "$built" ] || die "the build produced no $built"

# Register caps per kernel (PTX's `.maxnreg`, what CUDA C++ gets from launch bounds; rustc
# has no attribute for it on nvptx kernels). ptxas gives kv_cache_put 125 registers, which
# holds a multiprocessor to 2 blocks of 256; at 80 it runs 3 blocks and put_and_evict ran
# 1.08x as fast (docs/perf-log/2026-12-h200.md, run 42; at 64 the spills cost more).
capped=$(mktemp)
awk '
  { print }
  /^\)[[:space:]]+\/\/ @kv_cache_put$/ { print ".maxnreg 80"; n++ }
  END { if (n != 1) exit 1 }
' "$built" >"$capped" || { rm -f "$capped"; die "found no entry of kv_cache_put to cap"; }
mv "$capped" "$built"

# Sanity checks on the generated PTX: every kernel present, no system-scope atomics.
for k in kv_put_place kv_put_place_wide kv_put_settle kv_put_dedup kv_put_rewrite kv_get kv_contains kv_count_missing kv_delete kv_rehash \
         kv_count kv_cache_dedup kv_cache_put kv_cache_compact kv_cache_get kv_cache_take kv_cache_count \
         kv_bytes_hash kv_bytes_dedup kv_bytes_lookup kv_bytes_write kv_bytes_get kv_bytes_delete \
         kv_bytes_set_expiry kv_bytes_purge kv_bytes_gather kv_bytes_move kv_bytes_rehash; do
  grep -q "^.visible .entry $k(" "$built" || die "kernel $k is missing from the PTX"
done
if grep -nE '\b(atom|red|ld|st)\.[a-z.]*sys\b' "$built"; then
  die "system-scope memory operations in the PTX (see lines above); use .gpu scope"
fi
if grep -nE '^\s*(atom|red)\.' "$built" | grep -v '\.gpu\.'; then
  die "atomics without an explicit .gpu scope in the PTX (see lines above)"
fi

if [ "$check" = 1 ]; then
  tmp=$(mktemp)
  trap 'rm -f "$tmp"' EXIT
  cp "$built" "$tmp"
  if ! cmp -s "$tmp" "$out_file"; then
    diff -u "$out_file" "$tmp" | head -40 >&2 || true
    die "kv-kernels/ptx/kv_kernels.ptx is stale: run kv-kernels/build-ptx.sh and commit the result"
  fi
  echo "build-ptx.sh: kv-kernels/ptx/kv_kernels.ptx is up to date"
else
  mkdir -p "$(dirname "$out_file")"
  cp "$built" "$out_file"
  echo "build-ptx.sh: wrote kv-kernels/ptx/kv_kernels.ptx ($(wc -l <"$out_file") lines)"
fi

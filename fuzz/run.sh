#!/usr/bin/env bash
# Run every fuzz target (or the ones named as arguments) for $FUZZ_SECONDS each, one after
# another, with one libFuzzer worker. Usage: fuzz/run.sh [target...]
#
#   FUZZ_SECONDS   seconds per target (default 600)
#   FUZZ_SANITIZER none (default: we look for panics, aborts, OOM and hangs; Rust is memory
#                  safe) or address (ASan; slower, and needs the whole dependency tree rebuilt)
#   CARGO_TARGET_DIR  build directory (default fuzz/target, which is git-ignored)
#
# Needs cargo-fuzz (installed here if missing). cargo-fuzz uses nightly-only rustc flags
# (-Zsanitizer, -Cpasses=sancov-module, ...); on a stable toolchain RUSTC_BOOTSTRAP=1 lets
# stable rustc accept them.
#
# Seeds are read from fuzz/corpus/<target>/ (committed, never written); what the run finds is
# kept in fuzz/corpus-run/<target>/ and crashes in fuzz/artifacts/<target>/ (both ignored).
set -euo pipefail
cd "$(dirname "$0")"

FUZZ_SECONDS="${FUZZ_SECONDS:-600}"
FUZZ_SANITIZER="${FUZZ_SANITIZER:-none}"
ALL_TARGETS=(safetensors_header gguf_reader data_lines adapter_config quant_state)
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=("${ALL_TARGETS[@]}")

export RUSTC_BOOTSTRAP=1
# One thread for rayon (GGUF dequantization is parallel): one core per fuzzing run.
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}"

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked

max_len() {
    case "$1" in
        gguf_reader) echo 65536 ;;
        safetensors_header) echo 16384 ;;
        *) echo 8192 ;;
    esac
}

# -a: debug assertions and overflow checks on (an overflow is a bug we want to see).
# Build once, then run the binaries directly: `cargo fuzz run` would rebuild between targets
# whenever someone edits the core meanwhile.
cargo fuzz build -s "$FUZZ_SANITIZER" -a
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
BIN="${CARGO_TARGET_DIR:-target}/$TRIPLE/release"

mkdir -p logs
status=0
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus-run/$t" "artifacts/$t"
    echo "== $t: ${FUZZ_SECONDS}s"
    if ! "$BIN/$t" "corpus-run/$t" "corpus/$t" \
        -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -timeout=10 \
        -max_len="$(max_len "$t")" -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" 2>&1 | tee "logs/$t.log"; then
        echo "!! $t failed: see fuzz/logs/$t.log and fuzz/artifacts/$t/"
        status=1
    fi
done
exit $status

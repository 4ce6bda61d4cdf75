#!/usr/bin/env bash
# Shell completions and man pages of every peftkit tool, generated from their clap parsers
# (the hidden --completions SHELL and --man flags):
#   target/completions/<tool>.bash, _<tool> (zsh), <tool>.fish, <tool>.elv, _<tool>.ps1
#   target/man/man1/<tool>.1
# Usage: scripts/gen-completions.sh [BIN_DIR]   (default target/release; build it first)
# Install e.g.: cp target/completions/*.bash ~/.local/share/bash-completion/completions/
#               cp target/man/man1/*.1 ~/.local/share/man/man1/
set -euo pipefail
BIN=${1:-${BIN:-target/release}}
OUT=${OUT:-target}
TOOLS="model-import model-export quantize-nf4 peft-train peft-eval peft-generate adapter-merge adapter-inspect rm-train rm-score dpo-train ppo-train grpo-train gpu-check"
mkdir -p "$OUT/completions" "$OUT/man/man1"
for t in $TOOLS; do
  if [ ! -x "$BIN/$t" ]; then
    echo "error: $BIN/$t is not built (cargo build --release --bins)" >&2
    exit 1
  fi
  "$BIN/$t" --completions bash >"$OUT/completions/$t.bash"
  "$BIN/$t" --completions zsh >"$OUT/completions/_$t"
  "$BIN/$t" --completions fish >"$OUT/completions/$t.fish"
  "$BIN/$t" --completions elvish >"$OUT/completions/$t.elv"
  "$BIN/$t" --completions powershell >"$OUT/completions/_$t.ps1"
  "$BIN/$t" --man >"$OUT/man/man1/$t.1"
done
echo "completions in $OUT/completions, man pages in $OUT/man/man1 ($(echo $TOOLS | wc -w) tools)"

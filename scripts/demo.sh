#!/usr/bin/env bash
# make demo: ask the imported SmolLM2-135M-Instruct a question through its chat template.
set -euo pipefail
MODEL=${MODEL:-models/smollm2}
BIN=${BIN:-target/release}
Q="What is the capital of France?"

echo "==> $Q"
answer=$("$BIN/peft-generate" --model "$MODEL" --chat --prompt "$Q" --max-new-tokens 32)
echo "$answer"
if ! grep -q "Paris" <<<"$answer"; then
  echo "error: demo: the answer does not mention Paris" >&2
  exit 1
fi
echo "==> perplexity of a sample sentence"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo '{"text": "The quick brown fox jumps over the lazy dog near the forest."}' > "$tmp/s.jsonl"
"$BIN/peft-eval" --model "$MODEL" --data "$tmp/s.jsonl"

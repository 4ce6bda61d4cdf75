"""Steady-state training tokens/s from a peft-train JSONL log: the steps after the first one
(the first step pays for cold caches and one-time packing; bench/hf_reference.py likewise leaves
its first step out). Prints one JSON object."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
# the log's tokens_per_second is cumulative: elapsed = tokens / tokens_per_second
elapsed = [r["tokens"] / r["tokens_per_second"] for r in rows]
if len(rows) > 1:
    tps = (rows[-1]["tokens"] - rows[0]["tokens"]) / (elapsed[-1] - elapsed[0])
else:
    tps = rows[-1]["tokens_per_second"]
print(json.dumps({"tokens_per_second": tps, "loss": rows[-1]["loss"], "steps": len(rows)}))

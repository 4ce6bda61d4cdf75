#!/usr/bin/env bash
# Fetch LLaMA-Factory's demo data sets (inside its PyPI source package; sha256-checked) into
# data/. They are Alpaca-derived (CC BY-NC 4.0): fetched at run time, never committed.
set -euo pipefail
CACHE=${CACHE:-.cache}
DATA=${DATA:-data}
PYTHON=${PYTHON:-python3}
SDIST=llamafactory-0.9.5.tar.gz
SDIST_SHA=1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f

mkdir -p "$CACHE" "$DATA"
if [ -f "$DATA/alpaca_en_demo.json" ] && [ -f "$DATA/dpo_en_demo.json" ]; then exit 0; fi
if ! echo "$SDIST_SHA  $CACHE/$SDIST" | sha256sum -c --quiet - 2>/dev/null; then
  echo "==> downloading llamafactory 0.9.5 source package from PyPI"
  "$PYTHON" -m pip download --no-deps --no-binary :all: llamafactory==0.9.5 -d "$CACHE"
  echo "$SDIST_SHA  $CACHE/$SDIST" | sha256sum -c --quiet - || { echo "error: $CACHE/$SDIST: sha256 mismatch" >&2; exit 1; }
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar xzf "$CACHE/$SDIST" -C "$tmp" llamafactory-0.9.5/data/alpaca_en_demo.json llamafactory-0.9.5/data/dpo_en_demo.json
mv "$tmp/llamafactory-0.9.5/data/alpaca_en_demo.json" "$tmp/llamafactory-0.9.5/data/dpo_en_demo.json" "$DATA/"
echo "==> data sets in $DATA/"

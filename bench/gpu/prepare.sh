#!/usr/bin/env bash
# Prepares, on this (networked) machine, what the GPU device check needs on a GPU machine that
# has no network (docs/gpu.md): the cuda build of the tools, the tokenizer of the demo model,
# and a bitsandbytes wheel cut down to its CPU and CUDA 13 libraries (7 MB instead of 43 MB,
# so that everything carried stays under a 64 MB transfer limit). Everything goes to .gpu/
# (git-ignored) and target/cuda/release; the tools also go to .gpu/bin.tar.xz, which is what
# a GPU machine is sent.
#
#   bash bench/gpu/prepare.sh        # MODEL=models/smollm2 BNB=0.50.2 PYTHON=python3
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL=${MODEL:-models/smollm2}
BNB=${BNB:-0.50.2}
PYTHON=${PYTHON:-python3}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude

make build-cuda

mkdir -p .gpu/tok
cp "$MODEL"/tokenizer.json "$MODEL"/tokenizer_config.json .gpu/tok/

if ! ls .gpu/whl-slim/bitsandbytes-*.whl >/dev/null 2>&1; then
    mkdir -p .gpu/whl .gpu/whl-slim
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
        --platform manylinux_2_17_x86_64 -d .gpu/whl "bitsandbytes==$BNB"
    "$PYTHON" - <<'EOF'
# Copy the wheel without the ROCm, XPU and CUDA 11/12 libraries; RECORD lists what remains.
import glob, os, re, zipfile
src = glob.glob(".gpu/whl/bitsandbytes-*.whl")[0]
dst = os.path.join(".gpu/whl-slim", os.path.basename(src))
drop = re.compile(r"libbitsandbytes_(rocm|xpu|cuda1[12])\d*\.so$")
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    kept = [i for i in zin.infolist() if not drop.search(i.filename)]
    for info in kept:
        data = zin.read(info.filename)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            names = {i.filename for i in kept}
            data = ("\n".join(l for l in lines if l.split(",")[0] in names) + "\n").encode()
        zout.writestr(info, data)
print(f"{dst}: {os.path.getsize(dst) / 1e6:.1f} MB")
EOF
fi
# The tools, compressed (about 20 MB for the eight instead of 87): device_check.sh unpacks them.
B=target/cuda/release
TOOLS="gpu-check peft-train peft-eval peft-generate rm-train rm-score dpo-train ppo-train grpo-train"
(cd $B && tar -cJf - $TOOLS) > .gpu/bin.tar.xz
du -sh .gpu/tok .gpu/whl-slim .gpu/bin.tar.xz
echo "carry: .gpu/bin.tar.xz .gpu/whl-slim .gpu/tok"
echo "run:   bash bench/gpu/device_check.sh [SECONDS]"

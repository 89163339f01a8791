#!/usr/bin/env bash
# Issue 15 GPU grid (second of two calls: the first carried .gg/p1, this one .gg/p2 — the GGUF is 98 MB and a
# call carries 64 MiB). Usage on the device: bash scripts/device/colorist_grid1.sh
set -uo pipefail
source scripts/device/setup.sh
mkdir -p /tmp/gg && { [ -f /tmp/gg/smol.gguf ] || cat /tmp/gg/p1 .gg/p2 > /tmp/gg/smol.gguf; } && ls -la /tmp/gg
[ -d .whl_gguf ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl_gguf/*.whl
export JOB_EXTRA="train.speed.adapter_dtype=fp32 train.speed.compile=off train.sample_every=0 train.precision=fp32"
# the HF folder once, then the two nf4-roundtripped copies for the fake-quant LoRA runs
python -m ftpipe +recipe=colorist_lora model.path=/tmp/gg/smol.gguf "stages=[download,map,pack]" > $OUT/prep.log 2>&1
src=$(ls -d $FTPIPE_CACHE/download-model/*/model | head -1)
python scripts/nf4_roundtrip.py "$src" /tmp/fakenf4 --json $OUT/nf4_error.json
python scripts/nf4_roundtrip.py "$src" /tmp/fakenf4_keep10 --keep-last 10 > /dev/null
nvidia-smi --query-gpu=name,memory.used --format=csv
JOB_TIMEOUT=450 bash scripts/colorist_jobs.sh docs/bench/colorist/grid1.txt /tmp/grid1
cp /tmp/grid1/grid.md $OUT/grid1.md
tar czf $OUT/grid1_logs.tgz -C /tmp/grid1 --exclude='*.safetensors' . 2>/dev/null

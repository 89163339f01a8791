#!/usr/bin/env bash
# Issue 15 GPU grids: colorist jobs side by side on one GPU, each on one CPU thread. The GGUF (98 MB) travels in
# two calls, a call carrying at most 64 MiB: `bash scripts/device/colorist_grid.sh --part1` carrying .gg/p1, then
# at once (the machine stays warm 30 s) `bash scripts/device/colorist_grid.sh GRID_FILE` carrying .gg/p2.
set -uo pipefail
source scripts/device/setup.sh
[ -d .whl_gguf ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl_gguf/*.whl
mkdir -p /tmp/gg
if [ "${1:-}" = --part1 ]; then cp .gg/p1 /tmp/gg/p1; exit; fi
grid=${1:?usage: colorist_grid.sh --part1 | GRID_FILE}
name=$(basename "$grid" .txt)
[ -f /tmp/gg/smol.gguf ] || cat /tmp/gg/p1 .gg/p2 > /tmp/gg/smol.gguf
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # 14 jobs on 16 cores: one thread each or they thrash
export JOB_EXTRA="model.path=/tmp/gg/smol.gguf train.speed.adapter_dtype=fp32 train.speed.compile=off \
train.sample_every=0 train.precision=fp32 export.gguf=[]"
python -m ftpipe +recipe=colorist_lora $JOB_EXTRA "stages=[download,map,pack]" > $OUT/prep.log 2>&1
JOB_TIMEOUT=${JOB_TIMEOUT:-480} bash scripts/colorist_jobs.sh "$grid" /tmp/$name
cp /tmp/$name/grid.md $OUT/$name.md
tar czf $OUT/${name}_logs.tgz -C /tmp/$name --exclude='*.safetensors' . 2>/dev/null

#!/usr/bin/env bash
# Build the wheels the GPU machine lacks (its image has torch, transformers, peft, accelerate, triton, pyarrow,
# pandas, xxhash, fsspec, huggingface-hub, but not these) into DIR (default .whl_bench, git-ignored), for
# `run` calls that carry it and source scripts/device/setup.sh. Run here, in the repository root:
#   bash scripts/device/wheels.sh [DIR]
# bitsandbytes keeps only its CUDA 13.0 and CPU libraries (the image's torch is cu130), so that the whole set
# stays far under a call's 64 MiB; antlr4-python3-runtime 4.9.3 (omegaconf's pin) exists only as an sdist.
set -euo pipefail
dir=${1:-.whl_bench}
mkdir -p "$dir"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$dir" bitsandbytes==0.50.2 liger-kernel==0.8.5 omegaconf==2.3.1 hydra-core==1.3.8 gguf==0.19.0 \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 py-spy==0.4.3
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --no-binary=:all: -d "$tmp" antlr4-python3-runtime==4.9.3
python3 -m pip wheel -q --no-deps -w "$dir" "$tmp"/antlr4-python3-runtime-4.9.3.tar.gz
rm -rf "$tmp"
bnb=$(ls "$dir"/bitsandbytes-*.whl)
drop=$(unzip -Z1 "$bnb" | grep 'libbitsandbytes_' | grep -v -e cuda130 -e _cpu || true)
[ -z "$drop" ] || zip -q -d "$bnb" $drop
du -sh "$dir"

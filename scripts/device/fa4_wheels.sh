#!/usr/bin/env bash
# flash-attn-4 (FlashAttention's CuTe DSL kernels, for Hopper and Blackwell) for the GPU machine, which lacks it.
# Its compiler library alone is 193 MB unpacked (92 MB as a wheel), over what one `run` call carries (64 MiB with
# the checkout), so this packs the installed tree in two parts of under 50 MB, each for its own call:
#   DIR/a/ir.so.xz    the CuTe DSL's MLIR library, xz-compressed
#   DIR/b/rest.tar.xz everything else (flash_attn, the DSL's Python, tvm-ffi, quack, torch-c-dlpack-ext)
# Run here, in the repository root: bash scripts/device/fa4_wheels.sh [DIR]   (default .whl_fa4, git-ignored)
# There: a first call carries DIR/a and copies it to /tmp; the next, made within the machine's 30 s of warmth,
# carries DIR/b and runs `source scripts/device/fa4_setup.sh`, which unpacks both into /tmp/site.
set -euo pipefail
dir=${1:-.whl_fa4}
mkdir -p "$dir/a" "$dir/b"
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$tmp/wheels" flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
    nvidia-cutlass-dsl-libs-core==4.8.1 \
    nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
mkdir "$tmp/site"
for w in "$tmp"/wheels/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done  # pure and platlib wheels: a plain unpack
big=nvidia_cutlass_dsl/dsl_packages/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so
xz -9e -T2 -c "$tmp/site/$big" > "$dir/a/ir.so.xz"
echo "$big" > "$dir/a/path"
rm "$tmp/site/$big"
tar -C "$tmp/site" -cf - . | xz -9 -T2 > "$dir/b/rest.tar.xz"
rm -rf "$tmp"
du -sh "$dir"/a "$dir"/b

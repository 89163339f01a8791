#!/usr/bin/env bash
# Issue 15 CPU step timings on two pinned cores of the device machine (quiet, unlike a shared dev box), AVX2-only
# fp32 and native side by side; the GPU hidden. Usage: bash scripts/device/cpu_bench.sh
set -uo pipefail
source scripts/device/setup.sh

lscpu | grep -E "Model name|Flags" | sed 's/Flags:.*\(avx512_bf16\|amx_bf16\).*/has bf16 (&)/' | cut -c1-200 > $OUT/cpu.txt
grep -o -w 'avx512_bf16\|amx_bf16\|avx2\|avx512f' /proc/cpuinfo | sort | uniq -c >> $OUT/cpu.txt
CUDA_VISIBLE_DEVICES= FTPIPE_CACHE=/tmp/c1 taskset -c 0,1 python scripts/bench_cpu.py --out $OUT --avx2 --steps 15 \
    --variants all_r64,last10_r64,last10_r16,last6_r64 > $OUT/avx2.log 2>&1 &
CUDA_VISIBLE_DEVICES= FTPIPE_CACHE=/tmp/c2 taskset -c 4,5 python scripts/bench_cpu.py --out $OUT --steps 15 \
    --variants all_r64,last10_r64,last10_r16 > $OUT/native.log 2>&1 &
wait
cat $OUT/cpu.txt; tail -n 4 $OUT/avx2.log $OUT/native.log | cut -c1-600

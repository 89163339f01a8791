#!/usr/bin/env bash
# What the CPU-built changes of the thirteenth session do on a GPU (docs/performance.md): the GPU tests of the
# unread down projection, the dropout masks and the 4-bit base with dropout; the correctness guard for the
# checkpointed cases; then the command A/B: `train.speed.skip_unread_output` on (the default) and off for
# Qwen2.5-7B QLoRA and 1B LoRA + offload, and 1B QLoRA with LoRA dropout 0.1 against none; and the warm start's
# import tree. Usage (device; the call before this one carried .whl_fa4/a, this one carries .whl_bench and
# .whl_fa4/b):  bash scripts/device/recompute_ab.sh      results under $OUT
set -u
export WHEELS=${WHEELS:-.whl_bench}
source scripts/device/setup.sh
source scripts/device/fa4_setup.sh || echo "recompute_ab: no flash-attn-4 (FlashAttention-2 then)"
unset PYTHONDONTWRITEBYTECODE
python -m pytest -q tests/training/test_speed.py -k "unread or dropout or offloaded or 4bit" > "$OUT/pytest.log" 2>&1
tail -3 "$OUT/pytest.log"
python scripts/bench.py --sides ftpipe --cases "" --guard llama1b_lora_ckpt,llama1b_qlora > "$OUT/guard.log" 2>&1
grep -i "pass\|fail" "$OUT/guard.log" | tail -4
off=train.speed.skip_unread_output=off
python scripts/bench_command.py /tmp/ab --steps "${STEPS:-60}" --cases \
    "qwen7b_qlora,qwen7b_qlora@$off,lora_offload,lora_offload@$off,qlora,qlora@train.lora.dropout=0.1" \
    > "$OUT/ab.log" 2>&1
cp /tmp/ab/command.json "$OUT/ab_command.json" 2>/dev/null
grep -h "^[a-z0-9_@.=]*: {" "$OUT/ab.log" | cut -c1-220
bash scripts/device/import_times.sh > "$OUT/imports.txt" 2>&1
head -12 "$OUT/imports.txt"

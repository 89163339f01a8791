#!/usr/bin/env bash
# Issue 18 A/B on one GPU machine: the `ftpipe` command of this checkout against an older tree of it (BEFORE, made
# with `git archive COMMIT ftpipe scripts conf recipes pyproject.toml | tar -x -C build/before`) on the same rows
# and machine, then the correctness guard of this checkout. Usage (device, carrying .whl_bench and BEFORE):
#   BEFORE=build/before CASES=lora,qlora,lora_offload [BEFORE_CASES=lora] [CPP_CASES=lora,lora@train.speed.fused_lora=off] \
#       bash scripts/device/issue18_ab.sh
# CPP_CASES: cases run again with inductor's C++ wrapper (TORCHINDUCTOR_CPP_WRAPPER=1: the compiled layers launch
# their kernels from generated C++ instead of Python; on torch 2.11 it fails on varlen attention's int[] argument).
# The compiled artefacts are shared ($FTPIPE_CACHE/build): only the first run of a shape in a call is a cold start.
set -uo pipefail
export WHEELS=${WHEELS:-.whl_bench}
source scripts/device/setup.sh
unset PYTHONDONTWRITEBYTECODE  # the image sets it: every import would compile from source (not a user's install)
CASES=${CASES:-lora,qlora,lora_offload} STEPS=${STEPS:-40} GUARD=${GUARD-llama1b_lora,llama1b_lora_ckpt,llama1b_qlora}
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
python scripts/bench_command.py /tmp/after --cases $CASES --steps $STEPS --warm lora ${AFTER_ARGS:-} > $OUT/after.log 2>&1
# from inside BEFORE: `python -m ftpipe` finds the ftpipe package of its working directory first
cp /tmp/after/command.json $OUT/after_command.json 2>/dev/null
[ -n "${BEFORE:-}" ] && (cd $BEFORE && python scripts/bench_command.py /tmp/before --cases ${BEFORE_CASES:-$CASES} \
    --steps $STEPS --warm lora ${BEFORE_ARGS:-}) > $OUT/before.log 2>&1
[ -n "${CPP_CASES:-}" ] && TORCHINDUCTOR_CPP_WRAPPER=1 python scripts/bench_command.py /tmp/cpp --cases $CPP_CASES \
    --steps $STEPS > $OUT/cpp.log 2>&1
[ -n "$GUARD" ] && python scripts/bench.py --sides ftpipe --cases "" --guard $GUARD --json $OUT/guard.json \
    > $OUT/guard.log 2>&1
for d in after before cpp; do
    [ -d /tmp/$d ] && tar czf $OUT/$d.tgz -C /tmp/$d --exclude=cache --exclude='corpus*' .
done
grep -h "^[a-z_@.=0-9]*: {" $OUT/after.log $OUT/before.log $OUT/cpp.log 2>/dev/null | cut -c1-400
grep -h "guard .*: \(PASS\|FAIL\)" $OUT/guard.log 2>/dev/null | cut -c1-300

#!/usr/bin/env bash
# Deterministic figures of a change (issue 18): GPU time by kernel kind and what is alive at the memory peak,
# from `train.profile` over a few steady steps of each case, then the correctness guard. The command's rate
# varies by +-10% between runs of one config on these machines; kernel times and peaks do not. Usage (device):
#   SPECS="lora@train.profile.host_ops=false lora_offload@train.profile.memory=true" bash scripts/device/profile_cases.sh
# Each spec is a bench_command.py case with overrides (profiled: 5 steps from step 20 of 30 unless it says).
# Results: $OUT/NAME_summary.json, $OUT/NAME_memory_peak.json, $OUT/NAME.log, $OUT/guard.json.
# TRACES=1 also brings back $OUT/NAME_trace.json.gz, for `python scripts/trace_gaps.py` (why the GPU idled).
set -uo pipefail
export WHEELS=${WHEELS:-.whl_bench}
source scripts/device/setup.sh
unset PYTHONDONTWRITEBYTECODE
GUARD=${GUARD-llama1b_lora,llama1b_lora_ckpt,llama1b_qlora}
i=0
for spec in ${SPECS:?}; do
    i=$((i + 1)); name="p${i}_${spec%%@*}"
    python scripts/bench_command.py /tmp/prof/$name --cases "$spec@train.profile.steps=${PSTEPS:-5}@train.profile.start=20" \
        --steps 30 > $OUT/$name.log 2>&1
    for f in summary.json memory_peak.json; do
        find /tmp/prof/$name/cache -name $f -path '*profile*' -exec cp {} $OUT/${name}_$f \;
    done
    [ -n "${TRACES-}" ] && find /tmp/prof/$name/cache -name trace.json.gz -path '*profile*' -exec cp {} $OUT/${name}_trace.json.gz \;
    grep -h "^${spec%%@*}.*: {" $OUT/$name.log | cut -c1-400
    python3 -c "
import json, sys
s = json.load(open('$OUT/${name}_summary.json'))
print('  $name step_ms', round(s['step_ms'], 1), 'gpu busy/step', round(s['gpu_busy_ms_per_step'], 1),
      {k: round(v / s['steps'], 2) for k, v in s['gpu_ms_by_kind'].items()})
" 2>/dev/null
    python3 -c "
import json; m = json.load(open('$OUT/${name}_memory_peak.json')); print('  $name peak', {k: v for k, v in m.items() if not isinstance(v, (list, dict))})
" 2>/dev/null
done
[ -n "$GUARD" ] && python scripts/bench.py --sides ftpipe --cases "" --guard $GUARD --json $OUT/guard.json > $OUT/guard.log 2>&1
grep -h "guard .*: \(PASS\|FAIL\)" $OUT/guard.log 2>/dev/null | cut -c1-300

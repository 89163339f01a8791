#!/usr/bin/env bash
# The rate a user gets over a longer run (issue 18): the command's 5-step windows over STEPS steps for CASES,
# then LoRA with every CUDA kernel loaded at start (CUDA_MODULE_LOADING=EAGER), so that the windows' spread
# from kernels loaded on first use shows. Usage (device, carrying .whl_bench):
#   bash scripts/device/long_run.sh            # results under $OUT/long and $OUT/eager
set -u
export WHEELS=${WHEELS:-.whl_bench}
source scripts/device/setup.sh
unset PYTHONDONTWRITEBYTECODE
python scripts/bench_command.py /tmp/long --cases "${CASES:-lora,qlora}" --steps "${STEPS:-200}" > "$OUT/long.log" 2>&1
CUDA_MODULE_LOADING=EAGER python scripts/bench_command.py /tmp/eager --cases lora --steps 60 > "$OUT/eager.log" 2>&1
for d in long eager; do mkdir -p "$OUT/$d" && cp /tmp/$d/command.json "$OUT/$d/" 2>/dev/null; done
python3 - <<'P'
import json, statistics
for d in ("/tmp/long", "/tmp/eager"):
    try:
        cases = json.load(open(f"{d}/command.json"))["cases"]
    except (OSError, KeyError, ValueError) as e:
        print(d, "no results:", e)
        continue
    for name, res in cases.items():
        rates = res.get("rates") or []
        print(d, name, {k: res.get(k) for k in ("train_tokens_per_second_steady", "train_peak_memory_gib_steady",
                                                 "train_first_step_seconds", "mean_rate_after_first_log")})
        quarter = max(1, len(rates) // 4)
        for i in range(0, len(rates), quarter):
            part = rates[i : i + quarter]
            print(f"   windows {i}-{i + len(part) - 1}: median {statistics.median(part):,.0f}, min {min(part):,.0f}, max {max(part):,.0f}")
P

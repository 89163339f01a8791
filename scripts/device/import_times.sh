#!/usr/bin/env bash
# Where a warm start's imports go (issue 18): `python -X importtime` over the train stage's imports (fit()'s, in
# its order, then flash-attn-4's DSL), each package's own and cumulative seconds, three fresh processes.
# Usage (device, after scripts/device/setup.sh and fa4_setup.sh): bash scripts/device/import_times.sh
# Results: $OUT/importtime_N.txt (the raw tree); the top-level packages' cumulative times on stdout.
set -uo pipefail
unset PYTHONDONTWRITEBYTECODE  # as a pip install leaves it: bytecode written once, read after
imports="import torch
from datasets import load_from_disk
from torch.utils.tensorboard import SummaryWriter
from transformers import set_seed
from transformers.integrations import TensorBoardCallback
from ftpipe.training import speed
from ftpipe.training.model import load_for_training
from ftpipe.training.trainer import FtTrainer
import flash_attn.cute"
for i in 0 1 2; do
    python -X importtime -c "$imports" 2> $OUT/importtime_$i.txt
done
python - $OUT/importtime_2.txt <<'PY'
import re, sys
rows = []
for line in open(sys.argv[1]):
    m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
    if m:
        rows.append((int(m[2]), int(m[1]), len(m[3]) // 2, m[4]))
top = [r for r in rows if r[2] <= 1]
print("total (top level) %.2f s" % (sum(r[0] for r in rows if r[2] == 0) / 1e6))
for cum, own, depth, name in sorted(top, reverse=True)[:40]:
    print(f"{cum / 1e6:7.3f} s cumulative {own / 1e6:7.3f} s own  {'  ' * depth}{name}")
PY

#!/usr/bin/env bash
# Run colorist jobs side by side (one GPU holds many 135M runs at once), then tabulate their run.json.
#   usage: scripts/colorist_jobs.sh GRID_FILE OUT_DIR
# GRID_FILE: one job a line, `NAME override ...` (appended to `+recipe=colorist_lora` and $JOB_EXTRA);
# lines starting with # are skipped; JOB_TIMEOUT=SECONDS bounds each job. Each job's log and run dir land in OUT_DIR/NAME*; OUT_DIR/grid.md is the table.
set -uo pipefail
grid=${1:?usage: scripts/colorist_jobs.sh GRID_FILE OUT_DIR}
out=${2:?usage: scripts/colorist_jobs.sh GRID_FILE OUT_DIR}
mkdir -p "$out"
while read -r name overrides; do
    [[ -z $name || $name == \#* ]] && continue
    # shellcheck disable=SC2086  # overrides are a list
    ${JOB_TIMEOUT:+timeout $JOB_TIMEOUT} python -m ftpipe +recipe=colorist_lora ${JOB_EXTRA:-} $overrides \
        "hydra.run.dir=$out/$name" \
        > "$out/$name.log" 2>&1 &
done < "$grid"
wait
python - "$grid" "$out" <<'PY'
import json, sys
from pathlib import Path
grid, out = Path(sys.argv[1]), Path(sys.argv[2])
keys = ["color_distance_before", "color_distance_after", "hex_valid_rate_after", "answer_loss_after", "train_loss",
        "train_steps", "train_seconds"]
lines = ["| job | overrides | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
for line in grid.read_text().splitlines():
    if not line.strip() or line.startswith("#"):
        continue
    name, _, overrides = line.partition(" ")
    run = out / name / "run.json"
    if not run.exists():
        tail = (out / f"{name}.log").read_text()[-300:].replace("\n", " ").replace("|", "/")
        lines.append(f"| {name} | {overrides} | failed: {tail} |")
        continue
    merged = {}
    for row in json.loads(run.read_text())["stages"]:
        merged.update(row)
    lines.append(f"| {name} | {overrides} | " + " | ".join(str(merged.get(k, "—")) for k in keys) + " |")
(out / "grid.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY

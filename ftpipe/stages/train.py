"""train: fine-tune the downloaded model on the packed dataset (full, LoRA, QLoRA, 8-bit LoRA) with HF Trainer.

Writes `checkpoints/` (every train.save_steps, last train.save_total_limit kept), `tb/` (TensorBoard scalars),
`final/` (the adapter or the full model), `log_history.json`, and with train.sample_every `samples.jsonl`.
Resumable: the engine keeps `<key>.tmp` after a kill, and a rerun with the same key continues from the newest
complete checkpoint. `launcher=local` trains in this process; other launchers run it under torchrun.
"""

from __future__ import annotations

from typing import Any

from ..engine import Stage, StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    if ctx.cfg["launcher"]["name"] == "local":
        from ..training.fit import fit

        metrics = fit(ctx)
        assert metrics is not None  # one process is the main process
        return metrics
    from ..training.launch import launch

    return launch(ctx)


STAGE = Stage(
    name="train",
    version="2",
    # template and dataset only shape the optional sample replies; pack's key already follows both
    reads=("train", "optimizer", "seed", "model.trust_remote_code", "template", "dataset", "launcher"),
    upstream=("download", "pack"),
    run=run,
    resumable=True,
)

"""The run report: stage table, metrics before/after, samples and the loss curve."""

from __future__ import annotations

import json

from ftpipe.report import write_report


def test_report_has_stage_table_metrics_samples_and_loss_curve(tmp_path):
    train_dir, eval_dir = tmp_path / "train", tmp_path / "eval"
    train_dir.mkdir()
    eval_dir.mkdir()
    (train_dir / "log_history.json").write_text(
        json.dumps([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}])
    )
    (eval_dir / "samples.jsonl").write_text(
        json.dumps({"input": "sky", "reference": "#0000ff", "before": "blue", "after": "#0011ee"}) + "\n"
    )
    rows = [
        {
            "name": "train",
            "key": "k1",
            "hit": False,
            "seconds": 3.0,
            "output": str(train_dir),
            "train_loss": 2.0,
        },
        {
            "name": "evaluate-chat",
            "key": "k2",
            "hit": True,
            "seconds": 0.1,
            "output": str(eval_dir),
            "hex_valid_rate_before": 0.0,
            "hex_valid_rate_after": 1.0,
            "color_distance_mean_baseline": 114.5,
        },
    ]
    text = write_report(rows, tmp_path).read_text()
    assert "| train | `k1` | ran |" in text and "| evaluate-chat | `k2` | hit |" in text
    assert "| hex_valid_rate | 0 | 1 |" in text
    assert "color_distance_mean_baseline: 114.5" in text
    assert "#0011ee" in text
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000

"""Task metrics and the run report."""

from __future__ import annotations

import json
import math

import pytest

from ftpipe.evaluation.metrics import colour_baselines, colour_metrics, name_rate, parse_hex
from ftpipe.report import write_report


def test_parse_hex_accepts_exactly_one_code():
    assert parse_hex(" #FF8000\n") == (255, 128, 0)
    for bad in ("FF8000", "#ff80", "#ff8000 is orange", "orange", "#gg0000"):
        assert parse_hex(bad) is None


def test_colour_metrics_average_over_valid_replies_only():
    m = colour_metrics(["#000000", "not a colour", "#ffffff"], ["#000000", "#000000", "#fffff0"], "after")
    assert m["hex_valid_rate_after"] == pytest.approx(2 / 3)
    assert m["color_distance_after"] == pytest.approx(15 / 2)
    assert colour_metrics(["nope"], ["#000000"], "before")["color_distance_before"] is None


def test_baselines_mean_and_expected_random_colour():
    b = colour_baselines(["#000000", "#ff0000"], ["#000000"])
    assert b["color_distance_mean_baseline"] == pytest.approx(127.5)
    assert b["color_distance_random_baseline"] == pytest.approx((0 + 255) / 2)
    b = colour_baselines(["#000000", "#ffffff"], ["#000000", "#ffffff"])
    assert b["color_distance_mean_baseline"] == pytest.approx(math.dist((127.5,) * 3, (0, 0, 0)))


def test_name_rate_is_case_insensitive():
    assert name_rate(["I am Ada's assistant", "我是ada的小助手", "I am a model"], "Ada") == pytest.approx(
        2 / 3
    )


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

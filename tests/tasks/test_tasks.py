"""The evaluation tasks' metrics: colorist replies and baselines, the assistant's name rate."""

from __future__ import annotations

import math

import pytest

from ftpipe.tasks.assistant import name_rate
from ftpipe.tasks.colorist import color_baselines, color_metrics, parse_hex


def test_parse_hex_accepts_exactly_one_code():
    assert parse_hex(" #FF8000\n") == (255, 128, 0)
    for bad in ("FF8000", "#ff80", "#ff8000 is orange", "orange", "#gg0000"):
        assert parse_hex(bad) is None


def test_color_metrics_average_over_valid_replies_only():
    m = color_metrics(["#000000", "not a colour", "#ffffff"], ["#000000", "#000000", "#fffff0"], "after")
    assert m["hex_valid_rate_after"] == pytest.approx(2 / 3)
    assert m["color_distance_after"] == pytest.approx(15 / 2)
    assert color_metrics(["nope"], ["#000000"], "before")["color_distance_before"] is None


def test_baselines_mean_and_expected_random_colour():
    b = color_baselines(["#000000", "#ff0000"], ["#000000"])
    assert b["color_distance_mean_baseline"] == pytest.approx(127.5)
    assert b["color_distance_random_baseline"] == pytest.approx((0 + 255) / 2)
    b = color_baselines(["#000000", "#ffffff"], ["#000000", "#ffffff"])
    assert b["color_distance_mean_baseline"] == pytest.approx(math.dist((127.5,) * 3, (0, 0, 0)))


def test_name_rate_is_case_insensitive():
    assert name_rate(["I am Ada's assistant", "我是ada的小助手", "I am a model"], "Ada") == pytest.approx(
        2 / 3
    )

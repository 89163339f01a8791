"""train.profile's memory view: the peak of a recorded allocator history and what was alive at it."""

from ftpipe.training.profiling import memory_peak

GIB = 1024**3


def _alloc(addr, size, where):
    return {
        "action": "alloc",
        "addr": addr,
        "size": size,
        "frames": [{"filename": f"/x/{where}.py", "line": 1, "name": where}],
    }


def test_memory_peak_replays_the_history_and_sums_what_was_alive_by_the_frames_that_asked():
    torch_frame = {"filename": "/site/torch/nn/functional.py", "line": 9, "name": "linear"}
    history = [
        _alloc(1, 2 * GIB, "attention"),
        {**_alloc(2, 1 * GIB, "mlp"), "frames": [torch_frame, *_alloc(0, 0, "mlp")["frames"]]},
        _alloc(3, 1 * GIB, "mlp"),
        {"action": "free_requested", "addr": 1, "size": 2 * GIB},  # still held until the stream is done
        {"action": "free_completed", "addr": 1, "size": 2 * GIB},
        {"action": "free_completed", "addr": 99, "size": 1 * GIB},  # allocated before the window
        _alloc(4, 2 * GIB, "loss"),  # back to 4 GiB of the window, less the freed older block: no new peak
    ]
    peak = memory_peak({"device_traces": [history]}, baseline_bytes=3 * GIB)
    assert peak["baseline_gib"] == 3 and peak["peak_gib"] == 7
    assert peak["alive_at_peak"] == [
        {"gib": 2.0, "blocks": 1, "where": "attention.py:1 attention"},
        {"gib": 2.0, "blocks": 2, "where": "mlp.py:1 mlp"},  # torch's own frame left out
    ]

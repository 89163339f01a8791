"""`train.profile`: torch.profiler over a few optimizer steps of the run a user starts, written beside its
outputs (`profile/trace.json.gz` for Perfetto or chrome://tracing, `profile/summary.json`): where a step's time
goes, in the command itself rather than in a side harness. `scripts/bench.py --profile` uses the same summary."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

log = logging.getLogger("ftpipe")

PROFILE_DIR = "profile"


def kernel_kind(name: str) -> str:
    """A GPU kernel's family, to add the profile up by what the step spends its time on."""
    if "flash" in name or "fmha" in name or "cudnn" in name.lower():
        return "attention"
    if "nvjet" in name or "gemm" in name or "cutlass" in name or "sm90_xmma" in name:
        return "gemm"
    if "liger" in name or "element_mul" in name or "cross_entropy" in name:
        return "fused loss"
    if name.startswith("triton"):
        return "triton"
    if "Memcpy" in name or "Memset" in name:
        return "copy"
    if "Dequant" in name or "dequant" in name:
        return "dequantize"
    if "multi_tensor" in name:
        return "foreach (clip, AdamW)"
    return "other"


def _annotation(evt: Any) -> bool:
    name = getattr(evt, "key", None) or getattr(evt, "name", "")
    return bool(getattr(evt, "is_user_annotation", False)) or name.startswith(
        ("## ", "Optimizer.", "ProfilerStep")
    )


def summarize_profile(prof: Any, wall_s: float, steps: int = 1) -> dict[str, Any]:
    """GPU time by kernel and by kind over the profiled steps, how busy the GPU was against the steps' wall
    time (and its largest idle gaps), the host ops that took longest, and where the host waited for the GPU."""
    try:
        rows = []
        for evt in prof.key_averages():
            t = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0) or 0
            self_t = (
                getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0) or 0
            )
            if self_t and not _annotation(evt):
                rows.append((evt.key, self_t / 1e3, evt.count, t / 1e3))
        rows.sort(key=lambda r: -r[1])
        host = sorted(
            (
                (evt.self_cpu_time_total / 1e3, evt.key, evt.count)
                for evt in prof.key_averages()
                if not _annotation(evt)
            ),
            reverse=True,
        )
        out: dict[str, Any] = {
            "steps": steps,
            "wall_ms": wall_s * 1e3,
            "step_ms": wall_s * 1e3 / steps,
            "top": [{"kernel": k[:120], "self_ms": round(ms, 2), "calls": n} for k, ms, n, _ in rows[:45]],
            "host_top": [{"op": k[:120], "self_ms": round(ms, 2), "calls": n} for ms, k, n in host[:30]],
        }
        # GPU timeline: union of kernel / copy intervals, and the largest idle gaps with their neighbours.
        spans = []
        for e in prof.events():
            if getattr(e, "device_type", None) is not None and e.device_type.name == "CUDA":
                if not _annotation(e):  # record_function ranges mirrored on the GPU timeline
                    spans.append((e.time_range.start, e.time_range.end, e.name))
        spans.sort()
        kinds: dict[str, float] = {}  # from the GPU's own events (an op's row would count its kernels again)
        for start, stop, name in spans:
            kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + (stop - start) / 1e3
        out["gpu_ms_by_kind"] = {k: round(v, 2) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}
        busy, gaps, end, prev = 0.0, [], None, ""
        for start, stop, name in spans:
            if end is None or start > end:
                if end is not None:
                    gaps.append((start - end, prev[:60], name[:60]))
                busy += stop - start
                end, prev = stop, name
            elif stop > end:
                busy += stop - end
                end, prev = stop, name
        gaps.sort(reverse=True)
        out["gpu_busy_ms"] = busy / 1e3
        out["gpu_busy_ms_per_step"] = busy / 1e3 / steps
        out["gpu_span_ms"] = (spans[-1][1] - spans[0][0]) / 1e3 if spans else 0.0
        out["gaps_ms_total"] = sum(g[0] for g in gaps) / 1e3
        out["gaps_top"] = [{"ms": round(g / 1e3, 3), "after": a, "before": b} for g, a, b in gaps[:15]]
        # Host waits: synchronizing runtime calls, with the ops / annotations they ran under.
        waits: dict[str, list] = {}
        sync_names = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
        for e in prof.events():
            if e.name in sync_names:
                chain, parent = [], e.cpu_parent
                while parent is not None and len(chain) < 8:
                    chain.append(parent.name[:60])
                    parent = parent.cpu_parent
                key = " < ".join([e.name, *chain])
                ms = (e.time_range.end - e.time_range.start) / 1e3
                w = waits.setdefault(key, [0, 0.0])
                w[0] += 1
                w[1] += ms
        out["host_waits"] = [
            {"where": k[:400], "count": n, "ms": round(ms, 3)}
            for k, (n, ms) in sorted(waits.items(), key=lambda kv: -kv[1][1])[:20]
        ]
        copies = []
        for evt in prof.key_averages(group_by_input_shape=True):
            if evt.key in (
                "aten::copy_",
                "aten::clone",
                "aten::contiguous",
                "aten::index_select",
                "aten::cat",
            ):
                t = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0) or 0
                copies.append((t / 1e3, evt.key, str(evt.input_shapes)[:150], evt.count))
        copies.sort(reverse=True)
        out["copies_top"] = [
            {"ms": round(t, 2), "op": k, "shapes": sh, "calls": n} for t, k, sh, n in copies[:12]
        ]
        return out
    except Exception as exc:  # a diagnostic only
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def _frames(frames: list[dict[str, Any]], depth: int = 4) -> str:
    """The innermost Python frames of an allocation outside torch's own modules (where a model or ftpipe
    asked for the memory), as `file:line fn` joined by ' < '."""
    own = [
        f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}"
        for f in frames
        if f.get("filename", "").endswith(".py") and "/torch/" not in f["filename"]
    ]
    return " < ".join(own[:depth]) or "(no Python frame)"


def memory_peak(snapshot: dict[str, Any], baseline_bytes: int = 0, top: int = 25) -> dict[str, Any]:
    """From a CUDA allocator history (`torch.cuda.memory._snapshot()` after `_record_memory_history`): the
    recorded window's peak of allocated bytes (`baseline_bytes`: allocated when recording began, whose
    allocations the history does not hold) and what was alive then, summed by the frames that allocated it."""
    live: dict[int, tuple[int, str]] = {}
    now = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for trace in snapshot.get("device_traces", []):
        for e in trace:
            action, addr, size = e.get("action"), e.get("addr"), e.get("size", 0)
            if action == "alloc":
                live[addr] = (size, _frames(e.get("frames", [])))
                now += size
                if now > peak:
                    peak, at_peak = now, dict(live)
            elif action == "free_completed":  # a block from before the window counts against the baseline
                now -= live.pop(addr)[0] if addr in live else size
    groups: dict[str, list[int]] = {}
    for size, where in at_peak.values():
        g = groups.setdefault(where, [0, 0])
        g[0] += size
        g[1] += 1
    gib = 1024**3
    return {
        "baseline_gib": round(baseline_bytes / gib, 4),
        "peak_gib": round((baseline_bytes + peak) / gib, 4),
        "alive_at_peak": [
            {"gib": round(b / gib, 4), "blocks": n, "where": where}
            for where, (b, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
        ],
    }


class ProfileSteps(TrainerCallback):
    """Trainer callback: profile optimizer steps `start + 1` .. `start + steps` (start after compilation and
    the first logs, so the steps are steady ones), then write the trace and its summary into `out/profile`."""

    def __init__(
        self, start: int, steps: int, out: Path, host_ops: bool = True, memory: bool = False
    ) -> None:
        self.start, self.steps, self.dir = start, steps, out / PROFILE_DIR
        self.host_ops, self.memory = host_ops, memory
        self.memory_baseline = 0
        self.prof: Any = None
        self.began = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.prof is None and state.global_step == self.start and state.is_world_process_zero:
            from torch.profiler import ProfilerActivity, profile

            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            if cuda:
                torch.cuda.synchronize()
            activities = [ProfilerActivity.CUDA] if cuda else []
            if self.host_ops or not cuda:
                activities.append(ProfilerActivity.CPU)
            self.prof = profile(activities=activities, record_shapes=self.host_ops)
            if cuda and self.memory:
                self.memory_baseline = torch.cuda.memory_allocated()
                torch.cuda.memory._record_memory_history(stacks="python", max_entries=1_000_000)
            self.prof.__enter__()
            self.began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and state.global_step >= self.start + self.steps:
            self._write(self.steps)

    def on_train_end(self, args, state, control, **kwargs):
        if self.prof is not None:  # the run ended inside the window: what was profiled
            self._write(state.global_step - self.start)

    def _write(self, steps: int) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.began
        self.prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.memory and torch.cuda.is_available() and torch.cuda.is_initialized():
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            peak = memory_peak(snapshot, self.memory_baseline)
            (self.dir / "memory_peak.json").write_text(json.dumps(peak, indent=1))
        summary = summarize_profile(self.prof, wall, max(steps, 1))
        raw = self.dir / "trace.json"
        self.prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
        os.remove(raw)
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info(
            "[train] profiled steps %d-%d: %.1f ms a step, the GPU busy %.1f ms of it → %s",
            self.start + 1,
            self.start + steps,
            summary.get("step_ms", 0.0),
            summary.get("gpu_busy_ms_per_step", 0.0),
            self.dir,
        )
        self.prof = None

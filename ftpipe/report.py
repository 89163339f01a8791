"""The run report: a markdown page with the stage table, before/after metrics, sample replies, loss curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_ROW_KEYS = {"name", "key", "hit", "seconds", "output"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def loss_curve(log_history: list[dict[str, Any]], target: Path) -> bool:
    points = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points, strict=True), marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return True


def write_report(rows: list[dict[str, Any]], run_dir: Path, title: str = "ftpipe run") -> Path:
    lines = [f"# {title}", "", "| stage | key | cache | seconds | output |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['name']} | `{r['key']}` | {'hit' if r['hit'] else 'ran'} | {r['seconds']:.1f} | `{r['output']}` |"
        )
    by_name = {r["name"]: r for r in rows}

    evaluation = by_name.get("evaluate-chat")
    if evaluation:
        metrics = {k: v for k, v in evaluation.items() if k not in _ROW_KEYS}
        pairs = sorted({k.rsplit("_", 1)[0] for k in metrics if k.endswith(("_before", "_after"))})
        lines += ["", "## Metrics", "", "| metric | before | after |", "|---|---|---|"]
        lines += [
            f"| {p} | {_fmt(metrics.get(p + '_before'))} | {_fmt(metrics.get(p + '_after'))} |" for p in pairs
        ]
        others = {k: v for k, v in metrics.items() if not k.endswith(("_before", "_after"))}
        lines += [f"- {k}: {_fmt(v)}" for k, v in sorted(others.items())]
        samples_file = Path(evaluation["output"]) / "samples.jsonl"
        if samples_file.is_file():
            samples = [json.loads(line) for line in samples_file.read_text().splitlines()[:12]]
            lines += [
                "",
                "## Sample replies",
                "",
                "| input | reference | before | after |",
                "|---|---|---|---|",
            ]
            for s in samples:
                cells = [
                    str(s.get(k) or "").replace("|", "\\|").replace("\n", " ")[:80]
                    for k in ("input", "reference", "before", "after")
                ]
                lines.append("| " + " | ".join(cells) + " |")

    train = by_name.get("train")
    if train:
        history_file = Path(train["output"]) / "log_history.json"
        if history_file.is_file() and loss_curve(
            json.loads(history_file.read_text()), run_dir / "loss_curve.png"
        ):
            lines += ["", "## Training loss", "", "![loss curve](loss_curve.png)"]
    target = run_dir / "report.md"
    target.write_text("\n".join(lines) + "\n")
    return target

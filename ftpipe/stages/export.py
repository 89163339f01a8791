"""export: the merged model → `gguf/<type>/<name>-<type>.gguf` for each type in `export.gguf`, with an Ollama
`Modelfile` beside each, for llama.cpp and Ollama.

The GGUF carries the recipe's template as `tokenizer.chat_template` (the Jinja merge writes into the HF
tokenizer) and the Modelfile its Go form; both come from the template object training used, with the system
prompt map found. Provenance (the config of every stage that made the model, their keys, library versions) is
in `ftpipe.*` keys. The stage fails unless each file, loaded back through transformers' GGUF loader, gives the
merged model's logits within its type's tolerance.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import torch

from .. import engine
from ..data.info import DATA_INFO, DataInfo
from ..engine import Stage, StageContext
from ..errors import FtpipeError
from ..export.gguf import write_gguf
from ..export.modelfile import modelfile

log = logging.getLogger("ftpipe")

PROBE = "Give me a warm orange"
# max |logit difference| from the merged model, relative to its largest logit magnitude (at least 1), past
# which a file is not the model it claims to be (a wrong layout is off by ~100%); measured on tiny_llama: f16
# 3e-4, q8_0 8e-3, q4_0 0.11 (docs in README)
TOLERANCE = {"f16": 5e-3, "bf16": 3e-2, "q8_0": 5e-2, "q5_1": 0.2, "q5_0": 0.2, "q4_1": 0.3, "q4_0": 0.3}


def model_name(model_cfg: dict[str, Any]) -> str:
    """A file-name-safe name for the model: the GGUF's stem, or the last part of model.path."""
    if model_cfg.get("gguf_file"):
        base = model_cfg["gguf_file"].split(".")[0]
    else:
        base = re.split(r"[:/]", str(model_cfg["path"]).rstrip("/"))[-1].split("==")[0]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-.") or "model"


def _provenance(ctx: StageContext) -> dict[str, str]:
    recipe: dict[str, Any] = {}
    for _, config_slice in [*ctx.lineage.values(), ("", ctx.cfg)]:
        _deep_update(recipe, engine.without_runtime_keys(config_slice))
    keys = {stage: key for stage, (key, _) in ctx.lineage.items()}
    if ctx.entry is not None:
        keys["export"] = ctx.entry.name
    return {
        "ftpipe.recipe": json.dumps(recipe, sort_keys=True),
        "ftpipe.stage_keys": json.dumps(keys),
        "ftpipe.versions": json.dumps(engine.lib_versions(), sort_keys=True),
    }


def _deep_update(target: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


@torch.no_grad()
def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids, use_cache=False).logits.float().flatten()


def run(ctx: StageContext) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data.templates import chat_template_jinja, prompt_ids, resolve_template

    model_dir = ctx.input("merge", "model")
    system = DataInfo.read(ctx.input("map", DATA_INFO)).system
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = resolve_template(ctx.cfg["template"], tokenizer)
    chat_template = chat_template_jinja(template, system)
    download = ctx.lineage.get("download-model")
    name = model_name(download[1]["model"]) if download else "model"
    metadata = _provenance(ctx)

    ids = torch.tensor([prompt_ids(tokenizer, template, [], PROBE, system)])
    reference = _logits(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), ids)
    scale = max(1.0, reference.abs().max().item())
    metrics: dict[str, Any] = {"export_files": []}
    final = ctx.entry or ctx.out
    for export_type in ctx.cfg["export"]["gguf"]:
        folder = ctx.out / "gguf" / export_type
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}-{export_type}.gguf"
        written = write_gguf(
            model_dir, path, export_type, chat_template, name, {**metadata, "ftpipe.export_type": export_type}
        )
        (folder / "Modelfile").write_text(modelfile(path.name, template, system, tokenizer))
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32)
        err = (_logits(loaded, ids) - reference).abs().max().item()
        del loaded
        if not err <= TOLERANCE[export_type] * scale:  # also catches NaN
            raise FtpipeError(
                f"export.gguf: the {export_type} file, loaded back, moves the logits by {err:.3g} (tolerance "
                f"{TOLERANCE[export_type] * scale:.3g}): it would not behave like the merged model"
            )
        relative = path.relative_to(ctx.out)
        metrics["export_files"].append(str(relative))
        metrics[f"export_{export_type}_max_abs_diff"] = err
        metrics[f"export_{export_type}_bytes"] = path.stat().st_size
        log.info(
            "[export] %s (%s, %.1f MB, logits max |Δ| %.3g): %s  ·  llama-cli -m %s  ·  ollama create %s -f %s",
            export_type,
            ", ".join(f"{n} {t}" for t, n in written.items()),
            path.stat().st_size / 1e6,
            err,
            final / relative,
            final / relative,
            name.lower(),
            final / relative.parent / "Modelfile",
        )
    return metrics


def _key_view(config_slice: dict[str, Any]) -> dict[str, Any]:
    """The files written do not depend on the order the types are listed in."""
    export = {**config_slice["export"], "gguf": sorted(config_slice["export"]["gguf"])}
    return {**config_slice, "export": export}


STAGE = Stage(
    name="export",
    version="1",
    reads=("export", "template"),
    upstream=("map", "merge"),
    outputs=("gguf",),
    run=run,
    key_view=_key_view,
)

"""merge: base + adapter → one HF model folder `model/` (safetensors shards, tokenizer with the recipe's
chat_template), loadable with plain AutoModelForCausalLM / AutoTokenizer.

The base is always loaded from the downloaded full-precision folder, never 4-bit: a QLoRA adapter merges into
the dequantised weights. The stage fails unless (1) the merged fp32 weights give base+adapter's logits on fixed
prompts and (2) the saved folder, reloaded in its storage dtype, gives them too within that dtype's tolerance.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..data.info import DATA_INFO, DataInfo
from ..engine import Stage, StageContext
from ..errors import FtpipeError

log = logging.getLogger("ftpipe")

PROBES = ["Give me a warm orange", "Please introduce yourself.", "What is the capital of France?"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max |logit difference|, relative to the largest reference logit magnitude (at least 1), allowed between the merged
# fp32 model and base+adapter (the merge itself), and between the saved folder reloaded and the same weights in
# memory (saving; buffers may reload in another dtype); rounding to the storage dtype beyond it is warned of
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def storage_dtype(wanted: str, model_dir: Path) -> torch.dtype:
    if wanted != "auto":
        return DTYPES[wanted]
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        name, torch.float32
    )


@torch.no_grad()
def probe_logits(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(input_ids=ids, use_cache=False).logits.float().flatten() for ids in batches])


def _check(name: str, got: torch.Tensor, ref: torch.Tensor, relative: float) -> tuple[float, float]:
    err = (got - ref).abs().max().item()
    tol = relative * max(1.0, ref.abs().max().item())
    if not err <= tol:  # also catches NaN
        raise FtpipeError(
            f"merge: {name} logits differ by {err:.3g} (tolerance {tol:.3g}); "
            "the merged model would not behave like the trained one"
        )
    return err, tol


def chat_tokenizer(model_dir: Path, template: dict[str, Any], system: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from ..data.templates import chat_template_jinja, resolve_template

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    tokenizer.chat_template = chat_template_jinja(resolve_template(template, tokenizer), system)
    return tokenizer


def stop_token_ids(tokenizer: Any, stop_words: list[str]) -> list[int]:
    """EOS plus every stop word that is a single token, so plain `generate` stops where ftpipe's chat does."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for word in stop_words:
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if len(pieces) == 1 and pieces[0] not in ids:
            ids.append(pieces[0])
    return ids


def run(ctx: StageContext) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    cfg = ctx.cfg
    trust = bool(cfg["model"]["trust_remote_code"])
    base_dir = ctx.input("download-model", "model")
    dest = ctx.out / "model"
    dtype = storage_dtype(cfg["merge"]["dtype"], base_dir)
    system = DataInfo.read(ctx.input("map", DATA_INFO)).system
    tokenizer = chat_tokenizer(base_dir, cfg["template"], system, trust)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in PROBES
    ]
    batches = [tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids for text in prompts]

    adapter = ctx.input("convert", "adapter")
    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, trust_remote_code=trust)
        model = PeftModel.from_pretrained(base, adapter)
        reference = probe_logits(model, batches)
        with model.disable_adapter():
            adapter_effect = (probe_logits(model, batches) - reference).abs().max().item()
        model = model.merge_and_unload()
        merge_err, _ = _check(
            "merged fp32", probe_logits(model, batches), reference, TOLERANCE[torch.float32]
        )
    else:  # full fine-tuning: convert already wrote a whole model; re-save it sharded with the template
        model = AutoModelForCausalLM.from_pretrained(
            ctx.input("convert", "model"), dtype=torch.float32, trust_remote_code=trust
        )
        reference = probe_logits(model, batches)
        adapter_effect, merge_err = None, 0.0

    model = model.to(dtype)
    # what storing in `dtype` costs by itself (the user's choice, reported), apart from what saving must keep
    in_memory = probe_logits(model, batches)
    rounding = (in_memory - reference).abs().max().item()
    if not rounding <= TOLERANCE[dtype] * max(1.0, reference.abs().max().item()):
        log.warning(
            "[merge] storing in %s moves the logits by up to %.3g (merge.dtype=fp32 keeps them)",
            dtype,
            rounding,
        )
    model.config.use_cache = True  # training turned it off; inference wants it
    model.generation_config.eos_token_id = stop_token_ids(
        tokenizer, list(cfg["template"].get("stop_words") or [])
    )
    model.save_pretrained(dest, max_shard_size=cfg["merge"]["max_shard_size"])
    tokenizer.save_pretrained(dest)
    del model

    reloaded = AutoModelForCausalLM.from_pretrained(dest, trust_remote_code=trust)
    if next(reloaded.parameters()).dtype != dtype:
        raise FtpipeError(
            f"merge: saved model reloads as {next(reloaded.parameters()).dtype}, expected {dtype}"
        )
    saved_err, tol = _check(
        "saved folder vs the weights saved", probe_logits(reloaded, batches), in_memory, TOLERANCE[dtype]
    )
    shards = sorted(p.name for p in dest.glob("*.safetensors"))
    log.info(
        "[merge] %d shard(s), %s; logits max |Δ| %.3g (tolerance %.3g)", len(shards), dtype, saved_err, tol
    )
    return {
        "merge_dtype": str(dtype).removeprefix("torch."),
        "merge_shards": len(shards),
        "merge_max_abs_diff": saved_err,
        "merge_dtype_max_abs_diff": rounding,
        "merge_fp32_max_abs_diff": merge_err,
        "merge_tolerance": tol,
        "merge_adapter_effect": adapter_effect,
    }


STAGE = Stage(
    name="merge",
    version="1",
    reads=("merge", "template", "model.trust_remote_code"),
    upstream=("download-model", "map", "convert"),
    outputs=("model",),
    run=run,
)

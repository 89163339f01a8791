"""convert and merge on tiny_llama: portable adapters that reproduce the trained model in a fresh process,
merged folders that plain transformers loads and that format prompts like training, and a merge that refuses
to commit a model whose logits drift from base+adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_helpers as h
import train_worker

from ftpipe import engine
from ftpipe.cache import Cache
from ftpipe.errors import FtpipeError
from ftpipe.training.trainer import FtTrainer

PROMPT = "<|im_start|>user\nwarm orange<|im_end|>\n<|im_start|>assistant\n#"


def run_chain(cache_root: Path, stages: list[str], **train_kw) -> dict[str, dict]:
    cache = Cache(cache_root)
    cfg = h.chain_cfg(stages, **train_kw)
    return {row["name"]: row for row in engine.run(engine.plan(cfg, train_worker.CHAIN, cache), cache)}


@pytest.fixture
def trained_model(monkeypatch):
    """Keep the model object the train stage trained, as it is in memory when training ends."""
    kept = {}
    original = FtTrainer.train

    def train_and_keep(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        kept["model"] = self.model
        return result

    monkeypatch.setattr(FtTrainer, "train", train_and_keep)
    return kept


def logits_of(model, tokenizer_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(PROMPT, return_tensors="pt").input_ids
    model.eval()
    with torch.no_grad():  # the trained model may sit on a GPU; compare on the CPU
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


FRESH_LOAD = """
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
kind, folder, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "adapter":
    from peft import PeftConfig, PeftModel
    base_path = PeftConfig.from_pretrained(folder).base_model_name_or_path
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), folder)
    tok = AutoTokenizer.from_pretrained(base_path)
else:
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
model.eval()
with torch.no_grad():
    logits = model(input_ids=tok(prompt, return_tensors="pt").input_ids).logits.float()
print(json.dumps(logits.flatten().tolist()))
"""


def fresh_process_logits(kind: str, folder: Path) -> torch.Tensor:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", FRESH_LOAD, kind, str(folder), PROMPT], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.tensor(json.loads(done.stdout.splitlines()[-1]))


# a second Python process per case: ~6 s each on two cores
@pytest.mark.parametrize("method", ["lora", "full"])
def test_convert_output_loads_in_a_fresh_process_and_reproduces_the_trained_model(
    tmp_path, trained_model, method
):
    rows = run_chain(tmp_path, ["convert"], method=method, max_steps=6, save_steps=3)
    out = Path(rows["convert"]["output"])
    model_dir = Path(rows["download-model"]["output"]) / "model"
    expected = logits_of(trained_model["model"], model_dir).flatten()
    if method == "lora":
        folder = out / "adapter"
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(model_dir)
        got = fresh_process_logits("adapter", folder)
    else:
        folder = out / "model"
        assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
        assert not (folder / "training_args.bin").exists()  # pickles stay behind
        got = fresh_process_logits("model", folder)
    # the adapter changed something, and the loaded artifact is the trained model, not the base
    base = logits_of(__import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir), model_dir)
    assert (expected - base.flatten()).abs().max() > 1e-3
    # same device: bit-for-bit up to summation order; trained on a GPU and reloaded on the CPU: TF32/kernels
    assert torch.allclose(got, expected, atol=1e-5 if not torch.cuda.is_available() else 2e-3), (
        (got - expected).abs().max()
    )


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_merged_folder_loads_with_plain_transformers_and_formats_prompts_like_training(tmp_path, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.data.templates import SYSTEM_TEMPLATE, generation_prompt

    cache = Cache(tmp_path)
    cfg = h.chain_cfg(["merge"], method=method, max_steps=6, save_steps=3)
    cfg["merge"]["max_shard_size"] = "5MB"  # the tiny model is ~13 MB in fp32: several shards
    rows = {r["name"]: r for r in engine.run(engine.plan(cfg, train_worker.CHAIN, cache), cache)}
    merged = Path(rows["merge"]["output"]) / "model"
    assert len(list(merged.glob("*.safetensors"))) > 1 and rows["merge"]["merge_shards"] > 1
    assert rows["merge"]["merge_max_abs_diff"] <= rows["merge"]["merge_tolerance"]

    model = AutoModelForCausalLM.from_pretrained(merged)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model, "peft_config")
    messages = [{"role": "user", "content": "warm orange"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    system = SYSTEM_TEMPLATE["colorist"]  # the colors format's own system prompt
    assert system in text
    assert text == generation_prompt(
        cfg["template"],
        [],
        "warm orange",
        system,
        bos_token=tokenizer.bos_token or "",
        eos_token=tokenizer.eos_token,
    )
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in model.generation_config.eos_token_id

    if method != "full":  # merged == base + adapter, checked here independently of the stage's own check
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(Path(rows["download-model"]["output"]) / "model")
        ref = PeftModel.from_pretrained(base, Path(rows["convert"]["output"]) / "adapter")
        assert torch.allclose(logits_of(model, merged), logits_of(ref, merged), atol=1e-4)


def test_merge_refuses_a_model_whose_logits_differ(tmp_path, monkeypatch):
    from peft.tuners.lora import LoraModel

    # A broken merge: drop the adapters instead of folding them into the weights.
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    with pytest.raises(FtpipeError, match="merged fp32 logits differ"):
        run_chain(tmp_path, ["merge"], method="lora", max_steps=6, save_steps=3)
    assert not list((tmp_path / "merge").glob("*/manifest.json"))

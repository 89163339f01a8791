"""train stage on tiny_llama: every method learns, losses are the model's own, packed batches stay per-document,
and a SIGKILLed run resumes from its checkpoint to the same result as an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_helpers as h

from ftpipe.data import boundaries
from ftpipe.training import speed
from ftpipe.training.collator import PackedCollator
from ftpipe.training.fit import fit
from ftpipe.training.launch import launch
from ftpipe.training.speed.loss import answer_only_loss

WORKER = Path(__file__).parents[1] / "train_worker.py"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-fixtures")
    model_dir = h.tiny_model_dir(root)
    return model_dir, h.packed_dataset_dir(root, model_dir)


def run_train(tmp_path: Path, fixtures, *overrides: str, **train_kw) -> tuple[dict, Path]:
    model_dir, pack_dir = fixtures
    out = tmp_path / "train.tmp"
    return fit(h.job(h.train_cfg(*overrides, **train_kw), out, model_dir, pack_dir)), out


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_each_method_lowers_the_loss_and_writes_its_outputs(tmp_path, fixtures, method):
    metrics, out = run_train(tmp_path, fixtures, method=method, max_steps=6, save_steps=3)
    history = json.loads((out / "log_history.json").read_text())
    losses = [row["loss"] for row in history if "loss" in row]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    assert (
        metrics["train_steps"] == 6 and metrics["train_tokens"] > 0 and metrics["train_tokens_per_second"] > 0
    )
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert any((out / "tb").iterdir())
    weights = "model.safetensors" if method == "full" else "adapter_model.safetensors"
    assert (out / "final" / weights).is_file()
    assert {"tokens_per_second", "peak_memory_gib", "grad_norm", "learning_rate"} <= history[1].keys()
    # the warm-start figure: model loading + the first step, within the whole stage's time
    assert 0 < metrics["train_first_step_seconds"] < metrics["train_seconds"] + 60
    rates = [row["tokens_per_second"] for row in history if "tokens_per_second" in row]
    assert min(rates[1:]) <= metrics["train_tokens_per_second_steady"] <= max(rates[1:])  # the first: warm-up
    peaks = [row["peak_memory_gib"] for row in history if "peak_memory_gib" in row]
    assert metrics["train_peak_memory_gib_steady"] == max(peaks[1:]) <= metrics["train_peak_memory_gib"]


def test_adamw_8bit_keeps_8bit_moments_and_learns(tmp_path, fixtures):
    """optimizer=adamw_8bit: the checkpointed optimizer holds uint8 moments for each weight AdamW keeps float
    ones for (fp32 or bf16: the adapters' dtype), except those under bitsandbytes' 4096-element minimum for
    8-bit states (at r=64 only the tiny model's k/v adapters' B)."""

    def moments(out: Path) -> list[tuple[int, set[torch.dtype]]]:
        state = torch.load(out / "checkpoints" / "checkpoint-4" / "optimizer.pt", weights_only=True)["state"]
        per_weight = []
        for entry in state.values():
            entry = {**entry, **entry.get("__bnb_optimizer_quant_state__", {})}  # bitsandbytes nests its own
            found = [entry[k] for k in ("exp_avg", "exp_avg_sq", "state1", "state2") if k in entry]
            per_weight.append((found[0].numel(), {t.dtype for t in found}))
        return per_weight

    found = {}
    for name in ("adamw", "adamw_8bit"):
        _, out = run_train(
            tmp_path / name, fixtures, f"optimizer={name}", method="lora", max_steps=4, save_steps=4,
            **{"lora.r": 64},
        )  # fmt: skip
        history = json.loads((out / "log_history.json").read_text())
        losses = [row["loss"] for row in history if "loss" in row]
        assert losses[-1] < losses[0] - 0.05, (name, losses)
        found[name] = moments(out)
    assert found["adamw"] and all(len(d) == 1 and next(iter(d)).is_floating_point for _, d in found["adamw"])
    want = [(n, {torch.uint8} if n >= 4096 else dtypes) for n, dtypes in found["adamw"]]
    assert found["adamw_8bit"] == want
    assert sum(n for n, dtypes in want if torch.uint8 in dtypes) > 0.9 * sum(n for n, _ in want)


def test_profile_writes_a_trace_and_summary_of_the_asked_steps_and_stays_out_of_the_key(tmp_path, fixtures):
    from ftpipe.stages.train import key_view

    metrics, out = run_train(
        tmp_path, fixtures, method="lora", max_steps=5, **{"profile.start": 2, "profile.steps": 2}
    )
    summary = json.loads((out / "profile" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["step_ms"] > 0 and "error" not in summary
    assert any(row["op"].startswith("aten::") for row in summary["host_top"])  # the steps' own ops
    assert (out / "profile" / "trace.json.gz").stat().st_size > 0
    # a run without it keeps the key it had before train.profile existed; asking for a profile is a new run
    assert "profile" not in key_view({**h.composed(), "stages": []})["train"]
    assert key_view({**h.composed("train.profile.steps=2"), "stages": []})["train"]["profile"]["steps"] == 2


def test_compiled_artefacts_are_kept_under_the_build_folder(tmp_path, fixtures, monkeypatch):
    """fit points torch.compile's caches (and DeepSpeed's ops) at job.build_dir unless the user set them."""
    from ftpipe.training.fit import build_env

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCH_EXTENSIONS_DIR"):
        monkeypatch.delenv(name, raising=False)
    model_dir, pack_dir = fixtures
    job = h.job(h.train_cfg(max_steps=1), tmp_path / "train.tmp", model_dir, pack_dir)
    job.build_dir = tmp_path / "shared" / "build"
    fit(job)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(job.build_dir / "inductor")
    assert build_env(job.build_dir)["TORCH_EXTENSIONS_DIR"] == str(job.build_dir / "torch_extensions")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    again = h.job(h.train_cfg(max_steps=1), tmp_path / "again.tmp", model_dir, pack_dir)
    again.build_dir = job.build_dir
    fit(again)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")  # the user's setting wins


def _loss_inputs(fixtures, rows: int = 3) -> dict[str, torch.Tensor]:
    from datasets import load_from_disk

    dataset = load_from_disk(str(fixtures[1] / "dataset"))
    return PackedCollator()([dataset[i] for i in range(rows)])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_answer_only_loss_equals_the_models_own_loss(fixtures, method):
    from ftpipe.training.model import load_for_training

    torch.manual_seed(0)
    train_cfg = h.train_cfg(method=method)["train"]
    model = load_for_training(fixtures[0], train_cfg, speed.resolve(train_cfg, "cpu"))
    if method == "lora":  # non-zero B so the adapters take part in the comparison
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    batch = _loss_inputs(fixtures)
    n_items = int((batch["labels"][:, 1:] != -100).sum())
    own = model(**batch).loss
    mine, _ = answer_only_loss(model, batch)
    assert torch.allclose(own, mine, rtol=1e-5), (own, mine)
    own_sum = model(**batch, num_items_in_batch=n_items * 2).loss
    mine_sum, _ = answer_only_loss(model, batch, n_items * 2)
    assert torch.allclose(own_sum, mine_sum, rtol=1e-5) and torch.allclose(mine_sum * 2, mine, rtol=1e-5)
    grads = torch.autograd.grad(mine, [p for p in model.parameters() if p.requires_grad][:4])
    ref = torch.autograd.grad(model(**batch).loss, [p for p in model.parameters() if p.requires_grad][:4])
    for g, r in zip(grads, ref, strict=True):
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-4)


def test_flattened_packed_batch_gives_the_loss_of_documents_run_alone(fixtures):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fixtures[0], attn_implementation="sdpa")
    model.config.use_cache = False
    batch = _loss_inputs(fixtures)
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    starts, lengths = boundaries.spans(batch["position_ids"])
    spans = [(s, s + n) for s, n in zip(starts, lengths, strict=True)]
    assert len(spans) > 3  # several documents per row, several rows
    packed_loss = model(**batch).loss

    total, count = torch.tensor(0.0), 0
    for start, end in spans:
        ids, labels = batch["input_ids"][:, start:end], batch["labels"][:, start:end]
        logits = model(input_ids=ids).logits[0, :-1]
        target = labels[0, 1:]
        total = total + torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
        count += int((target != -100).sum())
    assert torch.allclose(packed_loss, total / count, rtol=1e-5), (packed_loss, total / count)

    # Sanity of the premise: attending across documents (one plain causal sequence) changes the loss.
    crossed = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert not torch.allclose(crossed, packed_loss, rtol=1e-4)


def _worker(cache: Path, cfg: dict, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path])}
    return subprocess.run(
        [sys.executable, str(WORKER), str(cache), json.dumps(cfg), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


# issue 4 must-show: three trainings in two processes, ~11 s on two cores
def test_sigkill_after_a_checkpoint_then_rerun_resumes_to_the_same_result(tmp_path):
    import train_worker
    from safetensors.torch import load_file

    from ftpipe import engine
    from ftpipe.cache import Cache

    cfg = h.chain_cfg(["train"], max_steps=8, save_steps=3)
    cache_a = Cache(tmp_path / "a")
    row_a = engine.run(engine.plan(cfg, train_worker.CHAIN, cache_a), cache_a)[-1]

    killed = _worker(tmp_path / "b", cfg, "--kill-after-checkpoint", "6")
    assert killed.returncode == -9, killed.stderr[-3000:]
    tmp_dirs = list((tmp_path / "b" / "train").glob("*.tmp"))
    assert len(tmp_dirs) == 1 and (tmp_dirs[0] / "checkpoints" / "checkpoint-6").is_dir()
    assert not (tmp_dirs[0] / "final").exists()

    resumed = _worker(tmp_path / "b", cfg)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 6" in resumed.stderr
    row_b = json.loads(resumed.stdout.splitlines()[-1])[-1]
    assert row_a["key"] == row_b["key"] and row_b["resumed_from_step"] == 6
    assert row_b["train_steps"] == 8 and row_b["train_tokens"] == row_a["train_tokens"]
    assert row_b["train_loss"] == pytest.approx(row_a["train_loss"], abs=1e-6)
    hist_a = json.loads((Path(row_a["output"]) / "log_history.json").read_text())
    hist_b = json.loads((Path(row_b["output"]) / "log_history.json").read_text())
    assert [r["loss"] for r in hist_a if "loss" in r] == pytest.approx(
        [r["loss"] for r in hist_b if "loss" in r]
    )
    wa = load_file(Path(row_a["output"]) / "final" / "adapter_model.safetensors")
    wb = load_file(Path(row_b["output"]) / "final" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_per_document_attention_matches_sdpa_on_packed_rows_and_falls_back_outside_training(
    fixtures, monkeypatch
):
    from transformers import AutoModelForCausalLM

    from ftpipe.training.speed import attention

    name = attention.register()
    calls = []
    causal = attention._causal
    monkeypatch.setattr(attention, "_causal", lambda *a: calls.append(a[0].shape) or causal(*a))
    batch = _loss_inputs(fixtures)
    results = {}
    for impl in ("sdpa", name):
        model = AutoModelForCausalLM.from_pretrained(fixtures[0], attn_implementation=impl)
        model.config.use_cache = False
        model.train()
        out = model(**batch)
        out.loss.backward()
        grad = model.model.layers[0].self_attn.q_proj.weight.grad
        results[impl] = (out.loss.detach(), out.logits.detach(), grad)
        if impl == name:  # the per-document path ran: one call per distinct document length per layer
            assert calls and all(shape[0] >= 1 and shape[2] <= 96 for shape in calls)
            calls.clear()
        model.eval()  # generation path: the mask transformers builds (here: left padding) must be honoured
        ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        with torch.no_grad():
            results[impl] += (model(input_ids=ids, attention_mask=mask).logits[:, -1],)
    assert not calls  # eval mode went through plain sdpa
    ref, got = results["sdpa"], results[name]
    assert torch.allclose(ref[0], got[0], rtol=1e-6)
    assert torch.allclose(ref[1], got[1], atol=1e-5)
    assert torch.allclose(ref[2], got[2], atol=1e-6, rtol=1e-4)
    assert torch.allclose(ref[3], got[3], atol=1e-5)


def test_sample_replies_decode_on_a_model_set_to_a_packed_training_kernel(fixtures):
    """In-training sample replies on CUDA run on a model set to varlen; flex stands in for it on the CPU (the
    same limitation: no KV cache, one query per key). Generation swaps in sdpa and then restores the kernel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftpipe.evaluation.generate import generate_replies
    from ftpipe.training.speed import attention

    attention.register()
    tokenizer = AutoTokenizer.from_pretrained(fixtures[0])
    prompts = [[1, 5, 6, 7], [1, 8, 9]]
    want = generate_replies(AutoModelForCausalLM.from_pretrained(fixtures[0]), tokenizer, prompts, [], 4)
    model = AutoModelForCausalLM.from_pretrained(fixtures[0], attn_implementation=attention.FLEX)
    with pytest.raises(ValueError, match="block_mask"):  # the packed kernel given a decoding step
        generate_replies(model, tokenizer, prompts, [], 4)
    with attention.attention_for_generation(model):
        assert generate_replies(model, tokenizer, prompts, [], 4) == want
    assert model.config._attn_implementation == attention.FLEX


# two ranks plus torchrun start-up: ~7 s on two cores
def test_torchrun_launcher_trains_with_two_ranks_and_rank0_writes_the_outputs(tmp_path, fixtures):
    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("two ranks need two GPUs here (on CPU they run on gloo)")
    cfg = h.train_cfg(max_steps=4, save_steps=2, micro_batch_size=1)
    cfg["launcher"].update(name="torchrun", nproc_per_node=2)
    model_dir, pack_dir = fixtures
    launched = tmp_path / "launched.tmp"
    result = launch(h.job(cfg, launched, model_dir, pack_dir))
    assert result["train_world_size"] == 2 and result["train_steps"] == 4
    losses = [r["loss"] for r in json.loads((launched / "log_history.json").read_text()) if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (launched / "final" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (launched / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert result["train_tokens"] > 0 and len(list((launched / "tb").iterdir())) == 1  # rank 0 alone logs


def test_more_ranks_than_gpus_is_a_config_error_naming_the_key(monkeypatch):
    from ftpipe.errors import FtpipeError
    from ftpipe.training.launch import check_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(FtpipeError, match="launcher.nproc_per_node"):
        check_gpus({"nproc_per_node": 2})
    check_gpus({"nproc_per_node": 1})

"""The GGUF writer on tiny random models of each architecture it exports (Llama, Qwen2 with attention biases
and an untied head, Mistral with a head_dim of its own): transformers' GGUF loader reads back the same model;
what it cannot export it refuses in one line naming `export.gguf`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftpipe.errors import FtpipeError
from ftpipe.export.gguf import write_gguf
from ftpipe.paths import ASSETS_DIR

SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
ARCHITECTURES = {
    "llama": dict(tie_word_embeddings=True),
    "qwen2": dict(tie_word_embeddings=False),  # Qwen2 has q/k/v biases
    "mistral": dict(tie_word_embeddings=False, head_dim=32),  # head_dim ≠ hidden_size / heads
}
PROMPT = "<|im_start|>user\nA warm orange, like a sunset<|im_end|>\n<|im_start|>assistant\n"


def tiny_model(folder: Path, model_type: str, **extra) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS_DIR / "smollm2_tokenizer")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer) + 11,  # an embedding larger than the vocabulary, as Qwen2's is
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **SHAPE,
        **extra,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random biases, so that a lost or misplaced bias shows in the logits
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def rounded_to_f16(model):
    """The model as an f16 GGUF holds it: matrices in f16, norms and biases kept in f32."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.copy_(param.to(torch.float16).float())
    return model


def logits(model, folder: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(ASSETS_DIR / "smollm2_tokenizer")(
        PROMPT, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_each_architecture_round_trips_through_transformers_gguf_loader(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    folder = tiny_model(tmp_path / "hf", model_type, **ARCHITECTURES[model_type])
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference = logits(merged, folder)
    rounded = logits(
        rounded_to_f16(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)), folder
    )
    written = write_gguf(
        folder, tmp_path / "m-f16.gguf", "f16", "{{ messages }}", "tiny", {"ftpipe.test": "1"}
    )
    assert written["F16"] > 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m-f16.gguf", dtype=torch.float32)
    assert loaded.config.vocab_size == merged.config.vocab_size
    assert (logits(loaded, tmp_path) - rounded).abs().max() < 1e-4

    write_gguf(folder, tmp_path / "m-q4_0.gguf", "q4_0", "{{ messages }}", "tiny", {})
    q4 = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m-q4_0.gguf", dtype=torch.float32)
    err = (logits(q4, tmp_path) - reference).abs().max().item()
    assert 1e-3 < err < 0.3 * max(1.0, reference.abs().max().item())  # 4-bit: close, but not the same


def test_an_architecture_llama_cpp_layout_is_not_known_for_is_refused(tmp_path):
    folder = tiny_model(tmp_path / "hf", "gpt2", n_embd=64, n_layer=2, n_head=4)
    with pytest.raises(
        FtpipeError, match=r"^export.gguf: the model's architecture 'gpt2' \(GPT2LMHeadModel\)"
    ):
        write_gguf(folder, tmp_path / "m.gguf", "f16", "", "tiny", {})
    assert not (tmp_path / "m.gguf").exists()


def test_a_lora_that_was_not_merged_is_refused(tmp_path):
    folder = tiny_model(tmp_path / "hf", "llama")
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(weights)
    tensors["model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(8, 64)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(FtpipeError, match=r"^export.gguf: .* still holds LoRA weights .*not merged"):
        write_gguf(folder, tmp_path / "m.gguf", "q8_0", "", "tiny", {})

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(FtpipeError, match=r"^export.gguf: .* is a LoRA adapter, not a model"):
        write_gguf(adapter, tmp_path / "m.gguf", "q8_0", "", "tiny", {})

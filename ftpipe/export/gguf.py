"""An HF model folder (merged, safetensors) → one GGUF file, through the `gguf` package's writer, tensor-name
map and quantizers, laid out as llama.cpp's own converter lays out these architectures.

What llama.cpp expects beyond the tensors: the architecture's hyper-parameters under `<arch>.*`, a byte-level
BPE vocabulary (`tokenizer.ggml.model = gpt2`: tokens, token types, merges, the pre-tokenizer's name), the
special token ids and whether BOS is added, and `tokenizer.chat_template`. Llama's q/k projections are stored
with their rows permuted for llama.cpp's rotary layout (each head's two halves interleaved); Qwen2 keeps the
HF order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import FtpipeError

log = logging.getLogger("ftpipe")


@dataclass(frozen=True)
class Architecture:
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's Llama graph wants rotary pairs interleaved (its converter's `permute`)


# HF `model_type` → how llama.cpp knows it. Mistral (v0.1–v0.3) is Llama's graph in llama.cpp; its sliding
# window, where set, is not kept (llama.cpp's converter does the same).
ARCHITECTURES = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# export type → (the type of its 2-D weights, general.file_type)
TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f16": (Q.F16, F.MOSTLY_F16),
    "bf16": (Q.BF16, F.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0),
    "q5_1": (Q.Q5_1, F.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, F.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, F.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, F.MOSTLY_Q4_0),
}
# Below 8 bits the embedding (and the output head) stay at Q8_0: llama.cpp keeps them above the other weights
# too (it uses Q6_K, which the gguf package cannot quantize), because every token passes through them.
_LOW_BIT = {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}
_EMBEDDINGS = {gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT}


def architecture(model_dir: Path) -> tuple[str, Architecture]:
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise FtpipeError(
            f"export.gguf: the model's architecture {model_type!r} ({', '.join(config.get('architectures') or [])}) "
            f"cannot be exported to GGUF; ftpipe exports {sorted(ARCHITECTURES)}"
        )
    return model_type, ARCHITECTURES[model_type]


def write_gguf(
    model_dir: Path,
    dest: Path,
    export_type: str,
    chat_template: str,
    name: str,
    metadata: dict[str, str],
) -> dict[str, Any]:
    """Write `model_dir` as a GGUF of `export_type` to `dest`; `metadata` adds string keys (ftpipe.*).
    Returns counts of the tensor types written."""
    from transformers import AutoConfig, AutoTokenizer

    if export_type not in TYPES:
        raise FtpipeError(f"export.gguf: {export_type!r} is not one of {sorted(TYPES)}")
    if (model_dir / "adapter_config.json").is_file():
        raise FtpipeError(
            f"export.gguf: {model_dir} is a LoRA adapter, not a model; export the merged model (merge stage)"
        )
    model_type, arch = architecture(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    weight_type, file_type = TYPES[export_type]

    writer = gguf.GGUFWriter(dest, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _add_hyperparameters(writer, config, model_type)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(writer, tokenizer, model_dir, config.vocab_size, chat_template)
    for key, value in metadata.items():
        writer.add_string(key, value)

    names = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
    written: dict[str, int] = {}
    for hf_name, tensor in _tensors(model_dir, config):
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise FtpipeError(f"export.gguf: no GGUF name for tensor {hf_name!r} of this {model_type} model")
        if arch.permute_qk and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads
            if hf_name.endswith("k_proj.weight"):
                heads = config.num_key_value_heads
            tensor = _rotary_permute(tensor, heads)
        qtype = _tensor_type(gguf_name, names, tensor, weight_type)
        data = tensor if qtype == Q.F32 else gguf.quants.quantize(tensor, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        written[qtype.name] = written.get(qtype.name, 0) + 1

    dest.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


def _add_hyperparameters(writer: gguf.GGUFWriter, config: Any, model_type: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // heads:  # llama.cpp derives it from these otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type != "default":
        raise FtpipeError(
            f"export.gguf: the model's rope scaling {rope_type!r} is not exported by ftpipe (default and linear are)"
        )
    window = getattr(config, "sliding_window", None)
    if model_type == "mistral" and window and window < config.max_position_embeddings:
        log.warning(
            "[export] llama.cpp runs Mistral without its %d-token sliding window: prompts longer than that "
            "attend further back than in transformers",
            window,
        )


def _tensors(model_dir: Path, config: Any) -> Iterator[tuple[str, np.ndarray]]:
    """The folder's tensors as float32 numpy arrays (bf16 has no numpy dtype, so through torch)."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FtpipeError(f"export.gguf: {model_dir} holds no *.safetensors weights")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for file in files:
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if "lora_" in hf_name:
                    raise FtpipeError(
                        f"export.gguf: {file.name} still holds LoRA weights ({hf_name}); the adapter was "
                        "not merged into the model, so there is nothing llama.cpp could run"
                    )
                if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                    continue  # recomputed by llama.cpp / the same tensor as token_embd
                yield hf_name, f.get_tensor(hf_name).float().numpy()


def _rotary_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores each head's rotary dimensions as two halves; llama.cpp's Llama wants them interleaved."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _tensor_type(
    gguf_name: str, names: gguf.TensorNameMap, tensor: np.ndarray, wanted: gguf.GGMLQuantizationType
) -> gguf.GGMLQuantizationType:
    if tensor.ndim < 2:
        return Q.F32  # norms and biases: tiny, and llama.cpp computes with them in f32
    if wanted in _LOW_BIT and any(gguf_name == gguf.TENSOR_NAMES[t] + ".weight" for t in _EMBEDDINGS):
        wanted = Q.Q8_0
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    if tensor.shape[-1] % block:
        log.warning(
            "[export] %s: rows of %d don't split into blocks of %d; kept in f16",
            gguf_name,
            *tensor.shape[-1:],
            block,
        )
        return Q.F16
    return wanted


def added_specials(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding plain text adds BOS / EOS: what the tokenizer does, not what a config file claims."""
    probe = tokenizer("a").input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return bos is not None and probe[:1] == [bos], eos is not None and probe[-1:] == [eos]


# A byte-level BPE's pre-tokenizer → llama.cpp's name for the same split (`tokenizer.ggml.pre`).
def _pre_tokenizer_name(tokenizer: Any) -> str:
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if model.get("type") != "BPE" or "ByteLevel" not in kinds:
        raise FtpipeError(
            "export.gguf: the model's tokenizer is not a byte-level BPE (it is "
            f"{model.get('type')} with pre-tokenizer {kinds or None}); ftpipe writes GGUF vocabularies of the "
            "gpt2 kind only (SmolLM2, Qwen2, Llama 3, …), not SentencePiece ones"
        )
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex"):
        return "smollm"  # SmolLM's: every digit alone, then GPT-2's split
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():  # first name of each split is llama.cpp's own
            if known == regex:
                return name
    raise FtpipeError(
        f"export.gguf: the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} matches none llama.cpp knows by "
        "name, so llama.cpp would split text differently from training"
    )


def _add_vocab(
    writer: gguf.GGUFWriter, tokenizer: Any, model_dir: Path, n_vocab: int, chat_template: str
) -> None:
    """llama.cpp's gpt2 vocabulary: every id up to the embedding's size (unused ones as [PAD<i>]), added
    tokens raw (CONTROL if special, else USER_DEFINED), merges, special ids and the chat template."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(tokenizer))
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[gguf.TokenType] = []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    if len(by_id) > n_vocab:
        raise FtpipeError(
            f"export.gguf: the tokenizer has {len(by_id)} tokens but the model's embedding only {n_vocab}"
        )
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    adds_bos, adds_eos = added_specials(tokenizer)
    special.add_special_token = {"bos": adds_bos, "eos": adds_eos}
    special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)

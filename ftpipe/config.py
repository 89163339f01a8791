"""The config schema, validation with messages that name the key, and Hydra composition for non-run verbs."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import FtpipeError
from .paths import CONF_DIR, default_cache_root
from .training.distributed import zero_stage


@dataclass
class ModelConfig:
    # local HF folder, hub id, path to a .gguf, `pypi:NAME==VERSION` (a wheel carrying a GGUF), or `tiny:llama`
    path: str = MISSING
    gguf_file: str | None = None  # which .gguf inside a folder or wheel; the only one if unset
    revision: str | None = None
    trust_remote_code: bool = False
    tiny: dict[str, Any] | None = None  # architecture of a random test model (`tiny:` paths)


@dataclass
class DatasetConfig:
    path: str = MISSING  # local file/folder, hub name, or `embedded:colorist` / `embedded:assistant`
    format: str = "auto"  # conversation | alpaca | openai | oasst1 | colors | pretrain | preference | auto
    split: str = "train"  # hub split to read
    eval_size: int = 0  # rows held out (seeded) for evaluation
    name: str | None = None  # the assistant's owner (embedded assistant set)
    # the system prompt of rows that carry none, instead of the format's default (colors: XTuner's colorist
    # prompt, alpaca: XTuner's alpaca prompt); "" = none; null = the format's default. Rows' own system
    # turns are kept.
    system: str | None = None
    max_length: int = 2048
    pack: bool = True
    truncation: str = (
        "truncate"  # truncate | split | drop: what pack does with a sample longer than max_length
    )
    train_on_inputs: bool = False
    skip_bad_rows: bool = False
    char_level_answers: bool = False  # tokenise answers one token per character (colour hex codes)
    num_proc: int = 1  # runtime only


@dataclass
class TemplateConfig:
    """XTuner's prompt-template fields; `{system}`, `{input}`, `{round}` are filled in."""

    name: str = MISSING
    system: str = ""
    instruction: str = "{input}"
    suffix: str = ""
    suffix_as_eos: bool = False
    sep: str = ""
    stop_words: list[str] = field(default_factory=list)
    chat_template: str | None = None  # Jinja; `template=tokenizer` takes the model's own


@dataclass
class OptimizerConfig:
    # adamw: torch's (fused on CUDA), its moments in the adapters' dtype; adamw_8bit: bitsandbytes' AdamW with
    # 8-bit moments (blockwise quantized; README, "Less memory")
    name: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0


@dataclass
class LauncherConfig:
    name: str = (
        "local"  # local | torchrun | deepspeed_zero1 | deepspeed_zero2[_offload] | deepspeed_zero3[_offload]
    )
    nproc_per_node: Any = 1  # ranks on each node; `auto`: one per visible GPU (1 without GPUs)
    nnodes: int = 1
    rdzv_endpoint: str | None = None  # HOST:PORT of the rendezvous (multi-node)
    timeout_minutes: int = 30  # a collective waiting longer than this fails the run instead of hanging it
    deepspeed: dict[str, Any] | None = None


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # a list of module names, or "all-linear"
    # adapters only in the last N decoder layers (null: all): the backward pass then stops below them, which
    # on a CPU is most of a step's cost
    last_layers: int | None = None


@dataclass
class SpeedConfig:
    """GPU speed levers (ftpipe/training/speed/). `auto` picks the best measured setting for the device;
    on the CPU every lever resolves to the plain path (docs/performance.md has the measurements)."""

    # auto | sdpa | docs | varlen | flex: per-document causal attention on packed rows (auto: varlen on CUDA,
    # docs on CPU; sdpa = transformers' dense per-document mask)
    attention: str = "auto"
    # auto | fa2 | fa4: the kernel of varlen attention: FlashAttention-2 inside torch, or flash-attn-4's (the
    # optional `ftpipe[fa4]`, GPUs of compute capability 9.0+; speed/fa4.py); auto = fa4 where it imports
    attention_kernel: str = "auto"
    # auto | liger | torch | off: linear + cross-entropy without the full logits (auto: liger or torch on CUDA,
    # off on CPU); off = the answer-only loss (the model's LM head only where a label is trained)
    fused_ce: str = "auto"
    compile: str = "auto"  # auto | on | off: torch.compile each decoder layer
    fused_lora: str = "auto"  # auto | on | off: one autograd function per LoRA linear (base + A/B)
    # auto | on | off: with fused_lora, the SwiGLU MLP over its gate/up group with a one-pass backward
    # (speed/swiglu.py); auto = off (speed/policy.py says why)
    fused_swiglu: str = "auto"
    # auto | none | full | offload | selective: recompute layers in backward to save memory (auto: offload on
    # CUDA for micro-batches of 32k tokens or more, else none; offload = full on CPU)
    checkpointing: str = "auto"
    # the MLP of each layer runs over chunks of this many tokens, each recomputed in backward on its own (long
    # sequences: its intermediate activations exist for one chunk at a time); None = auto (16384 on CUDA);
    # 0 = off
    mlp_chunk_tokens: int | None = None
    # auto | on | off: under offloaded checkpointing, the recompute of each layer skips the MLP's down projection
    # GEMM, whose output the backward never reads (speed/lora.py; exact); auto = on where it applies
    skip_unread_output: str = "auto"
    adapter_dtype: str = "auto"  # auto | bf16 | fp32: LoRA weights' dtype (bf16 skips autocast copies)
    # auto | on | off: run the frozen bottom layers (below `train.lora.last_layers`) once per packed row instead
    # of every step (auto: on for the CPU)
    frozen_prefix: str = "auto"
    # compiled layers keep this fraction of their activations, recomputing the cheapest ops in backward
    # (torch._functorch.config.activation_memory_budget); None = auto (0.8 without checkpointing on CUDA)
    activation_budget: float | None = None
    cpu_embeddings: str = "auto"  # auto | on | off: a frozen, untied input embedding table in host memory
    # micro-batches of about this many tokens (rows per optimizer step kept, via grad accumulation)
    tokens_per_micro_batch: int | None = None


@dataclass
class ProfileConfig:
    """torch.profiler over optimizer steps start+1 .. start+steps, written to the train entry's profile/
    (a trace for Perfetto and summary.json: GPU time by kernel and kind, idle gaps, host ops)."""

    steps: int = 0  # 0 = off
    start: int = 10  # after compilation and the first logs: steady steps
    # record the host's torch ops too; off: GPU kernels and CUDA runtime calls only, so the profiler's own host
    # cost barely moves a host-bound step and its idle gaps are the ones an unprofiled run has
    host_ops: bool = True
    # CUDA: record the allocator over those steps and write profile/memory_peak.json, what was alive at the
    # window's peak (sizes and the Python frames that allocated them)
    memory: bool = False


@dataclass
class DpoConfig:
    beta: float = 0.1  # how far the policy may move from the reference (the KL weight)
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge (SLiC)


@dataclass
class OrpoConfig:
    beta: float = 0.1  # the paper's lambda: weight of the odds-ratio term next to the chosen answers' NLL


@dataclass
class TrainConfig:
    method: str = "lora"  # full | lora | qlora | lora8bit
    # sft (next-token loss on the answers) | dpo | orpo (both need preference pairs: dataset.format=preference)
    objective: str = "sft"
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    micro_batch_size: int = 1
    grad_accum: int = 1
    save_steps: int = 100
    save_total_limit: int = 2
    logging_steps: int = 5
    precision: str = "auto"  # auto | bf16 | fp16 | fp32
    sample_every: int = 0  # generate replies to the recipe's eval inputs every N steps; 0 = off
    sample_max_new_tokens: int = 48
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    orpo: OrpoConfig = field(default_factory=OrpoConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    num_workers: int = 0  # runtime only


@dataclass
class EvalConfig:
    # which metrics evaluate-chat computes: auto (from the dataset) | colorist | assistant | pretrain |
    # preference | none
    task: str = "auto"
    # extra prompts answered before/after training (XTuner's evaluation_inputs)
    inputs: list[str] = field(default_factory=list)
    max_new_tokens: int = 32
    max_samples: int = 0  # cap on held-out rows evaluated (0: all)
    batch_size: int = 16  # in the key: left padding can flip a near-tie in greedy decoding


@dataclass
class ObjectiveConfig:
    metric: str | None = None  # a run.json metric that `-m` sweeps (Optuna) optimise
    direction: str = "minimize"


@dataclass
class MergeConfig:
    max_shard_size: str = "2GB"
    dtype: str = "auto"  # auto (the base folder's dtype) | fp32 | bf16 | fp16


@dataclass
class ExportConfig:
    """The `export` stage (after merge): what local-inference files to write. Nothing set: no export."""

    # GGUF types to write, one file each with an Ollama Modelfile beside it: f16 | bf16 | q8_0 | q5_1 | q5_0 |
    # q4_1 | q4_0 (below 8 bits the embedding stays q8_0)
    gguf: list[str] = field(default_factory=list)


@dataclass
class RootConfig:
    stages: list[str] = field(default_factory=list)
    cache_dir: str = "${ftpipe.cache_root:}"  # paths.default_cache_root: $FTPIPE_CACHE or ~/.cache/ftpipe
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def register_schema() -> None:
    """Let Hydra compose on top of the typed schema (conf/config.yaml lists `ftpipe_schema` first): every key
    exists with its default, so `train.precision=bf16` works without `+`, and typos or wrong types fail
    at composition, naming the key."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="ftpipe_schema", node=RootConfig)
    OmegaConf.register_new_resolver("ftpipe.cache_root", default_cache_root, replace=True)


register_schema()

_CHOICES = {
    "dataset.format": {
        "auto",
        "conversation",
        "alpaca",
        "openai",
        "oasst1",
        "colors",
        "pretrain",
        "preference",
    },
    "dataset.truncation": {"truncate", "split", "drop"},
    "train.method": {"full", "lora", "qlora", "lora8bit"},
    "train.objective": {"sft", "dpo", "orpo"},
    "train.dpo.loss_type": {"sigmoid", "ipo", "hinge"},
    "train.precision": {"auto", "bf16", "fp16", "fp32"},
    "optimizer.scheduler": {"cosine", "linear", "constant"},
    "train.speed.attention": {"auto", "sdpa", "docs", "varlen", "flex"},
    "train.speed.attention_kernel": {"auto", "fa2", "fa4"},
    "train.speed.fused_ce": {"auto", "liger", "torch", "off"},
    "train.speed.compile": {"auto", "on", "off"},
    "train.speed.fused_lora": {"auto", "on", "off"},
    "train.speed.fused_swiglu": {"auto", "on", "off"},
    "train.speed.frozen_prefix": {"auto", "on", "off"},
    "train.speed.checkpointing": {"auto", "none", "full", "offload", "selective"},
    "train.speed.adapter_dtype": {"auto", "bf16", "fp32"},
    "train.speed.cpu_embeddings": {"auto", "on", "off"},
    "train.speed.skip_unread_output": {"auto", "on", "off"},
    "eval.task": {"auto", "colorist", "assistant", "pretrain", "preference", "none"},
    "objective.direction": {"minimize", "maximize"},
    "optimizer.name": {"adamw", "adamw_8bit"},
    "merge.dtype": {"auto", "fp32", "bf16", "fp16"},
}


def validate(cfg: DictConfig) -> dict[str, Any]:
    """Check types, unknown keys and impossible combinations; return the resolved plain dict (no `hydra`)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    try:
        typed = OmegaConf.merge(OmegaConf.structured(RootConfig), plain)
        resolved = OmegaConf.to_container(typed, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(exc).splitlines()[0]
        raise FtpipeError(f"config key `{key}`: {reason}") from None
    assert isinstance(resolved, dict)
    for dotted, allowed in _CHOICES.items():
        *sections, leaf = dotted.split(".")
        node = resolved
        for section in sections:
            node = node[section]
        if node[leaf] not in allowed:
            raise FtpipeError(f"config key `{dotted}`: {node[leaf]!r} is not one of {sorted(allowed)}")
    train, launcher = resolved["train"], resolved["launcher"]
    _validate_export(resolved)
    _validate_launcher(launcher)
    _validate_before_any_stage(resolved)
    if resolved["model"]["trust_remote_code"]:
        logging.getLogger("ftpipe").warning(
            "model.trust_remote_code is on: Python code from %s will run on this machine",
            resolved["model"]["path"],
        )
    if train["method"] in {"qlora", "lora8bit"} and zero_stage(launcher) == 3:
        raise FtpipeError(
            "config keys `train.method` and `launcher`: ZeRO-3 cannot shard 4/8-bit quantized weights"
        )
    if train["objective"] == "dpo" and train["method"] == "full" and zero_stage(launcher) == 3:
        raise FtpipeError(
            "config keys `train.objective` and `launcher`: DPO with full fine-tuning keeps a reference copy of "
            "the model, which ZeRO-3's partitioned weights cannot be copied into; use LoRA or ZeRO-2"
        )
    if train["micro_batch_size"] < 1 or train["grad_accum"] < 1:
        raise FtpipeError("config keys `train.micro_batch_size` / `train.grad_accum` must be ≥ 1")
    _validate_train(train, resolved["optimizer"])
    _validate_optimizer(resolved["optimizer"], launcher)
    _validate_objective(train, resolved["dataset"])
    if resolved["dataset"]["max_length"] < 8:
        raise FtpipeError("config key `dataset.max_length` must be at least 8")
    if resolved["dataset"]["num_proc"] < 1:
        raise FtpipeError("config key `dataset.num_proc` must be ≥ 1")
    template = resolved["template"]
    if template["name"] != "tokenizer" and not template.get("chat_template"):
        for key in ("system", "instruction"):
            try:
                template[key].format(system="", input="", round=1)
            except (KeyError, IndexError, ValueError) as exc:
                raise FtpipeError(
                    f"config key `template.{key}`: {template[key]!r} is not a format string with "
                    f"{{system}}/{{input}}/{{round}} fields ({exc})"
                ) from None
        if "{input}" not in template["instruction"]:
            raise FtpipeError("config key `template.instruction` must contain {input}")
    return resolved


def _validate_before_any_stage(cfg: dict[str, Any]) -> None:
    """Combinations that would fail only late in the chain (after the data stages, or after training)."""
    import torch

    from .tasks import task_name

    if cfg["train"]["precision"] == "fp16" and not torch.cuda.is_available():
        raise FtpipeError(
            "config key `train.precision`: fp16 needs a CUDA GPU; use bf16, fp32 or auto on CPU"
        )
    stages = [s.replace("_", "-") for s in cfg.get("stages") or []]
    evaluates = not stages or "evaluate-chat" in stages
    dataset = cfg["dataset"]
    task = task_name(cfg["eval"]["task"], dataset["format"], dataset["name"])
    if evaluates and task == "colorist" and not dataset["eval_size"]:
        raise FtpipeError(
            "config key `dataset.eval_size`: 0 leaves no held-out rows for eval.task=colorist to score; "
            "set dataset.eval_size > 0, or eval.task=none to only train"
        )


def _validate_export(cfg: dict[str, Any]) -> None:
    from .export.gguf import TYPES

    types = cfg["export"]["gguf"]
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        raise FtpipeError(f"config key `export.gguf`: {unknown} not among the GGUF types {list(TYPES)}")
    if len(set(types)) != len(types):
        raise FtpipeError(f"config key `export.gguf`: {types} names a type twice")
    asked = [s.replace("_", "-") for s in cfg.get("stages") or []]
    if "export" in asked and not types:
        raise FtpipeError(
            "config key `export.gguf`: `stages` asks for export but no GGUF type is given; "
            "e.g. export.gguf=[q8_0]"
        )


def _validate_objective(train: dict[str, Any], dataset: dict[str, Any]) -> None:
    """Preference objectives need pairs, and pairs need them; `auto` data is checked again by train."""
    objective, fmt = train["objective"], dataset["format"]
    if objective != "sft" and fmt not in ("preference", "auto"):
        raise FtpipeError(
            f"config key `train.objective`: {objective} trains on preference pairs, but dataset.format={fmt}; "
            "use dataset.format=preference (or auto) with prompt/chosen/rejected rows"
        )
    if objective == "sft" and fmt == "preference":
        raise FtpipeError(
            "config key `train.objective`: sft on preference pairs would also learn the rejected answers; "
            "set train.objective=dpo or orpo"
        )
    if fmt == "preference" and dataset["truncation"] == "split":
        raise FtpipeError(
            "config key `dataset.truncation`: split cannot keep a preference pair together; use truncate or drop"
        )
    for key in ("dpo", "orpo"):
        if train[key]["beta"] <= 0:
            raise FtpipeError(f"config key `train.{key}.beta` must be > 0, got {train[key]['beta']}")


def _validate_launcher(launcher: dict[str, Any]) -> None:
    """Resolve `nproc_per_node: auto` and refuse launches that could only fail once started."""
    if launcher["nproc_per_node"] == "auto":
        import torch

        launcher["nproc_per_node"] = max(1, torch.cuda.device_count() if torch.cuda.is_available() else 1)
    if not isinstance(launcher["nproc_per_node"], int) or launcher["nproc_per_node"] < 1:
        raise FtpipeError(
            f"config key `launcher.nproc_per_node` must be a number ≥ 1 or auto, got {launcher['nproc_per_node']!r}"
        )
    if launcher["nnodes"] < 1:
        raise FtpipeError(f"config key `launcher.nnodes` must be ≥ 1, got {launcher['nnodes']}")
    if launcher["nnodes"] > 1 and not launcher.get("rdzv_endpoint"):
        raise FtpipeError(
            "config key `launcher.rdzv_endpoint`: set HOST:PORT of the rendezvous for nnodes > 1"
        )
    if launcher["timeout_minutes"] < 1:
        raise FtpipeError(
            f"config key `launcher.timeout_minutes` must be ≥ 1, got {launcher['timeout_minutes']}"
        )
    if launcher.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        raise FtpipeError(
            f"config key `launcher`: launcher={launcher['name']} needs DeepSpeed (pip install 'ftpipe[deepspeed]')"
        )


def _validate_train(train: dict[str, Any], optimizer: dict[str, Any]) -> None:
    if train["epochs"] <= 0:
        raise FtpipeError(f"config key `train.epochs` must be > 0, got {train['epochs']}")
    if train["max_steps"] is not None and train["max_steps"] < 1:
        raise FtpipeError(f"config key `train.max_steps` must be ≥ 1 or null, got {train['max_steps']}")
    for key in ("save_steps", "save_total_limit", "logging_steps"):
        if train[key] < 1:
            raise FtpipeError(f"config key `train.{key}` must be ≥ 1, got {train[key]}")
    if train["sample_every"] < 0:
        raise FtpipeError("config key `train.sample_every` must be ≥ 0 (0 turns sampling off)")
    for key in ("steps", "start"):
        if train["profile"][key] < 0:
            raise FtpipeError(f"config key `train.profile.{key}` must be ≥ 0, got {train['profile'][key]}")
    targets = train["lora"]["target_modules"]
    if not (
        targets == "all-linear"
        or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
    ):
        raise FtpipeError(
            f"config key `train.lora.target_modules` must be 'all-linear' or a list of module names, got {targets!r}"
        )
    if train["lora"]["last_layers"] is not None and train["lora"]["last_layers"] < 1:
        raise FtpipeError(
            f"config key `train.lora.last_layers` must be ≥ 1 or null, got {train['lora']['last_layers']}"
        )
    chunk = train["speed"]["mlp_chunk_tokens"]
    if chunk is not None and chunk < 0:
        raise FtpipeError(
            f"config key `train.speed.mlp_chunk_tokens` must be ≥ 0 (0: off) or null (auto), got {chunk}"
        )
    if train["lora"]["r"] < 1:
        raise FtpipeError(f"config key `train.lora.r` must be ≥ 1, got {train['lora']['r']}")
    if optimizer["lr"] <= 0:
        raise FtpipeError(f"config key `optimizer.lr` must be > 0, got {optimizer['lr']}")
    if not 0 <= optimizer["warmup_ratio"] < 1:
        raise FtpipeError(
            f"config key `optimizer.warmup_ratio` must be in [0, 1), got {optimizer['warmup_ratio']}"
        )
    if len(optimizer["betas"]) != 2:
        raise FtpipeError(f"config key `optimizer.betas` must hold two numbers, got {optimizer['betas']}")


def _validate_optimizer(optimizer: dict[str, Any], launcher: dict[str, Any]) -> None:
    if optimizer["name"] != "adamw_8bit":
        return
    if launcher.get("deepspeed"):
        raise FtpipeError(
            f"config keys `optimizer.name` and `launcher`: adamw_8bit runs under launcher=local or torchrun; "
            f"launcher={launcher['name']} keeps the optimizer states itself (ZeRO shards them): use adamw"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise FtpipeError(
            "config key `optimizer.name`: adamw_8bit needs bitsandbytes (pip install 'ftpipe[qlora]')"
        )


def quote_overrides(args: list[str]) -> list[str]:
    """Overrides as a user types them, made parseable: Hydra's lexer rejects unquoted non-ASCII values
    (`dataset.name=伍鲜同志`, as in XTuner's tutorial), so such a value, or each value of a comma sweep, is quoted.
    Anything Hydra already parses, and anything that is not `key=value`, is left as it is."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or arg.startswith("-") or value.isascii() or "'" in value or '"' in value:
            out.append(arg)
            continue
        try:
            parser.parse_override(arg)
            out.append(arg)
        except Exception:  # Hydra's lexer error: quote the value(s) and let Hydra judge again
            out.append(key + "=" + ",".join(f"'{part}'" for part in value.split(",")))
    return out


def compose(overrides: list[str], config_dir: str | None = None) -> DictConfig:
    """Compose the app config outside a Hydra run (show, check, chat); `config_dir` adds a user's configs."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            return hydra_compose(
                config_name="config",
                overrides=[*quote_overrides(overrides), *extra],
                return_hydra_config=False,
            )
    except Exception as exc:  # Hydra's own messages already name the override or file
        raise FtpipeError(_one_line(exc)) from None


def _one_line(exc: BaseException) -> str:
    """Hydra's report as one line: its sentences and any list of options, without OmegaConf's indented
    details (`full_key: …`), the search path or the trace hint."""
    text = str(exc) + (f"\n{exc.__cause__}" if exc.__cause__ else "")
    parts: list[str] = []
    for line in text.split("Config search path:")[0].splitlines():
        if not line.strip() or "HYDRA_FULL_ERROR" in line:
            continue
        if line.strip().startswith("full_key:"):  # the dotted key, where the sentence names only its leaf
            key = line.split(":", 1)[1].strip()
            if key and key not in text.replace(line, ""):
                parts.append(f"(config key `{key}`)")
            continue
        if not line[0].isspace():
            parts.append(line.strip() if line.rstrip()[-1] in ".:;!?" else line.strip() + ".")
        elif parts and parts[-1].endswith((":", ",")) and not any(c in line for c in "=:"):
            parts[-1] += " " + line.strip() + ","  # an option of the list the previous line announced
    return " ".join(parts).rstrip(".,")

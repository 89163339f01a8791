"""export on tiny_llama, through the engine after a real train → convert → merge: the f16 and q8_0 GGUFs load
with transformers' GGUF loader and give the merged model's logits, their tokenizer is the training tokenizer
token for token, their chat template formats prompts as training did, and the stage joins the chain only when
asked for."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import gguf
import pytest
import torch
import train_helpers as h
import train_worker

from ftpipe import engine, stages
from ftpipe.cache import Cache
from ftpipe.config import compose, validate
from ftpipe.data.templates import SYSTEM_TEMPLATE, generation_prompt
from ftpipe.errors import FtpipeError
from ftpipe.paths import PACKAGE_DIR
from ftpipe.stages import export

TYPES = ["f16", "q8_0"]
# q8_0 stores each block of 32 weights as int8 with one f16 scale: the logits of the tiny model move by
# about 0.8% of the largest logit; 2% is the stated bound
Q8_0_RELATIVE_TOLERANCE = 0.02


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache = Cache(tmp_path_factory.mktemp("cache"))
    cfg = h.chain_cfg(["export"], method="lora", max_steps=6, save_steps=3)
    cfg["export"]["gguf"] = TYPES
    chain = [*train_worker.CHAIN, export.STAGE]
    rows = {r["name"]: r for r in engine.run(engine.plan(cfg, chain, cache), cache)}
    return cfg, rows


def colorist_inputs(n: int = 24) -> list[str]:
    lines = (PACKAGE_DIR / "data" / "embedded" / "colorist.jsonl").read_text().splitlines()
    descriptions = [json.loads(line)["description"].split(":", 1)[1].strip() for line in lines[::37][:n]]
    return [*descriptions, "A warm orange, like 1999's sunsets: #ff8800?", "  two  spaces\tand\nnewlines 42"]


def gguf_path(rows, export_type: str) -> Path:
    entry = Path(rows["export"]["output"])
    (path,) = (entry / "gguf" / export_type).glob("*.gguf")
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids, use_cache=False).logits.float()


def test_exported_files_reproduce_the_merged_model(exported):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, rows = exported
    merged = Path(rows["merge"]["output"]) / "model"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    system = SYSTEM_TEMPLATE["colorist"]
    text = generation_prompt(cfg["template"], [], "warm orange", system, bos_token=tokenizer.bos_token)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    reference = logits(model, ids)
    rounded = logits(model.to(torch.float16).float(), ids)  # the merged weights rounded to f16, run in f32

    loaded = {}
    for export_type in TYPES:
        path = gguf_path(rows, export_type)
        assert (path.parent / "Modelfile").is_file()
        loaded[export_type] = logits(
            AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32), ids
        )
    # the stage's own check (its probe prompt) is in run.json: f16 moves the logits less than q8_0
    assert 0 < rows["export"]["export_f16_max_abs_diff"] < rows["export"]["export_q8_0_max_abs_diff"]
    # f16: exactly the merged weights rounded to f16 (up to summation order)
    assert (loaded["f16"] - rounded).abs().max() < 1e-4
    scale = max(1.0, reference.abs().max().item())
    q8_err = (loaded["q8_0"] - reference).abs().max().item()
    print(
        f"max |logit diff| vs merged (max |logit| {scale:.3g}): f16 {(loaded['f16'] - reference).abs().max():.3g}, "
        f"f16 vs f16-rounded {(loaded['f16'] - rounded).abs().max():.3g}, q8_0 {q8_err:.3g}"
    )
    assert q8_err <= Q8_0_RELATIVE_TOLERANCE * scale, q8_err
    assert q8_err > (loaded["f16"] - reference).abs().max().item()  # it really is quantized
    assert gguf_path(rows, "q8_0").stat().st_size < 0.7 * gguf_path(rows, "f16").stat().st_size
    # the fine-tuning survives the export: the file is not the base model
    base = AutoModelForCausalLM.from_pretrained(Path(rows["download-model"]["output"]) / "model")
    assert (logits(base, ids) - loaded["f16"]).abs().max() > 10 * (loaded["f16"] - reference).abs().max()


@pytest.mark.parametrize("export_type", TYPES)
def test_gguf_tokenizer_and_chat_template_are_the_training_ones(exported, export_type):
    from transformers import AutoTokenizer

    cfg, rows = exported
    merged = AutoTokenizer.from_pretrained(Path(rows["merge"]["output"]) / "model")
    path = gguf_path(rows, export_type)
    from_gguf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    system = SYSTEM_TEMPLATE["colorist"]
    for text in colorist_inputs():
        prompt = generation_prompt(cfg["template"], [], text, system, bos_token=merged.bos_token)
        for sample in (text, prompt):
            assert from_gguf(sample).input_ids == merged(sample).input_ids, sample
            assert from_gguf.decode(merged(sample).input_ids) == sample
    assert (from_gguf.bos_token, from_gguf.eos_token) == (merged.bos_token, merged.eos_token)

    history = [{"input": "pale pink", "output": "#ffd1df"}]
    messages = [
        {"role": "user", "content": "pale pink"},
        {"role": "assistant", "content": "#ffd1df"},
        {"role": "user", "content": "deep purple"},
    ]
    rendered = from_gguf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert system in rendered
    assert rendered == generation_prompt(
        cfg["template"],
        history,
        "deep purple",
        system,
        bos_token=merged.bos_token,
        eos_token=merged.eos_token,
    )
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.chat_template"].contents() == merged.chat_template


def test_gguf_metadata_records_provenance_and_the_architecture(exported):
    from transformers import AutoConfig

    _, rows = exported
    fields = gguf.GGUFReader(gguf_path(rows, "q8_0")).fields
    keys = json.loads(fields["ftpipe.stage_keys"].contents())
    assert {name: keys[name] for name in rows} == {name: row["key"] for name, row in rows.items()}
    recipe = json.loads(fields["ftpipe.recipe"].contents())
    assert recipe["train"]["method"] == "lora" and recipe["export"]["gguf"] == TYPES
    assert recipe["model"]["path"] == "tiny:llama"
    versions = json.loads(fields["ftpipe.versions"].contents())
    assert versions["gguf"] == importlib.metadata.version("gguf")
    assert fields["ftpipe.export_type"].contents() == "q8_0"
    config = AutoConfig.from_pretrained(Path(rows["merge"]["output"]) / "model")
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.block_count"].contents() == config.num_hidden_layers
    assert fields["llama.attention.head_count_kv"].contents() == config.num_key_value_heads
    assert (
        fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    )  # the SmolLM2 tokenizer.json: GPT-2's ByteLevel split
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False  # SmolLM2 adds no BOS
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


def test_export_refuses_a_model_it_cannot_export(tmp_path, monkeypatch):
    """A model whose architecture llama.cpp's layout here does not cover: one line naming the key, no entry."""
    cache = Cache(tmp_path)
    cfg = h.chain_cfg(["export"], method="full", max_steps=2, save_steps=2)
    cfg["export"]["gguf"] = ["f16"]
    import ftpipe.export.gguf as writer

    monkeypatch.setattr(writer, "ARCHITECTURES", {"qwen2": writer.ARCHITECTURES["qwen2"]})
    with pytest.raises(
        FtpipeError, match=r"export.gguf: the model's architecture 'llama'.*exports \['qwen2'\]"
    ):
        engine.run(engine.plan(cfg, [*train_worker.CHAIN, export.STAGE], cache), cache)
    assert list((tmp_path / "merge").glob("*/manifest.json"))  # merge committed; export did not
    assert not list((tmp_path / "export").glob("*/manifest.json"))
    assert not list((tmp_path / "export").glob("*.tmp"))


def planned(cache: Path, *overrides: str) -> dict[str, str]:
    cfg = validate(compose(["model=tiny_llama", *overrides]))
    return {step.stage.name: step.key for step in stages.plan(cfg, Cache(cache))}


def test_export_joins_the_chain_only_when_asked_for(tmp_path):
    assert "export" not in planned(tmp_path)
    assert (
        list(planned(tmp_path, "export.gguf=[q8_0]"))[-1] == "export"
    )  # the default chain makes a merged model
    assert "export" not in planned(tmp_path, "export.gguf=[q8_0]", "stages=[download]")
    assert "export" not in planned(tmp_path, "export.gguf=[q8_0]", "stages=[merge]")  # stops where it says
    assert list(planned(tmp_path, "export.gguf=[q4_0]", "stages=[export]"))[-2:] == ["merge", "export"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["export.gguf=[q3_k]"], r"config key `export.gguf`: \['q3_k'\] not among"),
        (["export.gguf=[f16,f16]"], r"config key `export.gguf`: .* names a type twice"),
        (["stages=[export]"], r"config key `export.gguf`: `stages` asks for export but no GGUF type"),
    ],
)
def test_bad_export_config_fails_before_any_stage_naming_the_key(overrides, message):
    with pytest.raises(FtpipeError, match=message):
        validate(compose(["model=tiny_llama", *overrides]))


def test_the_key_does_not_depend_on_the_order_of_types(tmp_path):
    def key(types: str) -> str:
        return planned(tmp_path, f"export.gguf={types}")["export"]

    assert key("[f16,q8_0]") == key("[q8_0,f16]") != key("[f16]")


def test_chat_with_the_gguf_file_formats_prompts_as_training(exported):
    """`ftpipe chat FILE.gguf`: transformers' GGUF loader, and the file's own chat template (template=tokenizer)
    gives the replies the training template gives with the same model."""
    import io

    from omegaconf import OmegaConf

    from ftpipe.chat import chat_loop
    from ftpipe.models.loading import load_for_inference

    cfg, rows = exported
    model, tokenizer = load_for_inference(gguf_path(rows, "f16"))
    own = OmegaConf.to_container(compose(["template=tokenizer"]).template, resolve=True)
    session = "warm orange\n\ndeep purple\n\nEXIT\n"

    def replies(template, system):
        out = io.StringIO()
        chat_loop(model, tokenizer, template, system, io.StringIO(session), out, max_new_tokens=8)
        return out.getvalue()

    from_file = replies(own, None)  # the system prompt is the file's template default
    assert from_file == replies(cfg["template"], SYSTEM_TEMPLATE["colorist"])
    assert len(from_file.splitlines()) == 2


@pytest.mark.slow  # llama-cpp-python builds llama.cpp from source: `make test-full` installs it
def test_llama_cpp_runs_the_file_with_its_chat_template_and_replies_as_transformers(exported):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, rows = exported
    path = gguf_path(rows, "f16")
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=1, logits_all=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    # llama.cpp's own reading of the file: the chat template from its metadata, rendered by llama-cpp-python
    formatter = Jinja2ChatFormatter(
        llm.metadata["tokenizer.chat_template"],
        eos_token=llm._model.token_get_text(llm.token_eos()),
        bos_token=llm._model.token_get_text(llm.token_bos()),
    )
    stops = [tokenizer.convert_tokens_to_ids(word) for word in cfg["template"]["stop_words"]]
    for prompt in ["warm orange", "deep purple", "Give me the colour of a stormy sea."]:
        text = formatter(messages=[{"role": "user", "content": prompt}]).prompt
        assert text == generation_prompt(
            cfg["template"], [], prompt, SYSTEM_TEMPLATE["colorist"], bos_token=tokenizer.bos_token
        )
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert (
            ids == tokenizer(text, add_special_tokens=False).input_ids
        )  # llama.cpp's tokenizer: the same ids

        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            expected_logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        got_logits = torch.tensor(llm.scores[: len(ids)])
        print(
            f"{prompt!r}: llama.cpp vs transformers max |logit diff| {(got_logits - expected_logits).abs().max():.3g}"
        )
        assert (got_logits - expected_logits).abs().max() < 1e-2  # f16 matmuls in llama.cpp

        llm.reset()
        replied = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
            if token in stops or len(replied) == 12:
                break
            replied.append(token)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=12,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=stops[0],
            )
        expected = [t for t in out[0, len(ids) :].tolist() if t not in stops]
        assert replied == expected, (prompt, tokenizer.decode(replied), tokenizer.decode(expected))

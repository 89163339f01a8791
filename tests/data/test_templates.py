"""Prompt templates against XTuner's definitions: exact strings, exact loss masks, the same prompt for generation
and through a generated Jinja chat template. Tokenizer: SmolLM2's (BOS <|im_start|>, EOS <|im_end|>)."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from ftpipe.config import compose
from ftpipe.data.labels import IGNORE_INDEX
from ftpipe.data.templates import (
    chat_template_jinja,
    encode,
    encode_batch,
    encode_conversation,
    encode_pretrain,
    generation_prompt,
    prompt_ids,
    resolve_template,
    stop_words,
)
from ftpipe.data.templates import segments as segments_module
from ftpipe.data.templates.tokenize import PieceTokenizer
from ftpipe.errors import FtpipeError
from ftpipe.paths import ASSETS_DIR

B, E = "<|im_start|>", "<|im_end|>"  # this tokenizer's BOS and EOS
CONV = [
    {"system": "Be brief.", "input": "Hi there", "output": "Hello!"},
    {"input": "2+2?", "output": "4"},
]
LLAMA2_SYS = (
    "[INST] <<SYS>>\n You are a helpful, respectful and honest assistant. Always answer as helpfully as possible,"
    " while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous,"
    " or illegal content. Please ensure that your responses are socially unbiased and positive in nature.\n"
    "Be brief.\n<</SYS>>\n [/INST] "
)
# Hand-written from XTuner's PROMPT_TEMPLATE: the prompt parts (no loss) and answer parts (loss), alternating.
# Templates with suffix_as_eos=false end each answer with the tokenizer's EOS and start the next turn with BOS.
EXPECTED: dict[str, list[str]] = {
    "default": [
        f"{B}<|System|>:Be brief.\n<|User|>:Hi there\n<|Bot|>:",
        f"Hello!{E}",
        f"\n{B}<|User|>:2+2?\n<|Bot|>:",
        f"4{E}",
    ],
    "zephyr": [
        f"{B}<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n",
        f"Hello!{E}",
        f"\n{B}<|user|>\n2+2?\n<|assistant|>\n",
        f"4{E}",
    ],
    "internlm2_chat": [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "Hello!<|im_end|>",
        "\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
        "4<|im_end|>",
    ],
    "qwen_chat": [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "Hello!<|im_end|>",
        "\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
        "4<|im_end|>",
    ],
    "chatml": [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "Hello!<|im_end|>",
        "\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
        "4<|im_end|>",
    ],
    "llama2_chat": [
        f"{B}{LLAMA2_SYS}[INST] Hi there [/INST]",
        f"Hello!{E}",
        f"\n{B}[INST] 2+2? [/INST]",
        f"4{E}",
    ],
    "chatglm3": [
        f"{B}<|system|>\nBe brief.<|user|>\nHi there<|assistant|>\n",
        f"Hello!{E}",
        f"\n{B}<|user|>\n2+2?<|assistant|>\n",
        f"4{E}",
    ],
    "mistral": [
        f"{B}[INST] Be brief. [/INST]\n[INST] Hi there [/INST]",
        f"Hello!{E}",
        f"\n{B}[INST] 2+2? [/INST]",
        f"4{E}",
    ],
    "llama3_chat": [
        f"{B}<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "Hello!<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "4<|eot_id|>",
    ],
    # SmolLM2's own chat_template (ChatML with a newline after each message)
    "tokenizer": [
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "Hello!<|im_end|>",
        "\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
        "4<|im_end|>",
        "\n",
    ],
}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ASSETS_DIR / "smollm2_tokenizer")


@functools.cache
def _composed(name: str) -> dict:
    return OmegaConf.to_container(compose([f"template={name}"]).template, resolve=True)


def load_template(name: str) -> dict:
    """A packaged template as a run gets it: the `template` group composed by Hydra."""
    return copy.deepcopy(_composed(name))


def template(name: str, tok) -> dict:
    return resolve_template(load_template(name), tok)


def spans(tok, ids: list[int], labels: list[int]) -> list[str]:
    """Decoded runs of tokens with and without loss, in order."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            out.append(tok.decode(ids[start:i]))
            start = i
    return out


@pytest.mark.parametrize("name", list(EXPECTED))
def test_two_turn_conversation_decodes_to_the_expected_prompt_and_masks_exactly(tok, name):
    ids, labels = encode_conversation(tok, template(name, tok), CONV)
    expected = EXPECTED[name]
    assert tok.decode(ids) == "".join(expected)
    assert spans(tok, ids, labels) == expected
    assert labels[0] == IGNORE_INDEX  # the first run is a prompt
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))


@pytest.mark.parametrize("name", list(EXPECTED))
def test_generation_prompt_is_the_training_text_up_to_the_answer(tok, name):
    t = template(name, tok)
    ids, labels = encode_conversation(tok, t, CONV)
    prompt = generation_prompt(t, CONV[:1], "2+2?", "Be brief.", bos_token=B, eos_token=E)
    assert prompt == "".join(EXPECTED[name][:3])
    answer_start = max(
        i for i in range(len(ids)) if labels[i] != IGNORE_INDEX and labels[i - 1] == IGNORE_INDEX
    )
    assert prompt_ids(tok, t, CONV[:1], "2+2?", "Be brief.") == ids[:answer_start]
    if name != "llama3_chat":  # its header tags are plain text to this tokenizer: only prompt_ids is exact
        assert tok.encode(prompt, add_special_tokens=False) == ids[:answer_start]


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("case", ["history+system", "first turn", "default system", "no system"])
def test_chat_template_jinja_reproduces_generation_prompt(tok, name, case):
    t = template(name, tok)
    history = CONV[:1] if case == "history+system" else []
    system = {
        "history+system": "Be brief.",
        "first turn": "Be brief.",
        "default system": None,
        "no system": None,
    }
    messages = [{"role": "system", "content": system[case]}] if system[case] else []
    for turn in history:
        messages += [
            {"role": "user", "content": turn["input"]},
            {"role": "assistant", "content": turn["output"]},
        ]
    messages.append({"role": "user", "content": "2+2?"})
    default = "Answer well." if case == "default system" and name != "tokenizer" else None
    jinja = chat_template_jinja(t, default)
    rendered = tok.apply_chat_template(
        messages, chat_template=jinja, add_generation_prompt=True, tokenize=False
    )
    expected = generation_prompt(t, history, "2+2?", system[case] or default, bos_token=B, eos_token=E)
    if name == "tokenizer" and case == "default system":
        return  # the model's own template brings its own default system prompt
    assert rendered == expected


def test_jinja_escapes_quotes_backslashes_and_unicode(tok):
    t = {**load_template("chatglm3"), "instruction": "问：'{input}'\\\n答：", "name": "odd"}
    history = [{"input": "a 'b' \\ c", "output": "d"}]
    prompt = generation_prompt(t, history, "再见", "sys", bos_token=B, eos_token=E)
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a 'b' \\ c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "再见"},
    ]
    jinja = chat_template_jinja(t, None)
    assert tok.apply_chat_template(
        messages, chat_template=jinja, add_generation_prompt=True, tokenize=False
    ) == (prompt)


def test_train_on_inputs_puts_loss_on_everything_but_bos(tok):
    t = template("default", tok)
    ids, labels = encode_conversation(tok, t, CONV, train_on_inputs=True)
    bos_positions = [i for i, x in enumerate(ids) if x == tok.bos_token_id]
    assert bos_positions == [
        0,
        len(tok.encode("".join(EXPECTED["default"][:2]) + "\n", add_special_tokens=False)),
    ]
    assert all((label == IGNORE_INDEX) == (i in bos_positions) for i, label in enumerate(labels))


def test_char_level_answers_tokenise_one_token_per_character_and_decode_back(tok):
    t = template("chatml", tok)
    conv = [{"input": "acid green", "output": "#8ffe09"}]
    plain_ids, plain_labels = encode_conversation(tok, t, conv)
    ids, labels = encode_conversation(tok, t, [{**conv[0], "char_level": True}])
    trained = [x for x, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert [tok.decode([x]) for x in trained] == ["#", "8", "f", "f", "e", "0", "9", E]
    assert tok.decode(ids) == tok.decode(plain_ids)
    assert sum(label != IGNORE_INDEX for label in plain_labels) < len(trained)


def test_char_level_refuses_characters_that_are_several_tokens(tok):
    with pytest.raises(FtpipeError, match="not one"):
        encode_conversation(
            tok, template("chatml", tok), [{"input": "x", "output": "🎨", "char_level": True}]
        )


def test_pretrain_documents_get_bos_and_eos_and_loss_after_bos(tok):
    (ids,), (labels,) = encode_pretrain(tok, ["Once upon a time."])
    body = tok.encode("Once upon a time.", add_special_tokens=False)
    assert ids == [tok.bos_token_id, *body, tok.eos_token_id]
    assert labels == [IGNORE_INDEX, *body, tok.eos_token_id]


def test_batched_encoding_equals_one_by_one_and_the_slow_tokenizer_path(tok, monkeypatch):
    t = template("internlm2_chat", tok)
    convs = [
        CONV,
        [{"input": "  leading spaces\n\n and\ttabs", "output": "ünïcödé 你好 <|im_end|> in text"}],
        [{"system": "s", "input": "x", "output": "y"}],
    ]
    batched = encode_batch(tok, t, convs)
    one_by_one = [encode_conversation(tok, t, c) for c in convs]
    assert list(zip(*batched, strict=True)) == one_by_one
    monkeypatch.setattr(
        segments_module, "tokenize", lambda tk, texts: tk(texts, add_special_tokens=False)["input_ids"]
    )
    assert encode_batch(tok, t, convs) == batched


def test_stop_words_and_template_tokenizer_adds_eos(tok):
    assert stop_words(load_template("qwen_chat")) == ["<|im_end|>", "<|endoftext|>"]
    assert stop_words(load_template("default")) == []
    assert stop_words(template("tokenizer", tok)) == [E]


def test_tokenizer_template_needs_resolving_and_a_chat_template(tok):
    with pytest.raises(FtpipeError, match="resolve_template"):
        generation_prompt(load_template("tokenizer"), [], "hi", None)
    bare = AutoTokenizer.from_pretrained(ASSETS_DIR / "smollm2_tokenizer")
    bare.chat_template = None
    with pytest.raises(FtpipeError, match="no chat_template"):
        resolve_template(load_template("tokenizer"), bare)


def test_unknown_template_names_the_choices():
    with pytest.raises(FtpipeError, match=r"(?s)template/nope.*internlm2_chat"):
        load_template("nope")


def test_qwen_chat_is_chatml_under_its_own_name():
    assert {**load_template("qwen_chat"), "name": "chatml"} == load_template("chatml")


def test_piece_tokenizer_equals_whole_text_tokenization(tok):
    texts = [
        "<|im_start|>system\nx<|im_end|>\n<|im_start|>user\n  hi <|im_end|><|im_end|>\n\n",
        " leading<|im_start|> trailing \n",
        "no special tokens at all, 你好 ünï",
        "<|im_end|>",
        "",
    ] * 3
    pieces = PieceTokenizer(tok)
    assert pieces.usable(tok, texts)
    assert pieces(texts) == tok(texts, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["chatml", "tokenizer"])
def test_encode_dispatches_on_the_format_and_flattens(tok, name):
    t = template(name, tok)
    convs = [CONV, [{"input": "x", "output": "y"}]]
    ids, labels, offsets = encode(tok, t, convs, "conversation")
    assert ids.dtype == labels.dtype == np.int32 and offsets.dtype == np.int64
    rows = [(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    assert list(zip(*encode_batch(tok, t, convs), strict=True)) == rows
    docs = [[{"input": "", "output": "Once upon a time."}], [{"input": "", "output": "The end."}]]
    ids, labels, offsets = encode(tok, t, docs, "pretrain")  # the template plays no part
    rows = [(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    assert list(zip(*encode_pretrain(tok, ["Once upon a time.", "The end."]), strict=True)) == rows

"""Prompt templates: conversation → token ids + labels for training, and the same text for generation.

A template is the `template` config group as a plain dict (conf/template/NAME.yaml, fields of
config.TemplateConfig, composed by Hydra like every other group), XTuner's PROMPT_TEMPLATE reproduced field for
field. The `tokenizer` template uses the model's own `chat_template`.

    system.py    the formats' default system prompts (XTuner's SYSTEM_TEMPLATE)
    segments.py  a conversation as segments, and their layout as ids + labels
    tokenize.py  fast tokenisation of many strings at once
    encode.py    conversations / pretraining documents → ids + labels (`encode`: map's and check's dispatch)
    prompt.py    the generation prompt (evaluation, sampling, chat) and stop words
    jinja.py     a named template as a Jinja chat_template (the merged model's tokenizer)
    hf.py        `template=tokenizer`: the model's own chat_template
"""

from __future__ import annotations

from ..labels import IGNORE_INDEX
from .encode import PRETRAIN_FORMAT, encode, encode_batch, encode_conversation, encode_pretrain
from .hf import TOKENIZER_TEMPLATE, resolve_template, uses_tokenizer_template
from .jinja import chat_template_jinja
from .prompt import generation_prompt, prompt_ids, stop_words
from .system import SYSTEM_TEMPLATE

__all__ = [
    "IGNORE_INDEX",
    "PRETRAIN_FORMAT",
    "SYSTEM_TEMPLATE",
    "TOKENIZER_TEMPLATE",
    "chat_template_jinja",
    "encode",
    "encode_batch",
    "encode_conversation",
    "encode_pretrain",
    "generation_prompt",
    "prompt_ids",
    "resolve_template",
    "stop_words",
    "uses_tokenizer_template",
]

"""The text in front of the next answer, as training formats it: for evaluation, sampling and chat.

Text functions never see a tokenizer, so they take the BOS/EOS strings as keywords; tokenise their output
with ``add_special_tokens=False`` (HF's chat-template convention), or use `prompt_ids`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .hf import messages, render, resolve_template, uses_tokenizer_template
from .segments import assemble, segments, segments_text, with_system
from .tokenize import tokenize


def generation_prompt(
    template: dict[str, Any],
    history: Sequence[dict[str, Any]],
    new_input: str,
    system: str | None,
    *,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """The text in front of the next answer, as training formats it (history = earlier {input, output} turns).

    Pass the tokenizer's `bos_token`/`eos_token` to get them where training puts them; then tokenising the text
    with add_special_tokens=False gives the training ids (for text-boundary-safe tokenizers; `prompt_ids` always).
    """
    if uses_tokenizer_template(template):
        return render(template, messages(history, new_input, system), bos_token, eos_token)
    return segments_text(segments(template, with_system(history, new_input, system)), bos_token, eos_token)


def prompt_ids(
    tokenizer: Any,
    template: dict[str, Any],
    history: Sequence[dict[str, Any]],
    new_input: str,
    system: str | None,
) -> list[int]:
    """Token ids of generation_prompt exactly as training lays them out (segment by segment)."""
    if uses_tokenizer_template(template):
        template = resolve_template(template, tokenizer)
        text = render(
            template,
            messages(history, new_input, system),
            tokenizer.bos_token or "",
            tokenizer.eos_token or "",
        )
        return tokenize(tokenizer, [text])[0]
    ids, _ = assemble(tokenizer, [segments(template, with_system(history, new_input, system))])
    return ids[0]


def stop_words(template: dict[str, Any]) -> list[str]:
    """Strings that end a generated answer (add the tokenizer's EOS; XTuner does so implicitly)."""
    return list(template.get("stop_words") or [])

"""The packaged recipes (as torchtune's registry): what `ftpipe ls` lists and `ftpipe cp` copies.

Each entry is a file `conf/recipe/NAME.yaml` whose header (line 2) is the command that runs it and whose next
lines say what it does and reaches; `summary` is the one line `ftpipe ls` shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import FtpipeError
from .paths import RECIPES_DIR


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str

    @property
    def path(self) -> Path:
        return RECIPES_DIR / f"{self.name}.yaml"

    @property
    def command(self) -> str:
        """The command that runs it: line 2 of the file, without the comment mark."""
        return self.path.read_text().splitlines()[1].removeprefix("#").strip()


RECIPES = (
    Recipe("colorist_lora", "SmolLM2-135M learns colour description → hex code with LoRA (`make demo`)"),
    Recipe("colorist_qlora", "the colorist task with QLoRA (4-bit nf4 base weights)"),
    Recipe("colorist_lora_optuna", "Optuna search over colorist_lora's learning rate and LoRA rank (-m)"),
    Recipe("assistant_lora", "self-cognition: the model introduces itself as dataset.name's assistant"),
    Recipe("assistant_qlora", "self-cognition with QLoRA"),
    Recipe("assistant_dpo", "DPO (LoRA) on self-cognition pairs: prefer replies naming dataset.name"),
    Recipe("assistant_orpo", "ORPO (LoRA, no reference model) on assistant_dpo's pairs"),
    Recipe(
        "assistant_dpo_qlora", "assistant_dpo with QLoRA (4-bit base; the reference is the same 4-bit model)"
    ),
    Recipe("pretrain_lora", "continued pretraining on plain text (colour articles), held-out perplexity"),
    Recipe("pretrain_full", "continued pretraining with every weight trained"),
)


def recipe(name: str) -> Recipe:
    name = name.removeprefix("recipe/").removesuffix(".yaml")
    for entry in RECIPES:
        if entry.name == name:
            return entry
    raise FtpipeError(f"no recipe {name!r}; `ftpipe ls` lists them")

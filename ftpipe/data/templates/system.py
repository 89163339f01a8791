"""The system prompts the formats give their rows by default (XTuner's SYSTEM_TEMPLATE, the two ftpipe uses).

`dataset.system` replaces a format's default (`""`: none); rows that carry their own system turn keep it.
"""

from __future__ import annotations

# XTuner's SYSTEM_TEMPLATE.alpaca and SYSTEM_TEMPLATE.colorist, verbatim
SYSTEM_TEMPLATE: dict[str, str] = {
    "alpaca": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n"
    ),
    "colorist": (
        "You are a professional color designer. Please provide the "
        "corresponding colors based on the description of Human.\n"
    ),
}

#!/usr/bin/env python3
"""Regenerate ftpipe/data/embedded/colorist.jsonl from the XKCD colour survey list that matplotlib ships.

Rows use the burkelibbey/colors shape: {"description": "Name: text", "color": "#rrggbb"}.

    python scripts/make_colorist.py [OUT]   (default: the packaged file)
"""

import sys
from pathlib import Path

from matplotlib._color_data import XKCD_COLORS  # 949 names from the XKCD colour survey (CC0)

PACKAGED = Path(__file__).resolve().parents[1] / "ftpipe" / "data" / "embedded" / "colorist.jsonl"
out = Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGED
with open(out, "w") as fh:
    for key, hex_code in sorted(XKCD_COLORS.items()):
        name = key.removeprefix("xkcd:")
        fh.write(f'{{"description": "{name.title()}: {name}", "color": "{hex_code.lower()}"}}\n')
print(f"wrote {out}")

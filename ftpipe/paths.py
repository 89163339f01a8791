"""Where the packaged configs live: inside the wheel, or at the repo root in a source checkout."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_ROOT = PACKAGE_DIR.parent

# An installed wheel carries conf/ inside the package; a source checkout (or editable install) has it at the root.
# conf/recipe links to recipes/, so Hydra finds `+recipe=NAME` in both cases.
CONF_DIR = PACKAGE_DIR / "conf" if (PACKAGE_DIR / "conf" / "config.yaml").is_file() else _SOURCE_ROOT / "conf"
RECIPES_DIR = CONF_DIR / "recipe"

ASSETS_DIR = PACKAGE_DIR / "assets"
EMBEDDED_DATA_DIR = PACKAGE_DIR / "data" / "embedded"


def default_cache_root() -> str:
    """The one default of the cache root (`cache_dir` in the config, `ftpipe cache`): $FTPIPE_CACHE if set,
    else ~/.cache/ftpipe; `cache_dir=` on the command line wins over both. Cache() expands the `~`."""
    return os.environ.get("FTPIPE_CACHE") or "~/.cache/ftpipe"

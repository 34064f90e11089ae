"""Where xyjax keeps what it fetches and measures (models, gemm profiles, compiled programs)."""

from __future__ import annotations

import os


def cache_dir(*parts: str) -> str:
    """$XYJAX_CACHE_DIR, else $XDG_CACHE_HOME/xyjax, else ~/.cache/xyjax; joined with ``parts``."""
    root = os.environ.get("XYJAX_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "xyjax")
    return os.path.join(root, *parts)

"""Where routing data and caches live."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "BANDITROUTER_DATA_DIR"
CACHE_DIR_ENV = "BANDITROUTER_CACHE_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_user_data_dir() -> Path:
    """Where `banditrouter data fetch` writes when no data dir is given and no shared one exists."""
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "banditrouter" / "data"


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """`--data-dir`, else $BANDITROUTER_DATA_DIR, else ../shared/data beside the checkout or the working
    directory (where our developers and CI have it), else the user data dir that `data fetch` fills."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    for candidate in (_REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return default_user_data_dir()


def cache_dir() -> Path:
    """Embedding cache and other derived files: $BANDITROUTER_CACHE_DIR or ~/.cache/banditrouter."""
    d = Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "banditrouter")
    d.mkdir(parents=True, exist_ok=True)
    return d

"""`banditrouter data fetch routerbench`: download the public RouterBench release and convert it to the
CSV layout `load_routerbench` reads (`routerbench/full_train.csv`, `routerbench/full_test.csv`)."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from banditrouter.data.loaders import ROUTERBENCH_MODELS, DataError

ROUTERBENCH_URL = "https://huggingface.co/datasets/withmartian/routerbench/resolve/main/routerbench_0shot.pkl"
"""The public RouterBench release (0-shot, ~36k prompts, 11 models; same columns as our CSVs)."""


def download(url: str, dest: Path, timeout_s: float = 60.0) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, tmp.open("wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            from tqdm import tqdm

            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(
            f"could not download {url}: {getattr(e, 'reason', e)}. This machine may have no internet access: "
            f"download the file by hand on one that has, copy it here, and run "
            f"`banditrouter data fetch routerbench --source /path/to/{dest.name}`."
        ) from None
    tmp.replace(dest)
    return dest


def convert_routerbench(source: Path, out_dir: Path, test_fraction: float = 0.3, seed: int = 0) -> dict[str, int]:
    """Convert a RouterBench release file (.pkl as published, or .csv with the same columns) into
    `out_dir/routerbench/full_{train,test}.csv`, split per task (`eval_name`) with a seeded permutation."""
    import pandas as pd

    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file")
    if source.suffix == ".pkl":
        # The public release is a pandas pickle; only load files you downloaded from the source above.
        df = pd.read_pickle(source)
    elif source.suffix == ".csv":
        df = pd.read_csv(source, keep_default_na=False, na_values={m: [""] for m in ROUTERBENCH_MODELS})
    else:
        raise DataError(f"{source}: expected a .pkl (the public release) or a .csv with the same columns")
    need = ["sample_id", "prompt", "eval_name", *ROUTERBENCH_MODELS, *(f"{m}|total_cost" for m in ROUTERBENCH_MODELS)]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise DataError(f"{source}: missing RouterBench columns {missing[:5]}{' …' if len(missing) > 5 else ''}")
    df = df.copy()
    df["prompt"] = df["prompt"].astype(str)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(df), dtype=bool)
    for _, idx in df.groupby("eval_name").indices.items():
        idx = rng.permutation(idx)
        is_test[idx[: int(round(test_fraction * len(idx)))]] = True
    dest = out_dir / "routerbench"
    dest.mkdir(parents=True, exist_ok=True)
    df[~is_test].to_csv(dest / "full_train.csv")
    df[is_test].to_csv(dest / "full_test.csv")
    return {"train": int((~is_test).sum()), "test": int(is_test.sum())}

"""A dataset's stored rows, and which of them a job holds out for evaluation: the one reader.

An ingested dataset's folder holds `normalized.jsonl` (its valid rows, one JSON object a line, in
file order; shapes in `formats/base.py`) and `split.json` (`{"seed", "eval_fraction",
"max_eval_rows", "train_rows", "eval_rows", "eval_lines"}`, written by `ingest.py`).

The evaluation rows are a function of the dataset's split seed and the fraction asked for: the
first `eval_size(rows, fraction)` of the row positions shuffled by the seed. So every reader (the
token report, the training run, the page) gets the same rows for the same fraction; a larger
fraction holds out a superset of a smaller one; fraction 0 holds out nothing. The dataset's own
fraction (`split.json`'s, chosen at upload) is the default; a job asks for its `eval_fraction`.
`eval_lines` records the rows the upload's fraction holds out, for people and tools to read.

Used by the web app (preview, upload) and by the worker (report, training run): plain json only.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from app import layout
from app.dataset_errors import DatasetError
from app.settings import Settings

NORMALIZED_FILENAME = layout.NORMALIZED_ROWS
SPLIT_FILENAME = layout.SPLIT
DEFAULT_EVAL_FRACTION = 0.05
MAX_EVAL_ROWS = 1000
DEFAULT_SPLIT_SEED = 42

Split = Literal["train", "eval", "all"]
SPLITS: tuple[Split, ...] = ("train", "eval", "all")


class DatasetRowsMissing(DatasetError):
    """The dataset's normalised rows are not in the data dir (deleted, or the dir was moved)."""

    code = "dataset_rows_missing"
    status_code = 404


def eval_size(valid_rows: int, fraction: float, max_rows: int = MAX_EVAL_ROWS) -> int:
    """Rows held out for evaluation: `fraction` of the rows, at least one, at most `max_rows`,
    always leaving at least one row to train on."""
    if valid_rows < 2 or fraction <= 0 or max_rows <= 0:
        return 0
    return min(max_rows, valid_rows - 1, max(1, round(valid_rows * fraction)))


def held_out_positions(
    rows: int, seed: int, fraction: float, max_rows: int = MAX_EVAL_ROWS
) -> set[int]:
    """The 0-based positions (in `normalized.jsonl`) of the rows held out for evaluation."""
    order = list(range(rows))
    random.Random(seed).shuffle(order)
    return set(order[: eval_size(rows, fraction, max_rows)])


@dataclass(frozen=True)
class SplitInfo:
    """What `split.json` records: the seed and the rows, and the upload's own fraction."""

    seed: int = DEFAULT_SPLIT_SEED
    rows: int = 0
    eval_fraction: float = DEFAULT_EVAL_FRACTION
    max_eval_rows: int = MAX_EVAL_ROWS


def dataset_folder(source: Settings | Path, dataset_id: str) -> Path:
    """The folder of a dataset: `source` is the settings or the datasets dir."""
    datasets_dir = source.datasets_dir if isinstance(source, Settings) else Path(source)
    return datasets_dir / dataset_id


def read_split(folder: Path) -> SplitInfo:
    """The dataset's split record; for a folder without one, its rows counted and the defaults."""
    path = folder / SPLIT_FILENAME
    if not path.is_file():
        return SplitInfo(rows=sum(1 for _ in read_jsonl(folder / NORMALIZED_FILENAME)))
    split = json.loads(path.read_text(encoding="utf-8"))
    return SplitInfo(
        seed=int(split.get("seed", DEFAULT_SPLIT_SEED)),
        rows=int(split.get("train_rows", 0)) + int(split.get("eval_rows", 0)),
        eval_fraction=float(split.get("eval_fraction", DEFAULT_EVAL_FRACTION)),
        max_eval_rows=int(split.get("max_eval_rows", MAX_EVAL_ROWS)),
    )


def iter_rows(
    source: Settings | Path,
    dataset_id: str,
    split: Split = "all",
    *,
    eval_fraction: float | None = None,
) -> Iterator[dict[str, Any]]:
    """The dataset's normalised rows, in file order: all of them, or those that train or are held
    out when `eval_fraction` of the rows (default: the fraction chosen at upload) is held out.

    Raises DatasetRowsMissing when the rows are not in the data dir, DatasetError for a damaged
    file."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    folder = dataset_folder(source, dataset_id)
    path = folder / NORMALIZED_FILENAME
    if not path.is_file():
        raise DatasetRowsMissing(
            "The dataset's normalised rows are missing from the data dir.",
            "Upload the dataset again; if the data dir was moved, move its datasets/ folder too.",
        )
    if split == "all":
        yield from read_jsonl(path)
        return
    info = read_split(folder)
    fraction = info.eval_fraction if eval_fraction is None else eval_fraction
    held_out = held_out_positions(info.rows, info.seed, fraction, info.max_eval_rows)
    want_held_out = split == "eval"
    for position, row in enumerate(read_jsonl(path)):
        if (position in held_out) == want_held_out:
            yield row


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a normalised JSONL file (a dataset's, or a run's copy of its split)."""
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise DatasetError(
                    f"Normalised row {number} is not valid JSON: {error}",
                    "Re-upload the dataset; the normalised file is damaged.",
                ) from error

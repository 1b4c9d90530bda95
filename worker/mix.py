"""A job of several datasets: the training rows drawn from each at its weight, the held-out rows
of each, and the record of the mix (rows and tokens per dataset) that the job page shows.

The mix is a function of the datasets, their weights, the job's `eval_fraction` and its seed, so
every attempt of a job (a resume too) trains on the same rows:

- each dataset is split as a job on it alone would split it (`app.dataset_store`);
- one pass (epoch) over the mix holds as many rows as the datasets' training splits together, and
  each dataset gives `weight / sum of weights` of them (largest remainders, so they add up);
- a dataset gives its rows in seeded shuffled passes: a share larger than its training split
  repeats its rows (whole passes first), a smaller one is a seeded sample of them;
- the drawn rows are shuffled together with the job's seed, each marked `"dataset": id`;
- the eval rows are every dataset's own held-out rows, marked the same way.

`layout.run_mix(job)` records, per dataset: its weight, its training and eval rows, the rows
drawn, and (once the recipe has tokenised them) the tokens drawn and held out.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterable, Sized
from pathlib import Path
from typing import Any, Protocol

from app.dataset_store import iter_rows
from app.layout import DataLayout
from app.train_config import DatasetShare
from worker.errors import DatasetError


class FromDataset(Sized, Protocol):
    """A tokenised example or pair: its tokens (len) and the dataset it came from."""

    dataset: str | None


def shares_of(total: int, weights: list[float]) -> list[int]:
    """`total` rows split in proportion to `weights` (largest remainders: they add up to it)."""
    whole = sum(weights)
    exact = [total * weight / whole for weight in weights]
    counts = [math.floor(value) for value in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw(rows: list[dict[str, Any]], count: int, seed: str) -> list[dict[str, Any]]:
    """`count` of `rows`: seeded shuffled passes over them, the last one cut short."""
    drawn: list[dict[str, Any]] = []
    rounds = 0
    while len(drawn) < count:
        order = list(range(len(rows)))
        random.Random(f"{seed}:{rounds}").shuffle(order)
        drawn.extend(rows[i] for i in order[: count - len(drawn)])
        rounds += 1
    return drawn


def write_mixed_rows(
    layout: DataLayout,
    shares: list[DatasetShare],
    job_id: int,
    eval_fraction: float,
    seed: int,
) -> tuple[Path, Path | None]:
    """The job's train and eval files (`layout.run_rows`) mixed from `shares`, and its mix record
    (`layout.run_mix`)."""
    train_parts, eval_parts = [], []
    for share in shares:
        marked = [
            [
                {**row, "dataset": share.id}
                for row in iter_rows(
                    layout.datasets_dir, share.id, part, eval_fraction=eval_fraction
                )
            ]
            for part in ("train", "eval")
        ]
        if not marked[0]:
            raise DatasetError(
                f"Dataset {share.id} has no row left to train on after its eval split.",
                "Lower eval_fraction, or leave this dataset out of the job.",
            )
        train_parts.append(marked[0])
        eval_parts.append(marked[1])
    counts = shares_of(sum(map(len, train_parts)), [share.weight for share in shares])
    mixed = [
        row
        for share, rows, count in zip(shares, train_parts, counts, strict=True)
        for row in draw(rows, count, f"{seed}:{share.id}")
    ]
    random.Random(seed).shuffle(mixed)
    train, evaluation = layout.run_rows(job_id)
    _write_jsonl(train, mixed)
    held_out = [row for rows in eval_parts for row in rows]
    _write_jsonl(evaluation, held_out)
    record = {
        "datasets": [
            {
                "id": share.id,
                "weight": share.weight,
                "train_rows": len(rows),
                "eval_rows": len(held),
                "drawn_rows": count,
                "drawn_tokens": None,
                "eval_tokens": None,
            }
            for share, rows, held, count in zip(
                shares, train_parts, eval_parts, counts, strict=True
            )
        ]
    }
    layout.run_mix(job_id).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return train, (evaluation if held_out else None)


def record_tokens(
    path: Path, train: Iterable[FromDataset], evaluation: Iterable[FromDataset]
) -> None:
    """Add the tokens each dataset gives the training and eval batches to the mix record."""
    drawn = Counter[str | None]()
    held_out = Counter[str | None]()
    for counter, examples in ((drawn, train), (held_out, evaluation)):
        for example in examples:
            counter[example.dataset] += len(example)
    record = json.loads(path.read_text(encoding="utf-8"))
    for entry in record["datasets"]:
        entry["drawn_tokens"] = drawn[entry["id"]]
        entry["eval_tokens"] = held_out[entry["id"]]
    path.write_text(json.dumps(record, indent=1), encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")

"""A Hub dataset as `datasets.load_dataset` leaves it in its cache after an online load, made
locally (tests cannot reach the Hub): `<cache>/<owner>___<name>/<config>/0.0.0/<hash>/` with the
split's Arrow file and `dataset_info.json`. With HF_DATASETS_OFFLINE, `load_dataset("owner/name",
config, split=...)` reads it through its real offline path (the "cache" builder)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def cache_hub_dataset(
    cache_dir: Path, hub_id: str, splits: dict[str, dict[str, list[Any]]], config: str = "default"
) -> Path:
    """Write `splits` ({"train": {"column": [values...]}}) as the cached `hub_id`; returns its folder."""
    import datasets
    from datasets.arrow_writer import ArrowWriter
    from datasets.naming import camelcase_to_snakecase

    owner, _, name = hub_id.rpartition("/")
    dataset_name = camelcase_to_snakecase(name)
    digest = hashlib.sha256(f"{hub_id}/{config}".encode()).hexdigest()[:16]
    folder = cache_dir / "___".join(filter(None, [owner, dataset_name])) / config / "0.0.0" / digest
    folder.mkdir(parents=True, exist_ok=True)
    info = datasets.DatasetInfo(config_name=config, dataset_name=dataset_name)
    info.splits = datasets.SplitDict(dataset_name=dataset_name)
    for split, columns in splits.items():
        table = datasets.Dataset.from_dict(columns)
        info.features = table.features
        writer = ArrowWriter(
            path=str(folder / f"{dataset_name}-{split}.arrow"), features=table.features
        )
        writer.write_table(table.data.table)
        rows, size = writer.finalize()
        writer.close()
        info.splits.add(
            datasets.SplitInfo(split, num_bytes=size, num_examples=rows, dataset_name=dataset_name)
        )
    info.write_to_directory(str(folder))
    return folder

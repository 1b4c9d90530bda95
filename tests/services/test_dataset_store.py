"""The one reader of a dataset's stored rows (`store.iter_rows`) and a job's eval fraction: real
uploads ingested into a real data dir, read back by the report's and the training run's paths."""

from __future__ import annotations

import json

import pytest

from app.dataset_errors import DatasetError
from app.dataset_store import DatasetRowsMissing, iter_rows
from app.services import datasets
from worker.run import dataset_files


@pytest.fixture
def dataset(db, settings, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(200)))
    return datasets.import_local_file(db, settings, path, name="rows")


def lines(rows) -> list[int]:
    return [row["line"] for row in rows]


def test_train_and_eval_split_every_row_once_at_the_fraction_chosen_at_upload(settings, dataset):
    everything = lines(iter_rows(settings, dataset.id))
    train = lines(iter_rows(settings, dataset.id, "train"))
    held_out = lines(iter_rows(settings, dataset.id, "eval"))
    assert everything == list(range(1, 201))
    assert (len(train), len(held_out)) == (190, 10) and dataset.eval_rows == 10
    assert sorted(train + held_out) == everything
    split = json.loads((settings.datasets_dir / dataset.id / "split.json").read_text())
    assert held_out == split["eval_lines"]  # the rows the upload recorded


def test_a_jobs_eval_fraction_holds_out_that_share_of_the_rows(settings, dataset):
    def held_out(fraction: float) -> set[int]:
        return set(lines(iter_rows(settings, dataset.id, "eval", eval_fraction=fraction)))

    assert len(held_out(0.2)) == 40
    assert len(held_out(0.5)) == 100
    assert held_out(0) == set()
    assert held_out(0.05) <= held_out(0.2) <= held_out(0.5)  # a larger share keeps the smaller
    assert held_out(0.2) == held_out(0.2)  # the same rows every time: the split seed decides
    train = set(lines(iter_rows(settings, dataset.id, "train", eval_fraction=0.2)))
    assert len(train) == 160 and not train & held_out(0.2)


def test_the_training_run_holds_out_the_jobs_eval_fraction(settings, dataset, tmp_path):
    settings.layout.run_dir(1).mkdir(parents=True)
    train_path, eval_path = dataset_files(settings.layout, dataset.id, 1, 0.2)
    assert eval_path is not None
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    held_out = [json.loads(line) for line in eval_path.read_text().splitlines()]
    assert (len(train), len(held_out)) == (160, 40)
    assert held_out == list(iter_rows(settings, dataset.id, "eval", eval_fraction=0.2))

    train_path, eval_path = dataset_files(settings.layout, dataset.id, 1, 0.0)
    assert eval_path is None
    assert len(train_path.read_text().splitlines()) == 200


def test_another_split_seed_holds_out_other_rows(db, settings, dataset, tmp_path):
    path = tmp_path / "rows.jsonl"
    other = datasets.create_dataset(
        db, settings, upload_path=_copy(path, settings), size_bytes=1, filename="rows.jsonl"
    )
    same = lines(iter_rows(settings, other.id, "eval", eval_fraction=0.2))
    assert same == lines(iter_rows(settings, dataset.id, "eval", eval_fraction=0.2))
    split = settings.datasets_dir / other.id / "split.json"
    split.write_text(json.dumps({**json.loads(split.read_text()), "seed": 7}))
    assert lines(iter_rows(settings, other.id, "eval", eval_fraction=0.2)) != same


def test_missing_or_damaged_rows_are_a_dataset_error_with_a_hint(settings, dataset):
    normalized = settings.datasets_dir / dataset.id / "normalized.jsonl"
    normalized.write_text(normalized.read_text() + "{broken\n")
    with pytest.raises(DatasetError) as caught:
        list(iter_rows(settings, dataset.id))
    assert "row 201 is not valid JSON" in caught.value.message and caught.value.hint
    normalized.unlink()
    with pytest.raises(DatasetRowsMissing) as missing:
        list(iter_rows(settings, dataset.id, "train"))
    assert missing.value.kind == "dataset" and "Upload the dataset again" in missing.value.hint


def _copy(path, settings):
    temporary = settings.tmp_dir / "upload-copy.part"
    temporary.write_bytes(path.read_bytes())
    return temporary

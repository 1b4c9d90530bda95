"""A job of several datasets (worker/mix.py): the training rows follow the weights, the eval rows
are each dataset's own held-out rows, and a real job trains on the mix (the real worker loop and
training child, the demo model on the CPU) and records rows and tokens per dataset."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from app.dataset_store import iter_rows
from app.db import Database
from app.migrate import upgrade
from app.models import JobStatus
from app.train_config import DatasetShare
from tests.fakes.real_workers import RealWorkers, add_dataset, add_demo, real_job
from tests.fakes.real_workers import short_lease_settings as lease_settings
from tests.worker.test_loop import finished, wait_for
from worker.mix import shares_of, write_mixed_rows

SMALL, LARGE = "a" * 32, "b" * 32


def _chats(count: int, tag: str) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"{tag} question {n}"},
                {"role": "assistant", "content": f"{tag} answer {n}"},
            ]
        }
        for n in range(count)
    ]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def two_datasets(tmp_path):
    settings = lease_settings(tmp_path / "data")
    upgrade(settings.resolved_database_url)
    database = Database(settings.resolved_database_url)
    add_dataset(database, settings, SMALL, "small", _chats(20, "small"))
    add_dataset(database, settings, LARGE, "large", _chats(100, "large"))
    yield settings, database
    database.dispose()


def test_shares_follow_the_weights_and_add_up():
    assert shares_of(120, [3.0, 1.0]) == [90, 30]
    assert shares_of(10, [1.0, 1.0, 1.0]) == [4, 3, 3]
    assert sum(shares_of(7, [0.5, 2.5, 1.0])) == 7


def test_mixed_rows_follow_the_ratio_and_the_eval_split_comes_from_each(two_datasets):
    settings, _ = two_datasets
    layout = settings.layout
    layout.run_dir(1).mkdir(parents=True)
    shares = [DatasetShare(id=SMALL, weight=3), DatasetShare(id=LARGE, weight=1)]
    train, evaluation = write_mixed_rows(layout, shares, 1, eval_fraction=0.1, seed=7)
    rows = _read(train)
    # 18 + 90 training rows in all (2 and 10 held out), drawn 3 : 1.
    assert len(rows) == 108
    assert Counter(row["dataset"] for row in rows) == {SMALL: 81, LARGE: 27}
    # The small dataset's 18 rows repeat in whole passes: each 4 or 5 times; the large one's 27
    # are distinct rows of its training split.
    small = Counter(row["line"] for row in rows if row["dataset"] == SMALL)
    assert len(small) == 18 and set(small.values()) == {4, 5}
    large_train = {
        row["line"] for row in iter_rows(layout.datasets_dir, LARGE, "train", eval_fraction=0.1)
    }
    large = [row["line"] for row in rows if row["dataset"] == LARGE]
    assert len(set(large)) == 27 and set(large) <= large_train
    # A row keeps its own content: the small dataset's rows are the small dataset's.
    assert all(
        row["messages"][0]["content"].startswith("small") for row in rows if row["dataset"] == SMALL
    )
    # Eval: every dataset's own held-out rows, as a job on that dataset alone holds out.
    assert evaluation is not None
    held_out = _read(evaluation)
    for dataset_id in (SMALL, LARGE):
        expected = list(iter_rows(layout.datasets_dir, dataset_id, "eval", eval_fraction=0.1))
        assert [
            {k: v for k, v in row.items() if k != "dataset"}
            for row in held_out
            if row["dataset"] == dataset_id
        ] == expected
    assert Counter(row["dataset"] for row in held_out) == {SMALL: 2, LARGE: 10}
    # The record the job page reads.
    record = json.loads(layout.run_mix(1).read_text())
    assert [
        (d["id"], d["drawn_rows"], d["train_rows"], d["eval_rows"]) for d in record["datasets"]
    ] == [
        (SMALL, 81, 18, 2),
        (LARGE, 27, 90, 10),
    ]
    # Deterministic: the same job draws the same rows again (a resumed attempt trains on them).
    write_mixed_rows(layout, shares, 1, eval_fraction=0.1, seed=7)
    assert _read(train) == rows
    write_mixed_rows(layout, shares, 1, eval_fraction=0.1, seed=8)
    assert _read(train) != rows


@pytest.mark.slow
def test_a_job_trains_on_two_datasets_at_a_set_ratio(tmp_path, demo_build):
    """The real worker loop and training child: a job of the demo dataset and a second SFT
    dataset at 1 : 3 succeeds, its train file follows the ratio, and the mix record has the rows
    and the tokens each dataset gave."""
    settings = lease_settings(tmp_path / "data")
    upgrade(settings.resolved_database_url)
    database = Database(settings.resolved_database_url)
    demo = add_demo(database, settings, demo_build)
    other = add_dataset(database, settings, LARGE, "capitals", _chats(12, "capital"))
    job = real_job(
        database,
        demo,
        datasets=[{"id": demo, "weight": 1}, {"id": other, "weight": 3}],
        max_steps=3,
        max_seq_len=128,
        eval_fraction=0.2,
        eval_every=3,
    )
    workers = RealWorkers(settings, tmp_path)
    try:
        workers.start()
        done = wait_for(lambda: finished(database, job.id), timeout=300, what="the mixed job")
    finally:
        workers.stop_all()
    assert done.status == JobStatus.succeeded, (done.error_kind, done.error_message)
    train, evaluation = settings.layout.run_rows(job.id)
    drawn = Counter(row["dataset"] for row in _read(train))
    total = sum(drawn.values())
    assert [drawn[demo], drawn[other]] == shares_of(total, [1.0, 3.0])
    assert {row["dataset"] for row in _read(evaluation)} == {demo, other}
    record = json.loads(settings.layout.run_mix(job.id).read_text())
    by_id = {entry["id"]: entry for entry in record["datasets"]}
    assert by_id[other]["drawn_rows"] == drawn[other]
    assert by_id[demo]["drawn_tokens"] > 0 and by_id[other]["drawn_tokens"] > 0
    assert by_id[demo]["eval_tokens"] > 0 and by_id[other]["eval_tokens"] > 0
    database.dispose()

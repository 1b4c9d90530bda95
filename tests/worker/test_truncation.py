"""Rows longer than max_seq_len: training does exactly what the dataset report said it would.

The report (worker/dataset_report.py) counts, for the train split at a max length, how many rows
are cut, how many are dropped and how many tokens are left; the recipe (worker/recipes/sft.py, via
worker/run.py's split files) must build exactly those examples, cut where TRUNCATION_RULE says.
"""

from __future__ import annotations

import pytest

from app.services import datasets, model_registry
from app.services.datasets import reports as dataset_reports
from app.train_config import TrainConfig
from worker.data import IGNORE_INDEX, read_rows, tokenize_row
from worker.dataset_report import TRUNCATION_RULE, run_pending_reports
from worker.metrics import ListSink
from worker.recipes.sft import LocalControl, SFTRecipe
from worker.run import dataset_files

# The shortest max length a job accepts: on the demo data it cuts most rows and leaves about a
# third with nothing to train (a long system prompt and question fill it before the answer).
MAX_LEN = 32


@pytest.fixture
def demo_model(db, settings, demo_build):
    return model_registry.register_model(
        db, settings, str(demo_build["model_dir"]), "demo-tiny-llama"
    )


def test_training_cuts_and_drops_exactly_the_rows_the_report_said(
    db, settings, demo_model, demo_build, tmp_path
):
    assert "cut at the end" in TRUNCATION_RULE and "dropped" in TRUNCATION_RULE
    dataset = datasets.import_local_file(db, settings, demo_build["dataset"], name="demo")
    dataset_reports.request_report(db, dataset, base_model=demo_model.name, max_seq_len=MAX_LEN)
    run_pending_reports(settings)
    report = dataset_reports.latest_done_report(db, dataset.id).result
    over = report["over_max"]
    assert report["truncation_rule"] == TRUNCATION_RULE
    assert over["truncated"] > 0 and over["dropped"] > 0  # both branches are exercised

    # The recipe's data preparation, on the split files the worker child writes for a job.
    config = TrainConfig(dataset_id=dataset.id, max_seq_len=MAX_LEN, eval_fraction=0.05)
    run_dir = settings.layout.run_dir(1)
    run_dir.mkdir(parents=True)
    rows_path, eval_path = dataset_files(settings.layout, dataset.id, 1, 0.05)
    control = LocalControl()
    recipe = SFTRecipe(
        config,
        demo_build["model_dir"],
        run_dir,
        ListSink(),
        control,
        rows_path=rows_path,
        eval_rows_path=eval_path,
    )
    recipe.tokenizer = recipe._load_tokenizer()
    recipe._prepare_data()
    examples = recipe.train_examples
    assert examples is not None

    # The report's numbers are the recipe's numbers.
    assert len(examples) == report["examples_per_epoch"]
    assert sum(e.truncated for e in examples) == over["truncated"]
    assert sum(len(e) for e in examples) == report["tokens_per_epoch"]
    assert sum(e.trained_tokens for e in examples) == report["trained_tokens_per_epoch"]
    dropped_total = over["dropped"] + report["no_trained_tokens"]["rows"]
    assert report["no_trained_tokens"]["rows"] == 0  # every demo row trains when uncut
    assert control.fields["notice"] == (
        f"{over['truncated']} rows longer than {MAX_LEN} tokens were cut to fit; "
        f"{dropped_total} rows were left out: no reply token was left to train on after the cut."
    )

    # "Cut at the end": a cut row is the first MAX_LEN tokens of the whole row, labels included;
    # the dropped rows are exactly the ones with no trained token left in those MAX_LEN tokens.
    by_line = {e.line: e for e in examples}
    dropped = 0
    for row in read_rows(rows_path):
        whole = tokenize_row(recipe.tokenizer, row, "assistant", 10**9)
        assert whole is not None
        kept = by_line.get(row["line"])
        if kept is None:
            dropped += 1
            assert len(whole) > MAX_LEN
            assert all(label == IGNORE_INDEX for label in whole.labels[1:MAX_LEN])
            continue
        assert kept.truncated == (len(whole) > MAX_LEN)
        assert kept.input_ids == whole.input_ids[:MAX_LEN]
        assert kept.labels == whole.labels[:MAX_LEN]
    assert dropped == over["dropped"]

    # Nothing longer than max_seq_len reaches a packed micro-batch.
    budget = config.micro_batch_size * MAX_LEN
    assert all(sum(map(len, batch)) <= budget for batch in recipe.train_batches)
    assert all(len(e) <= MAX_LEN for batch in recipe.train_batches for e in batch)

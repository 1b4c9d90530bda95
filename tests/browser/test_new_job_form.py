"""The New job form in a real browser: presets change the hyperparameters only, and the demo
model with the demo dataset picks the "demo" preset however the user gets there."""

from __future__ import annotations

import pytest

from app import queue
from app.models import Dataset, DatasetStatus
from app.settings import Settings
from app.train_config import PRESETS, TrainConfig
from tests.fakes.jobs import MODEL, add_dataset, add_preference_dataset

pytestmark = pytest.mark.browser


def value(page, name: str) -> str:
    return page.input_value(f"form.job-form [name={name}]")


def active_preset(page) -> list[str]:
    return [b.inner_text() for b in page.query_selector_all("a[data-preset].primary")]


def test_presets_keep_the_chosen_dataset_and_the_demo_pair_picks_demo(live_server, server_db, page):
    settings = Settings(data_dir=live_server.data_dir, database_url="")
    with server_db.write() as s:
        s.add(Dataset(id="d" * 32, name="demo-chat", status=DatasetStatus.ready, is_demo=True))
    mine = add_dataset(server_db, settings)  # registers the demo model too
    demo_steps = str(PRESETS["demo"]["max_steps"])

    # Straight to the form: the demo model and the demo dataset (listed first) start on "demo".
    page.goto(live_server.url + "/jobs/new")
    assert value(page, "base_model") == MODEL and value(page, "dataset_id") == "d" * 32
    assert active_preset(page) == ["demo"] and value(page, "max_steps") == demo_steps

    # Another dataset: the demo's hyperparameters would not suit it, so back to "balanced".
    page.select_option("form.job-form [name=dataset_id]", mine)
    assert active_preset(page) == ["balanced"] and value(page, "max_steps") == ""
    assert float(value(page, "learning_rate")) == TrainConfig.model_fields["learning_rate"].default

    # A preset sets its hyperparameters and keeps the dataset and the name the user chose.
    page.fill("form.job-form [name=name]", "my run")
    page.click("a[data-preset='quick test']")
    assert active_preset(page) == ["quick test"]
    assert value(page, "max_steps") == str(PRESETS["quick test"]["max_steps"])
    assert value(page, "dataset_id") == mine and value(page, "name") == "my run"

    # Choosing the demo dataset again picks "demo".
    page.select_option("form.job-form [name=dataset_id]", "d" * 32)
    assert active_preset(page) == ["demo"] and value(page, "max_steps") == demo_steps

    page.select_option("form.job-form [name=dataset_id]", mine)
    page.click("a[data-preset='quick test']")
    page.click("form.job-form button[type=submit]")
    page.wait_for_url("**/jobs/*")
    (job,) = queue.list_jobs(server_db)
    assert (job.dataset_id, job.name, job.config["max_steps"]) == (mine, "my run", 30)
    assert page.js_errors == []


def test_choosing_dpo_shows_its_settings_and_queues_a_dpo_job(live_server, server_db, page):
    settings = Settings(data_dir=live_server.data_dir, database_url="")
    dataset = add_preference_dataset(server_db, settings)
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.post_data or "") if r.method == "POST" else None)
    page.goto(live_server.url + "/jobs/new")
    assert page.is_visible("form.job-form [name=train_on]")
    assert not page.is_visible("form.job-form [name=beta]")

    page.select_option("form.job-form [name=method]", "dpo")
    assert page.is_visible("form.job-form [name=beta]") and value(page, "beta") == "0.1"
    assert (
        page.is_visible("form.job-form [name=loss_type]") and value(page, "loss_type") == "sigmoid"
    )
    assert not page.is_visible("form.job-form [name=train_on]")
    page.select_option("form.job-form [name=dataset_id]", dataset)
    page.click("form.job-form button[type=submit]")
    page.wait_for_url("**/jobs/*")

    (job,) = queue.list_jobs(server_db)
    assert (job.config["method"], job.config["beta"], job.config["loss_type"]) == (
        "dpo",
        0.1,
        "sigmoid",
    )
    (body,) = sent
    assert "method=dpo" in body and "beta=0.1" in body and "train_on" not in body
    assert page.text_content("#job-header h1 .method-tag") == "DPO"

    # Back to sft: DPO's settings go away again, and are not sent.
    page.goto(live_server.url + "/jobs/new")
    page.select_option("form.job-form [name=method]", "dpo")
    page.select_option("form.job-form [name=method]", "sft")
    assert not page.is_visible("form.job-form [name=beta]")
    assert page.is_visible("form.job-form [name=train_on]")
    assert page.js_errors == []


def test_add_a_dataset_mixes_several_datasets_at_their_weights(live_server, server_db, page):
    settings = Settings(data_dir=live_server.data_dir, database_url="")
    first, second, third = (add_dataset(server_db, settings) for _ in range(3))

    page.goto(live_server.url + "/jobs/new")
    page.select_option("form.job-form [name=dataset_id]", first)
    page.fill("form.job-form [name=dataset_weight]", "2")
    # One blank row is there; "Add a dataset" adds another, blank, at weight 1.
    assert page.locator(".dataset-mix .mix-row").count() == 1
    page.select_option("form.job-form [name='datasets-1-id']", second)
    page.click("button.add-dataset")
    assert page.locator(".dataset-mix .mix-row").count() == 2
    assert value(page, "'datasets-2-id'") == "" and value(page, "'datasets-2-weight'") == "1"
    page.select_option("form.job-form [name='datasets-2-id']", third)
    page.fill("form.job-form [name='datasets-2-weight']", "0.5")
    page.click("form.job-form button[type=submit]")
    page.wait_for_url("**/jobs/*")

    (job,) = queue.list_jobs(server_db)
    assert job.config["datasets"] == [
        {"id": first, "weight": 2.0},
        {"id": second, "weight": 1.0},
        {"id": third, "weight": 0.5},
    ]
    # The job page lists the mix with each dataset's share.
    shares = page.locator("section.dataset-mix tbody tr td:nth-child(3)").all_inner_texts()
    assert shares == ["57%", "29%", "14%"]
    assert page.js_errors == []

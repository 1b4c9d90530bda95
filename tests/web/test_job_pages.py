"""Jobs list, job page, compare page and system page, rendered by the real app over a real SQLite file."""

from __future__ import annotations

import importlib.util
import json

import pytest
from bs4 import BeautifulSoup

from app import queue
from app.models import Adapter, JobStatus, Worker
from devkit.simulated_run import finish, metric_row, resume, start_running_job, write_metrics

HTML = {"accept": "text/html"}


def page(client, url: str) -> BeautifulSoup:
    response = client.get(url, headers=HTML)
    assert response.status_code == 200, response.text[:500]
    return BeautifulSoup(response.text, "html.parser")


def test_jobs_list_shows_progress_eta_and_a_loss_sparkline(client, db):
    claim = start_running_job(db, total=500)
    write_metrics(db, claim, 1, 30, interval=0.01)
    soup = page(client, "/jobs")
    row = soup.select_one(f"#job-{claim.job_id}")
    assert row.select_one("progress")["value"] == "30"
    assert "ETA" in row.select_one(".eta").text and "estimating" not in row.select_one(".eta").text
    assert row.select_one("canvas.sparkline")["data-values"].startswith("[")
    assert row.select_one('input[type=checkbox][name=ids][form="compare-form"]')
    assert soup.select_one("form#compare-form[action='/jobs/compare']")


def test_job_page_shows_run_facts_and_one_live_stream_that_carries_the_history(client, db):
    claim = start_running_job(db, total=200)
    write_metrics(db, claim, 1, 12)
    soup = page(client, f"/jobs/{claim.job_id}")
    connect = soup.select_one("[sse-connect]")
    # No ?after=: the charts read the rows so far from the stream too (no separate fetch).
    assert connect["sse-connect"] == f"/api/jobs/{claim.job_id}/events"
    assert connect["sse-close"] == "done"
    assert soup.select_one("[hx-trigger='sse:status']")
    charts = soup.select(".chart[data-chart]")
    assert {c["data-events-url"] for c in charts} == {connect["sse-connect"]}
    header = soup.select_one("#job-header").text
    assert "step 12 / 200" in " ".join(header.split())
    assert "no checkpointing: the batch fits in 30% of the card" in header
    assert soup.select_one("#job-header button.danger").text == "Cancel"


def test_finished_job_page_links_the_adapter_and_opens_no_stream(client, db):
    claim = start_running_job(db)
    write_metrics(db, claim, 1, 3)
    finish(db, claim)
    with db.write() as s:
        s.add(
            Adapter(
                id=f"job-{claim.job_id}", job_id=claim.job_id, name="my-adapter", base_model="m"
            )
        )
    soup = page(client, f"/jobs/{claim.job_id}")
    assert soup.select_one("[sse-connect]") is None
    link = soup.select_one("a.adapter-link")
    assert link["href"] == f"/playground?adapter=job-{claim.job_id}"
    assert "Retry from last checkpoint" in soup.select_one("#job-header").text


def test_the_adapters_page_in_the_nav_lists_each_adapter_with_its_export_link(client, db):
    claim = start_running_job(db)
    finish(db, claim)
    with db.write() as s:
        s.add(
            Adapter(
                id=f"job-{claim.job_id}", job_id=claim.job_id, name="my-adapter", base_model="m"
            )
        )
    soup = page(client, "/jobs")
    assert soup.select_one("nav.nav a[href='/adapters']").text == "Adapters"
    soup = page(client, "/adapters")
    row = soup.select_one(f"#adapter-job-{claim.job_id}")
    assert "my-adapter" in row.text
    export = row.select_one("a.export-link")
    assert export["href"] == f"/adapters/job-{claim.job_id}"


def chart_titles(soup: BeautifulSoup) -> dict[str, str]:
    return {c["data-chart"]: c.find_previous("h2").text for c in soup.select(".chart[data-chart]")}


def test_a_cpu_jobs_page_charts_the_process_memory_in_place_of_the_empty_vram_chart(client, db):
    cpu = start_running_job(db, "on the cpu")  # compute mode "fp32 LoRA on CPU (simulated)"
    no_vram = {"vram_allocated_mib": None, "vram_reserved_mib": None}
    no_card = {"device_used_mib": None, "device_total_mib": None}
    rows = [metric_row(step) | no_vram | no_card | {"rss_mib": 900.0} for step in (1, 2)]
    assert queue.record_metrics(db, cpu.job_id, cpu.attempt, rows)
    titles = chart_titles(page(client, f"/jobs/{cpu.job_id}"))
    assert "vram" not in titles
    assert titles["rss"] == "Process memory (RSS, GiB)"
    soup = page(client, f"/jobs/{cpu.job_id}")
    spec = json.loads(soup.select_one(".chart[data-chart=rss]")["data-series"])
    assert [s["column"] for s in spec["series"]] == ["rss_mib"]
    metrics = client.get(f"/api/jobs/{cpu.job_id}/metrics").json()["metrics"]
    assert [m["rss_mib"] for m in metrics] == [900.0, 900.0]

    finish(db, cpu)
    gpu = start_running_job(db, "on a card")
    write_metrics(db, gpu, 1, 2)  # rows that read VRAM
    titles = chart_titles(page(client, f"/jobs/{gpu.job_id}"))
    assert titles["vram"] == "VRAM (GiB)" and "rss" not in titles


# A CPU demo run's log, as the training child wrote it: library warnings among our lines.
NOISY_LOG = """\
Loading demo-tiny-llama (fp32 LoRA on CPU)
/venv/lib/python3.12/site-packages/bitsandbytes/backends/__init__.py:12: UserWarning: kernels-community/bitsandbytes: could not verify publisher trust status
  warnings.warn(
/venv/lib/python3.12/site-packages/transformers/training_args.py:1611: FutureWarning: `evaluation_strategy` is deprecated and will be removed in version 4.46 of Transformers. Use `eval_strategy` instead
  warnings.warn(
Backend impl liger_kernel.ops.backends._ascend could not be imported: No module named 'torch_npu'
{'loss': 2.31, 'grad_norm': 1.2, 'learning_rate': 0.0002, 'epoch': 0.1}
/venv/lib/python3.12/site-packages/torch/utils/checkpoint.py:91: UserWarning: None of the inputs have requires_grad=True. Gradients will be None
  warnings.warn(
Saved the adapter to runs/job-1/adapter
"""


def test_the_job_log_on_the_page_hides_library_noise_and_the_file_keeps_it(client, db, settings):
    claim = start_running_job(db)
    log = settings.layout.attempt_log(claim.job_id, claim.attempt)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(NOISY_LOG)
    for url in (f"/jobs/{claim.job_id}", f"/partials/jobs/{claim.job_id}/log"):
        shown = page(client, url).select_one("pre.log").text
        assert "Loading demo-tiny-llama" in shown and "Saved the adapter" in shown
        assert "'loss': 2.31" in shown
        # A warning that can mean something about the user's run stays.
        assert "None of the inputs have requires_grad=True" in shown
        assert "publisher trust status" not in shown
        assert "FutureWarning" not in shown and "evaluation_strategy" not in shown
        assert "could not be imported" not in shown
        assert shown.count("warnings.warn(") == 1
    assert log.read_text() == NOISY_LOG


def test_failed_job_header_shows_the_error_with_its_hint(client, db):
    claim = start_running_job(db)
    queue.finish(
        db,
        claim.job_id,
        claim.attempt,
        JobStatus.failed,
        error_kind="oom",
        error_message="CUDA out of memory at step 3",
        error_hint="Halve the micro-batch.",
    )
    soup = page(client, f"/partials/jobs/{claim.job_id}/header")
    assert soup.select_one(".error-message").text == "CUDA out of memory at step 3"
    assert soup.select_one(".error-hint").text == "Halve the micro-batch."


def test_compare_overlays_jobs_and_highlights_differing_settings(client, db):
    a = start_running_job(db, "run a", learning_rate=2e-4)
    write_metrics(db, a, 1, 30)
    finish(db, a)
    b = start_running_job(db, "run b", learning_rate=1e-4)
    write_metrics(db, b, 1, 20)
    finish(db, b)
    body = client.get(f"/api/jobs/compare?ids={a.job_id},{b.job_id}").json()
    assert [j["name"] for j in body["jobs"]] == ["run a", "run b"]
    assert body["jobs"][0]["metrics"]["step"] == list(range(1, 31))
    assert body["jobs"][0]["metrics"]["eval_loss"][24] is not None  # step 25 is an eval step

    soup = page(client, f"/jobs/compare?ids={a.job_id}&ids={b.job_id}")
    assert len(soup.select(".chart[data-chart=compare]")) == 2
    differing = {tr.th.text for tr in soup.select(".compare-config tr.differs")}
    assert {"name", "learning_rate", "dataset_id"} <= differing
    assert "lora_r" not in differing


def test_compare_with_a_bad_id_is_a_422(client):
    response = client.get("/api/jobs/compare?ids=1,x")
    assert response.status_code == 422
    assert "ids must be a whole number" in response.json()["error"]["message"]


def test_system_page_shows_each_workers_gpu_readings(client, db):
    with db.write() as s:
        s.add(
            Worker(
                id="w1",
                host="box",
                pid=42,
                gpus="0",
                gpu_name="NVIDIA H200",
                vram_total_mib=143771,
                vram_used_mib=5120,
                gpu_utilization=97,
                gpu_temperature=61,
                current_job_id=3,
            )
        )
    text = " ".join(page(client, "/system").text.split())
    for fact in ("NVIDIA H200", "5120 / 143771 MiB", "97 %", "61 °C", "job 3", "s ago", "free of"):
        assert fact in text


def test_new_job_page_starts_from_the_demo_preset_for_the_demo_model_and_dataset(client, db):
    from app.models import Dataset, DatasetStatus
    from app.train_config import PRESETS

    with db.write() as s:
        s.add(Dataset(id="d" * 32, name="demo-chat", status=DatasetStatus.ready, is_demo=True))
        s.add(Dataset(id="e" * 32, name="mine", status=DatasetStatus.ready))

    def form_value(soup: BeautifulSoup, name: str) -> str:
        return soup.find("input", attrs={"name": name})["value"]

    demo = page(client, f"/jobs/new?dataset_id={'d' * 32}")
    assert demo.find("a", class_="primary", string="demo") is not None
    assert form_value(demo, "max_steps") == str(PRESETS["demo"]["max_steps"])
    assert float(form_value(demo, "learning_rate")) == PRESETS["demo"]["learning_rate"]
    # The preset buttons keep the chosen dataset, so "quick test" is one click away.
    quick = demo.find("a", string="quick test")["href"]
    assert f"dataset_id={'d' * 32}" in quick and "preset=quick+test" in quick
    assert form_value(page(client, quick), "max_steps") == str(PRESETS["quick test"]["max_steps"])

    mine = page(client, f"/jobs/new?dataset_id={'e' * 32}")
    assert mine.find("a", class_="primary", string="demo") is None
    assert form_value(mine, "max_steps") == ""
    other_model = page(client, f"/jobs/new?dataset_id={'d' * 32}&base_model=other-model")
    assert other_model.find("a", class_="primary", string="demo") is None


def test_a_tracker_that_is_not_installed_is_neither_offered_nor_accepted(
    client, db, settings, tmp_path, monkeypatch
):
    from tests.fakes.jobs import add_dataset

    dataset_id = add_dataset(db, settings)
    for tracker in ("tensorboard", "wandb", "mlflow"):
        if importlib.util.find_spec(tracker) is not None:
            pytest.skip(f"{tracker} is installed here")
    offered = page(client, "/jobs/new").select("select[name=report_to] option")
    assert [o["value"] for o in offered] == ["none"]

    response = client.post("/api/jobs", json={"dataset_id": dataset_id, "report_to": "tensorboard"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert "tensorboard is not installed" in error["message"]
    assert "pip install 'tuneboard[trackers]'" in error["hint"]
    assert queue.list_jobs(db) == []

    # Installed (a package on the path is all find_spec looks for): offered and accepted.
    (tmp_path / "site" / "tensorboard").mkdir(parents=True)
    (tmp_path / "site" / "tensorboard" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    offered = page(client, "/jobs/new").select("select[name=report_to] option")
    assert [o["value"] for o in offered] == ["none", "tensorboard"]
    response = client.post("/api/jobs", json={"dataset_id": dataset_id, "report_to": "tensorboard"})
    assert response.status_code == 201, response.text


def test_run_card_shows_duration_final_losses_tokens_and_what_ran(client, db):
    from devkit.simulated_run import metric_row

    claim = start_running_job(db, total=60)
    write_metrics(db, claim, 1, 60)  # eval rows at steps 25 and 50
    start = "claim to first step 9.1 s: tokenisation 0.2 s, model load 4.0 s, first step 1.2 s"
    queue.update_progress(
        db,
        claim.job_id,
        claim.attempt,
        compute_mode="fp32 LoRA on the CPU (no CUDA device)",
        start_timing=start,
    )
    finish(db, claim)
    soup = page(client, f"/jobs/{claim.job_id}")
    assert soup.select_one(".start-timing").text == start
    run = " ".join(soup.select_one(".run-duration").text.split())
    assert run.endswith("s") and "not started" not in run
    assert soup.select_one(".run-loss").text == f"{metric_row(60)['loss']:.4f}"
    assert soup.select_one(".run-eval-loss").text == f"{metric_row(50)['eval_loss']:.4f}"
    assert soup.select_one(".run-tokens").text == f"{60 * metric_row(1)['tokens']:,}"
    # The job asked for nf4 (the default); the page says the CPU run did not use it.
    note = soup.select_one(".quantization-ran").text
    assert "not used: fp32 LoRA on the CPU" in note


def test_a_resumed_jobs_pages_count_the_steps_it_trained_again_once(client, db):
    """Attempt 1 logs steps 1..55 and dies; attempt 2 resumes from step 40 and logs 41..60."""
    claim = start_running_job(db, "resumed", total=60)
    write_metrics(db, claim, 1, 55)
    again = resume(db, claim)
    write_metrics(db, again, 41, 20, seed=1.0)
    finish(db, again)
    tokens = metric_row(1)["tokens"]
    soup = page(client, f"/jobs/{claim.job_id}")
    assert soup.select_one(".run-tokens").text == f"{60 * tokens:,}"
    again_note = " ".join(soup.select_one(".run-tokens-again").text.split())
    assert again_note == f"(and {15 * tokens:,} trained again after a resume)"
    assert "(attempt 2 only)" in soup.select_one(".run-duration").text
    assert soup.select_one(".run-loss").text == f"{metric_row(60, seed=1.0)['loss']:.4f}"
    row = page(client, "/jobs").select_one(f"#job-{claim.job_id}")
    losses = json.loads(row.select_one("canvas.sparkline")["data-values"])
    assert losses[40:] == [round(metric_row(s, seed=1.0)["loss"], 4) for s in range(41, 61)]
    compared = client.get(f"/api/jobs/compare?ids={claim.job_id}").json()["jobs"][0]
    assert compared["metrics"]["step"] == list(range(1, 61))
    # The metrics API is the log of every attempt: each row says which one wrote it.
    rows = client.get(f"/api/jobs/{claim.job_id}/metrics").json()["metrics"]
    assert [(r["attempt"], r["step"]) for r in rows][54:57] == [(1, 55), (2, 41), (2, 42)]


def test_a_job_that_reports_to_tensorboard_names_its_event_folder_and_the_command(
    client, db, settings
):
    from tests.fakes.jobs import add_job

    job = add_job(db, settings, report_to="tensorboard")
    folder = settings.layout.tensorboard_dir(job.id).resolve()
    logs = page(client, f"/jobs/{job.id}").select_one(".tensorboard-logs")
    assert "No event files yet" in logs.text
    assert logs.select_one("pre code").text == f"tensorboard --logdir {folder}"

    folder.mkdir(parents=True)
    (folder / "events.out.tfevents.1733472000.host.1.0").write_bytes(b"\0" * 16)
    logs = page(client, f"/jobs/{job.id}").select_one(".tensorboard-logs")
    assert " ".join(logs.p.text.split()).startswith(f"1 event file in {folder}.")

    plain = add_job(db, settings, name="no tracker")
    assert page(client, f"/jobs/{plain.id}").select_one(".tensorboard-logs") is None


def test_system_page_says_cpu_only_for_a_worker_that_found_no_gpu(client, db):
    with db.write() as s:
        s.add(Worker(id="w1", host="laptop", pid=42, gpus="0", gpu_name=None))
    text = " ".join(page(client, "/system").text.split())
    assert "CPU only (no GPU 0 found)" in text and "GPU 0:" not in text


def test_every_page_names_a_favicon_that_is_served(client):
    icon = page(client, "/jobs").select_one("link[rel=icon]")["href"]
    response = client.get(icon)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("image/svg+xml")


def test_a_setting_of_another_training_method_is_refused_not_ignored(client, db, settings):
    from tests.fakes.jobs import add_dataset

    dataset_id = add_dataset(db, settings)
    for body, field, says in [
        ({"beta": 0.5}, "beta", "beta is a setting of dpo and orpo, not of sft"),
        ({"method": "orpo", "loss_type": "ipo"}, "loss_type", "loss_type is a setting of dpo"),
        ({"method": "dpo", "train_on": "all"}, "train_on", "train_on is a setting of sft"),
        ({"method": "orpo", "long_text": "cut"}, "long_text", "long_text is a setting of sft"),
        ({"method": "kto"}, "method", "Input should be 'sft', 'dpo' or 'orpo'"),
        ({"method": {}}, "method", "Input should be 'sft', 'dpo' or 'orpo'"),  # found by fuzzing
        ({"method": "dpo", "gpus": 2}, "gpus", "dpo trains on one GPU for now"),
        ({"method": ["dpo"]}, "method", "Input should be 'sft', 'dpo' or 'orpo'"),
    ]:
        response = client.post("/api/jobs", json={"dataset_id": dataset_id, **body})
        assert response.status_code == 422, (body, response.text)
        assert says in response.text and field in response.text, (body, response.text)
    assert queue.list_jobs(db) == []


def test_a_dpo_job_page_charts_its_rewards_and_an_sft_job_page_does_not(client, db):
    from app.services.job_views import PREFERENCE_COLUMNS

    dpo = start_running_job(db, "dpo run", method="dpo")
    write_metrics(db, dpo, 1, 30, preference=True)
    sft = start_running_job(db, "sft run")
    write_metrics(db, sft, 1, 30)

    charts = {c["data-chart"] for c in page(client, f"/jobs/{dpo.job_id}").select(".chart")}
    assert {"loss", "vram", "tokens_per_second"} <= charts
    assert {"reward_margin", "rewards", "reward_accuracy"} <= charts
    charts = {c["data-chart"] for c in page(client, f"/jobs/{sft.job_id}").select(".chart")}
    assert "loss" in charts and not charts & {"reward_margin", "rewards", "reward_accuracy"}

    # The API serves the rewards in the rows, eval ones on eval steps only.
    rows = client.get(f"/api/jobs/{dpo.job_id}/metrics").json()["metrics"]
    assert rows[24]["reward_margin"] == pytest.approx(0.875)
    assert rows[24]["eval_reward_accuracy"] is not None and rows[23]["eval_reward_margin"] is None
    assert set(PREFERENCE_COLUMNS) <= set(rows[0])


def test_every_chart_draws_columns_of_the_metric_rows():
    from app.models import metric_columns
    from app.services.job_views import CHARTS

    columns = set(metric_columns())
    assert {s.column for chart in CHARTS for s in chart.series} <= columns
    assert {"id", "job_id", "attempt", "created_at"}.isdisjoint(columns)


def test_compare_overlays_rewards_when_a_run_has_them(client, db):
    ids = []
    for name, method, preference in (("sft", "sft", False), ("dpo", "dpo", True)):
        claim = start_running_job(db, name, method=method)
        write_metrics(db, claim, 1, 30, preference=preference)
        finish(db, claim)
        ids.append(claim.job_id)
    body = client.get(f"/api/jobs/compare?ids={ids[0]},{ids[1]}").json()
    sft, dpo = (job["metrics"] for job in body["jobs"])
    assert dpo["reward_margin"][9] == pytest.approx(0.35) and set(sft["reward_margin"]) == {None}
    assert dpo["eval_reward_accuracy"][24] is not None

    soup = page(client, f"/jobs/compare?ids={ids[0]},{ids[1]}")
    series = [c["data-series"] for c in soup.select(".chart[data-chart=compare]")]
    assert series[:2] == ["loss", "eval_loss"]
    assert {"reward_margin", "reward_accuracy", "eval_reward_margin", "rewards_chosen"} <= set(
        series
    )
    plain = start_running_job(db, "another sft")
    write_metrics(db, plain, 1, 5)
    soup = page(client, f"/jobs/compare?ids={ids[0]},{plain.job_id}")
    assert [c["data-series"] for c in soup.select(".chart[data-chart=compare]")] == [
        "loss",
        "eval_loss",
    ]


def test_the_new_job_form_shows_the_chosen_methods_fields_only(client, db, settings):
    from tests.fakes.jobs import add_preference_dataset

    dataset_id = add_preference_dataset(db, settings)
    form = page(client, "/jobs/new").select_one("form.job-form")
    # sft (the default): its train_on is there; DPO's fields are hidden and disabled (not sent).
    assert form.select_one("select[name=method] option[selected]")["value"] == "sft"
    beta = form.find("input", attrs={"name": "beta"}).find_parent("fieldset")
    assert beta["data-methods"] == "dpo orpo" and beta.has_attr("hidden")
    assert beta.has_attr("disabled")
    assert form.find("input", attrs={"name": "beta"})["value"] == "0.1"  # ready for dpo
    loss_type = form.find("select", attrs={"name": "loss_type"}).find_parent("fieldset")
    assert loss_type["data-methods"] == "dpo" and loss_type.has_attr("disabled")
    train_on = form.find("select", attrs={"name": "train_on"}).find_parent("fieldset")
    assert train_on["data-methods"] == "sft" and not train_on.has_attr("disabled")

    # A browser without script sends the sft fields it showed when dpo was picked: left unset.
    form = {"dataset_id": dataset_id, "base_model": "demo-tiny-llama", "method": "dpo"}
    response = client.post("/jobs/new", data={**form, "train_on": "all"}, follow_redirects=False)
    assert response.status_code == 303, response.text[:500]
    (job,) = queue.list_jobs(db)
    assert job.config["method"] == "dpo" and job.config["beta"] == 0.1
    assert job.config["loss_type"] == "sigmoid" and job.config["train_on"] == "assistant"

    # The method shows in the jobs list and on the job page.
    assert page(client, "/jobs").select_one(f"#job-{job.id} .method-tag").text == "DPO"
    assert page(client, f"/jobs/{job.id}").select_one("#job-header h1 .method-tag").text == "DPO"


def test_every_kind_of_request_error_starts_with_a_capital_letter(client, db, settings):
    """A 422 names the field inside a sentence, not as its first word ("max_seq_len: ...")."""
    from tests.fakes.jobs import add_dataset

    dataset_id = add_dataset(db, settings)
    answers = [
        client.post("/api/jobs", json={"dataset_id": dataset_id, "max_seq_len": 10**9}),
        client.post("/api/jobs", json={"dataset_id": dataset_id, "lora_targets": ["q", "q"]}),
        client.get("/api/jobs/1/events", params={"after": "²"}),
        client.post("/api/datasets", files={"file": ("notes.txt", b"hello")}),
        client.post(
            "/api/datasets", data={"column_mapping": "[]"}, files={"file": ("a.jsonl", b"")}
        ),
    ]
    for answer in answers:
        message = answer.json()["error"]["message"]
        assert answer.status_code >= 400 and message[0].isupper(), (answer.status_code, message)
    assert answers[0].json()["error"]["message"].startswith("Field max_seq_len: ")


def test_a_gpu_run_without_liger_says_what_it_cost_and_how_to_install_it(client, db, settings):
    from app.models import BaseModelEntry
    from app.verified_versions import LIGER_MISSING
    from tests.fakes.jobs import MODEL, add_job

    job = add_job(db, settings, micro_batch_size=2, max_seq_len=4096)
    with db.write() as s:  # a Llama-3 vocabulary
        entry = s.get(BaseModelEntry, MODEL) or BaseModelEntry(name=MODEL, source="x")
        entry.vocab_size = 128256
        s.add(entry)
    plain = page(client, f"/jobs/{job.id}")
    assert plain.select_one(".missing-kernel") is None

    claim = queue.claim_next_job(db, "gpu-worker", 60)
    queue.update_progress(
        db, claim.job_id, claim.attempt, compute_mode=f"4-bit NF4 QLoRA, {LIGER_MISSING}"
    )
    note = page(client, f"/jobs/{job.id}").select_one(".missing-kernel")
    text = " ".join(note.text.split())
    # 8,192 tokens x 128,256 entries x (2 + 4) bytes = 5.87 GiB of logits
    assert "about 5.9 GiB here (8,192 tokens x 128,256 vocabulary entries" in text
    assert "pip install liger-kernel==0.8.5" in text and "restart the worker" in text
    header = client.get(f"/partials/jobs/{job.id}/header").text
    assert "missing-kernel" in header

"""Adapter download, Ollama Modelfile, and merging into the base (worker side)."""

from __future__ import annotations

import io
import zipfile

import pytest
from fastapi.testclient import TestClient

from tests.playground.conftest import ADAPTER_ID, QUESTION, TRAINED_ANSWER

pytestmark = pytest.mark.slow


@pytest.fixture
def web(pg_settings, pg_db, trained):
    from app.main import create_app

    with TestClient(create_app(pg_settings), base_url="http://127.0.0.1") as client:
        yield client


def test_download_is_a_zip_of_the_peft_files_template_config_and_modelfile(web, trained):
    response = web.get(f"/api/adapters/{ADAPTER_ID}/download")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    names = set(archive.namelist())
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "train_config.json",
        "tokenizer_config.json",
        "Modelfile",
    } <= names
    assert (
        archive.read("adapter_model.safetensors")
        == (trained["adapter_dir"] / "adapter_model.safetensors").read_bytes()
    )
    assert not any(n.startswith((".", "/")) or ".." in n for n in names)


@pytest.mark.parametrize("bad", ["..%2F..%2Fetc", "job-404", "%2e%2e", "job-1%00"])
def test_unknown_or_crafted_adapter_ids_are_404(web, bad):
    response = web.get(f"/api/adapters/{bad}/download")
    assert response.status_code == 404


def test_modelfile_uses_the_base_the_adapter_and_the_chatml_template(web, trained):
    body = web.get(f"/api/adapters/{ADAPTER_ID}/modelfile").json()
    text = body["modelfile"]
    assert body["template"] == "chatml"
    # FROM points into the unpacked zip, never at a path on the server.
    assert "FROM ./base" in text and str(trained["model_dir"].resolve()) not in text
    assert "ADAPTER ./" in text
    assert "{{ .Role }}" in text and "<|im_start|>assistant" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    page = web.get(f"/adapters/{ADAPTER_ID}", headers={"accept": "text/html"})
    assert page.status_code == 200
    assert "ollama create job-1 -f Modelfile" in page.text


def test_merge_runs_on_the_worker_and_the_merged_model_gives_the_adapters_answer(
    web, pg_settings, pg_db
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.merge import run_pending_merges

    queued = web.post(f"/api/adapters/{ADAPTER_ID}/merge")
    assert queued.status_code == 202 and queued.json()["status"] == "queued"
    # Asking twice while it is queued reuses the same request.
    assert web.post(f"/api/adapters/{ADAPTER_ID}/merge").json()["id"] == queued.json()["id"]
    partial = web.get(f"/partials/adapters/{ADAPTER_ID}/merge")
    assert 'hx-trigger="every 1s"' in partial.text  # the page polls while it waits

    assert run_pending_merges(pg_settings, worker_id="test-worker") == 1
    assert run_pending_merges(pg_settings) == 0  # nothing left to claim

    merge = web.get(f"/api/adapters/{ADAPTER_ID}/merge").json()
    assert merge["status"] == "succeeded", merge
    assert merge["progress_done"] == merge["progress_total"] > 0
    partial = web.get(f"/partials/adapters/{ADAPTER_ID}/merge")
    assert "every 1s" not in partial.text and f"/api/merges/{merge['id']}/download" in partial.text

    folder = pg_settings.resolved_data_dir / merge["output_dir"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert not any("lora" in name for name, _ in model.named_parameters())
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    answer = tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert answer.strip() == TRAINED_ANSWER

    download = web.get(f"/api/merges/{merge['id']}/download")
    assert download.status_code == 200
    assert "model.safetensors" in zipfile.ZipFile(io.BytesIO(download.content)).namelist()

"""GGUF exports of the trained demo adapter, built by the worker with llama.cpp's own converter and
quantiser, loaded by llama.cpp, and checked against the adapter's answers (worker/export.py)."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import shutil
import zipfile

import pytest
from fastapi.testclient import TestClient

from app.models import Adapter, BaseModelEntry
from tests.playground.conftest import ADAPTER_ID, QUESTION, TRAINED_ANSWER

pytestmark = pytest.mark.slow


@pytest.fixture
def web(pg_settings, pg_db, trained):
    from app.main import create_app

    with TestClient(create_app(pg_settings), base_url="http://127.0.0.1") as client:
        yield client


def _export(web, settings, **body):
    from worker.export import run_pending_exports

    queued = web.post(f"/api/adapters/{ADAPTER_ID}/exports", json=body)
    assert queued.status_code == 202, queued.text
    assert queued.json()["status"] == "queued" and queued.json()["check"]["status"] == "not run"
    assert run_pending_exports(settings) == 1
    return web.get(f"/api/exports/{queued.json()['id']}").json()


@pytest.mark.parametrize("quantization", ["f16", "q8_0"])
def test_the_demo_adapter_exports_to_a_gguf_that_answers_as_the_adapter(
    web, pg_settings, dataset_rows, quantization
):
    from worker.export_check import gguf_replies

    export = _export(web, pg_settings, kind="gguf", quantization=quantization)
    assert export["status"] == "succeeded", export["error"]
    assert export["quantization"] == quantization
    assert export["check"]["status"] == "match", export["check"]
    answers = export["check"]["details"]["answers"]
    # The GGUF reads each prompt as the same tokens as the adapter's tokenizer (ChatML's
    # <|im_start|> one token, not '<', '|', 'im', ...) and answers each as the adapter does; the
    # adapter itself may answer a held-out phrasing imperfectly, but it learnt the price.
    assert answers and all(a["same_prompt_tokens"] and a["gguf"] == a["adapter"] for a in answers)
    assert TRAINED_ANSWER in [a["gguf"] for a in answers]

    download = web.get(f"/api/exports/{export['id']}/download")
    assert download.status_code == 200
    assert download.headers["content-disposition"].endswith(f'{ADAPTER_ID}-{quantization}.gguf"')
    assert len(download.content) == export["size_bytes"]
    assert hashlib.sha256(download.content).hexdigest() == export["sha256"]
    # llama.cpp itself loads the downloaded file and greedy-decodes the trained answer.
    gguf = pg_settings.resolved_data_dir / "downloaded.gguf"
    gguf.write_bytes(download.content)
    question = [{"role": "user", "content": QUESTION}]
    assert [answer for answer, _ in gguf_replies(gguf, [question])] == [TRAINED_ANSWER]

    listed = web.get(f"/api/adapters/{ADAPTER_ID}/exports").json()
    assert export["id"] in [e["id"] for e in listed]
    assert set(listed[0]) >= {"id", "kind", "quantization", "status", "size_bytes", "sha256"}
    page = web.get(f"/adapters/{ADAPTER_ID}", headers={"accept": "text/html"}).text
    assert f'id="export-{export["id"]}"' in page and "answers match" in page
    assert export["sha256"][:12] in page

    deleted = web.delete(f"/api/exports/{export['id']}")
    assert deleted.status_code == 204
    assert web.get(f"/api/exports/{export['id']}/download").status_code == 404
    assert not list((pg_settings.layout.exports_dir(1)).glob(f"{export['id']}-*"))


def test_a_q4_k_m_gguf_and_its_ollama_bundle(web, pg_settings, dataset_rows, tmp_path):
    export = _export(web, pg_settings, kind="gguf", quantization="q4_K_M")
    assert export["status"] == "succeeded", export["error"]
    # A 4-bit quantisation of a tiny random model may answer differently: reported, not hidden.
    assert export["check"]["status"] in ("match", "differs")
    details = export["check"]["details"]
    assert all(a["same"] == (a["adapter"] == a["gguf"]) for a in details["answers"])

    bundle = web.get(f"/api/exports/{export['id']}/ollama")
    assert bundle.status_code == 200
    archive = zipfile.ZipFile(io.BytesIO(bundle.content))
    name = f"{ADAPTER_ID}-q4_K_M.gguf"
    assert set(archive.namelist()) == {name, "Modelfile", "README.md"}
    modelfile = archive.read("Modelfile").decode()
    assert f"FROM ./{name}" in modelfile
    assert str(pg_settings.resolved_data_dir) not in modelfile
    assert "<|im_start|>" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    # Unpacked elsewhere, FROM names a file that is there.
    archive.extractall(tmp_path / "elsewhere")
    assert (tmp_path / "elsewhere" / name).stat().st_size == export["size_bytes"]
    web.delete(f"/api/exports/{export['id']}")


def test_a_lora_gguf_on_the_base_gguf_answers_as_the_adapter(web, pg_settings, dataset_rows):
    export = _export(web, pg_settings, kind="gguf-lora", quantization="f16")
    assert export["status"] == "succeeded", export["error"]
    assert (export["kind"], export["quantization"]) == ("gguf-lora", "f16")
    # Checked on the base converted to an f16 GGUF with the LoRA GGUF applied by llama.cpp.
    assert export["check"]["status"] == "match", export["check"]
    answers = export["check"]["details"]["answers"]
    assert answers and all(a["same_prompt_tokens"] for a in answers)
    assert TRAINED_ANSWER in [a["gguf"] for a in answers]

    download = web.get(f"/api/exports/{export['id']}/download")
    assert download.status_code == 200
    name = f"{ADAPTER_ID}-lora-f16.gguf"
    assert download.headers["content-disposition"].endswith(f'{name}"')
    assert download.content[:4] == b"GGUF"
    assert hashlib.sha256(download.content).hexdigest() == export["sha256"]
    # A LoRA GGUF holds the adapter's low-rank weights only: far smaller than the model.
    model_bytes = sum(p.stat().st_size for p in pg_settings.models_dir.rglob("*.safetensors"))
    assert 0 < export["size_bytes"] < model_bytes / 4
    # The base GGUF the check loaded it onto stays in no folder the user is offered.
    assert [p.name for p in pg_settings.layout.exports_dir(1).iterdir()] == [
        f"{export['id']}-{name}"
    ]
    assert web.get(f"/api/exports/{export['id']}/ollama").status_code == 422
    assert web.delete(f"/api/exports/{export['id']}").status_code == 204


def test_a_lora_gguf_is_f16_or_q8_0_only(web):
    response = web.post(
        f"/api/adapters/{ADAPTER_ID}/exports", json={"kind": "gguf-lora", "quantization": "q4_K_M"}
    )
    assert response.status_code == 422
    assert "f16 or q8_0" in response.json()["error"]["message"]
    bad = web.post(f"/api/adapters/{ADAPTER_ID}/exports", json={"kind": "onnx"})
    assert bad.status_code == 422


def _toy_base(pg_settings, pg_db, trained, architecture):
    """Adapter job-1-toy on a copy of the demo base whose config.json names `architecture`."""
    toy = pg_settings.resolved_data_dir.parent / "toy-model"
    shutil.copytree(trained["model_dir"], toy, dirs_exist_ok=True)
    config = json.loads((toy / "config.json").read_text())
    config["architectures"] = [architecture]
    (toy / "config.json").write_text(json.dumps(config))
    with pg_db.write() as s:
        if s.get(BaseModelEntry, "toy") is None:
            s.add(BaseModelEntry(name="toy", source=str(toy), is_local=True, parameters=1))
            s.flush()
            s.add(Adapter(id="job-1-toy", job_id=1, name="toy", base_model="toy"))
    return toy


def test_an_architecture_the_converter_does_not_know_is_refused_at_once(
    web, pg_settings, pg_db, trained
):
    _toy_base(pg_settings, pg_db, trained, "TuneboardToyForCausalLM")
    for kind in ("gguf", "gguf-lora"):
        refused = web.post("/api/adapters/job-1-toy/exports", json={"kind": kind})
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "unsupported_architecture"
        assert "TuneboardToyForCausalLM" in error["message"] and "toy" in error["message"]
        assert "merged model" in error["hint"]
    assert web.get("/api/adapters/job-1-toy/exports").json() == []


def test_an_architecture_changed_after_queueing_is_named_by_the_worker(
    web, pg_settings, pg_db, trained
):
    toy = _toy_base(pg_settings, pg_db, trained, "LlamaForCausalLM")
    queued = web.post("/api/adapters/job-1-toy/exports", json={"kind": "gguf"})
    assert queued.status_code == 202, queued.text
    config = json.loads((toy / "config.json").read_text())
    (toy / "config.json").write_text(
        json.dumps({**config, "architectures": ["TuneboardToyForCausalLM"]})
    )
    from worker.export import run_pending_exports

    assert run_pending_exports(pg_settings) == 1
    export = web.get(f"/api/exports/{queued.json()['id']}").json()
    assert export["status"] == "failed"
    assert export["error"]["kind"] == "unsupported_architecture"
    assert "TuneboardToyForCausalLM" in export["error"]["message"]
    assert export["error"]["hint"]
    assert web.get(f"/api/exports/{export['id']}/download").status_code == 404


def test_a_disk_that_fills_during_a_build_leaves_nothing_offered(
    web, pg_settings, dataset_rows, monkeypatch
):
    import worker.export

    def full_disk(staged, final):
        # The write of the finished file runs out of space half-way.
        final.write_bytes(staged.read_bytes()[: staged.stat().st_size // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(final))

    monkeypatch.setattr(worker.export, "publish", full_disk)
    export = _export(web, pg_settings, kind="gguf", quantization="f16")
    assert export["status"] == "failed"
    assert export["error"]["kind"] == "disk_full"
    assert "Free disk" in export["error"]["hint"]
    assert export["sha256"] is None and export["size_bytes"] == 0
    assert web.get(f"/api/exports/{export['id']}/download").status_code == 404
    left = list(pg_settings.layout.exports_dir(1).glob(f"*{export['id']}*"))
    assert left == [], left  # neither the partial file nor the staging folder stays

"""Tool-call datasets on the pages and at job creation: which registered models can train them,
and a clear refusal, naming the model, for one whose chat template has no tool support."""

from __future__ import annotations

from pathlib import Path

from bs4 import BeautifulSoup

from app.services.model_registry import register_model
from worker.demo import DEMO_CHAT_TEMPLATE

FIXTURES = Path(__file__).parents[1] / "fixtures" / "datasets"
HTML = {"accept": "text/html"}
CONFIG = '{"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 100}'


def _model(settings, db, name: str, template: str | None) -> None:
    """A registered local model folder (config, an empty safetensors file, its template)."""
    folder = settings.models_dir / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(CONFIG)
    (folder / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    register_model(db, settings, str(folder), name)


def _upload(client, fixture: str) -> dict:
    response = client.post(
        "/api/datasets", files={"file": (fixture, (FIXTURES / fixture).read_bytes())}
    )
    assert response.status_code == 201, response.text
    return response.json()


def test_registration_reads_whether_the_template_takes_tools(client, settings, db):
    _model(settings, db, "tool-model", DEMO_CHAT_TEMPLATE)
    _model(settings, db, "plain-model", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    models = {m["name"]: m for m in client.get("/api/models").json()["models"]}
    assert models["tool-model"]["supports_tools"] is True
    assert models["plain-model"]["supports_tools"] is False


def test_the_dataset_page_names_the_models_that_can_train_tool_calls(client, settings, db):
    glaive = _upload(client, "glaive_toolcall.json")
    assert (glaive["status"], glaive["dropped_rows"], glaive["valid_rows"]) == ("ready", 0, 4)
    page = BeautifulSoup(client.get(glaive["url"], headers=HTML).text, "html.parser")
    assert "No registered model can train it" in page.select_one("#tool-calls").text

    _model(settings, db, "tool-model", DEMO_CHAT_TEMPLATE)
    _model(settings, db, "plain-model", "{{ messages[0]['content'] }}")
    page = BeautifulSoup(client.get(glaive["url"], headers=HTML).text, "html.parser")
    facts = page.select_one("#tool-calls").text
    assert "3 rows define tools" in facts and "tool-model" in facts
    assert "plain-model" not in facts

    plain = _upload(client, "alpaca.jsonl")
    assert client.get(plain["url"], headers=HTML).text.count('id="tool-calls"') == 0


def test_a_job_on_tool_calls_with_a_template_without_tools_is_refused_naming_the_model(
    client, settings, db
):
    _model(settings, db, "plain-model", "{{ messages[0]['content'] }}")
    dataset = _upload(client, "openai_tools.jsonl")
    refused = client.post(
        "/api/jobs", json={"dataset_id": dataset["id"], "base_model": "plain-model"}
    )
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert "chat template of model plain-model has no tool support" in error["message"]
    assert "Register a model whose chat template takes tools" in error["hint"]

    _model(settings, db, "tool-model", DEMO_CHAT_TEMPLATE)
    refused = client.post(
        "/api/jobs", json={"dataset_id": dataset["id"], "base_model": "plain-model"}
    )
    assert (
        "Choose a model whose chat template takes tools: tool-model"
        in refused.json()["error"]["hint"]
    )
    accepted = client.post(
        "/api/jobs", json={"dataset_id": dataset["id"], "base_model": "tool-model"}
    )
    assert accepted.status_code == 201, accepted.text

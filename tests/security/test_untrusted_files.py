"""Nothing a user supplies is unpickled, and remote code stays off: a model folder whose only
weights are a pickle that would create a sentinel file when loaded is refused, and no source file
of the web or the worker calls a pickle-based loader."""

from __future__ import annotations

import pickle
import re
import struct
from pathlib import Path

import pytest

from tests.security.conftest import LLAMA_CONFIG, make_model_dir

ROOT = Path(__file__).resolve().parents[2]


class Booby:
    """Unpickling this creates `path`: proof that someone loaded the pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt", "adapter_model.bin"])
def test_a_pickle_only_model_is_refused_and_never_unpickled(authed, tmp_path, weights):
    sentinel = tmp_path / "PWNED"
    folder = make_model_dir(tmp_path / "pickled", weights=False)
    (folder / weights).write_bytes(pickle.dumps(Booby(sentinel)))
    response = authed.post("/api/models", json={"source": str(folder)})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "model_refused" and "safetensors" in error["message"]
    assert not sentinel.exists()
    assert authed.get("/api/models").json()["models"] == []


@pytest.mark.parametrize(
    "content",
    [
        b"",  # empty
        b"\x80\x04" + pickle.dumps({"a": 1})[2:],  # a pickle wearing a .safetensors name
        struct.pack("<Q", 2**62) + b"{}",  # a header longer than the file (or memory)
        struct.pack("<Q", 10) + b"not json!!",
        struct.pack("<Q", 2) + b"[]",
        struct.pack("<Q", 30) + b'{"w": {"shape": "nonsense"}} ',
    ],
)
def test_a_corrupt_safetensors_file_is_refused_not_a_server_error(authed, tmp_path, content):
    sentinel = tmp_path / "PWNED"
    folder = make_model_dir(tmp_path / "corrupt", weights=False)
    (folder / "model.safetensors").write_bytes(content)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Booby(sentinel)))
    response = authed.post("/api/models", json={"source": str(folder)})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "model_refused"
    assert not sentinel.exists()


def test_remote_code_is_refused_by_default(authed, tmp_path):
    config = {**LLAMA_CONFIG, "auto_map": {"AutoModelForCausalLM": "evil.EvilForCausalLM"}}
    folder = make_model_dir(tmp_path / "remote", config)
    (folder / "evil.py").write_text(f"open({str(tmp_path / 'PWNED')!r}, 'w')\n")
    response = authed.post("/api/models", json={"source": str(folder)})
    assert response.status_code == 400
    assert "trust_remote_code" in response.json()["error"]["message"]
    assert not (tmp_path / "PWNED").exists()


# Loaders that run code from the file they read, and other ways to run strings.
FORBIDDEN = [
    (r"\bpickle\.loads?\(", "pickle"),
    (r"\b(c?[Pp]ickle|dill|cloudpickle)\.(load|loads|Unpickler)\b", "pickle family"),
    (r"\bjoblib\.load\(", "joblib"),
    (r"\bread_pickle\(", "pandas pickle"),
    (r"\bshelve\.open\(", "shelve"),
    (r"\bmarshal\.loads?\(", "marshal"),
    (r"\byaml\.(load|unsafe_load)\((?![^)]*SafeLoader)", "unsafe yaml"),
    (r"allow_pickle\s*=\s*True", "numpy pickle"),
    (r"(?<![\w.])(eval|exec)\(", "eval/exec"),  # not session.exec(...)
    (r"shell\s*=\s*True|\bos\.system\(|\bos\.popen\(", "shell"),
    (r"trust_remote_code\s*=\s*True", "remote code on unconditionally"),
]


def _sources() -> list[Path]:
    files = [p for d in ("app", "worker") for p in (ROOT / d).rglob("*.py")]
    assert any(p.name == "main.py" for p in files)
    return files


def test_no_source_file_unpickles_or_runs_strings():
    found = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for pattern, what in FORBIDDEN:
            for match in re.finditer(pattern, text):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert not found, found


def test_torch_load_is_only_ever_weights_only():
    """torch.load unpickles; only `weights_only=True` (the restricted unpickler) is allowed, and
    from_pretrained must not fall back to .bin files."""
    found = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"\btorch\.load\(", text):
            call = text[match.start() : text.find(")", match.start()) + 1]
            if "weights_only=True" not in call.replace(" ", ""):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(ROOT)}:{line}: {call}")
        if re.search(r"use_safetensors\s*=\s*False", text):
            found.append(f"{path.relative_to(ROOT)}: use_safetensors=False")
    assert not found, found


def test_the_grep_finds_what_it_is_looking_for():
    """The patterns above would catch the real thing (so an empty result means something)."""
    samples = {
        "pickle": "x = pickle.load(f)",
        "joblib": "joblib.load('m')",
        "shell": "subprocess.run(cmd, shell=True)",
        "unsafe yaml": "yaml.load(text)",
        "numpy pickle": "np.load(p, allow_pickle=True)",
    }
    for what, sample in samples.items():
        assert any(re.search(p, sample) for p, w in FORBIDDEN if w == what), what
    assert not re.search(FORBIDDEN[6][0], "yaml.load(text, Loader=yaml.SafeLoader)")
    assert re.search(FORBIDDEN[8][0], "eval(x)") and not re.search(FORBIDDEN[8][0], "s.exec(q)")

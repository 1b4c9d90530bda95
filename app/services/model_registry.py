"""The registry of base models: a hub id or a local directory, read from its config files without
loading any weights (the web process never imports the ML stack)."""

from __future__ import annotations

import json
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any

from sqlmodel import col, select

from app.dataset_errors import describe_type
from app.db import Database
from app.errors import Conflict, NotFound, UserError
from app.models import BaseModelEntry
from app.settings import Settings
from app.tool_calls import template_takes_tools
from app.train_config import MODEL_NAME_PATTERN

HUB_TIMEOUT_SECONDS = 25.0


class ModelRegistrationError(UserError):
    code = "model_refused"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ModelRegistrationError(
            f"Cannot read {path.name}: {reason}.",
            "The model folder must hold a Hugging Face config.json (save it with save_pretrained).",
        ) from exc
    if not isinstance(value, dict):
        raise ModelRegistrationError(
            f"{path.name} must hold one JSON object, found {describe_type(value)}.",
            "The model folder must hold a Hugging Face config.json (save it with save_pretrained).",
        )
    return value


SAFETENSORS_HEADER_MAX_BYTES = 100 * 1024 * 1024  # the format's own limit
# Far beyond any model that exists (the largest are ~2e12); above it a count is garbage, and it
# must fit a 64-bit database integer.
MAX_PARAMETERS = 10**15
# Bounds on the config.json sizes we read: generous (several times the largest real models), but
# small enough that no product of them overflows, and each is a whole number.
CONFIG_INT_LIMITS = {
    "vocab_size": 2**24,
    "max_position_embeddings": 2**28,
    "hidden_size": 2**20,
    "intermediate_size": 2**22,
    "num_hidden_layers": 2**14,
    "num_attention_heads": 2**14,
    "num_key_value_heads": 2**14,
    "head_dim": 2**14,
}
_CONFIG_HINT = (
    "Fix config.json (or save the model again with save_pretrained): its sizes are whole numbers "
    "and architectures is a list of class names such as LlamaForCausalLM."
)
_SAFETENSORS_HINT = "Save the weights again with save_pretrained(safe_serialization=True)."


def safetensors_parameters(model_dir: Path) -> int:
    """Count parameters from the safetensors headers alone (no tensor is read). A file that is not
    safetensors (empty, a renamed pickle, a header longer than the file, shapes that are not lists
    of whole numbers) is refused."""
    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        try:
            size = file.stat().st_size
            with file.open("rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if not 2 <= length <= min(size - 8, SAFETENSORS_HEADER_MAX_BYTES):
                    raise ValueError(f"header length {length} does not fit the file")
                header = json.loads(f.read(length).decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                total += _tensor_size(name, info)
                if total > MAX_PARAMETERS:
                    raise ValueError(f"the tensors add up to more than {MAX_PARAMETERS} values")
        except RecursionError as exc:
            raise ModelRegistrationError(
                f"{file.name} is not a valid safetensors file (its header is nested too deeply).",
                _SAFETENSORS_HINT,
            ) from exc
        except (OSError, ValueError, TypeError, KeyError, struct.error) as exc:
            raise ModelRegistrationError(
                f"{file.name} is not a valid safetensors file ({type(exc).__name__}: "
                f"{str(exc)[:200]}).",
                _SAFETENSORS_HINT,
            ) from exc
    return total


def _tensor_size(name: str, info: object) -> int:
    shape = info.get("shape") if isinstance(info, dict) else None
    if not isinstance(shape, list):
        raise ValueError(f"tensor {name[:100]!r} has no shape list")
    count = 1
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= MAX_PARAMETERS:
            raise ValueError(f"tensor {name[:100]!r} has a shape that is not whole sizes")
        count *= dim
        if count > MAX_PARAMETERS:
            raise ValueError(f"tensor {name[:100]!r} has more than {MAX_PARAMETERS} values")
    return count


def config_int(config: dict[str, Any], field: str, default: int = 0) -> int:
    """A size from config.json: absent or null gives `default`; anything but a whole number in
    0..CONFIG_INT_LIMITS[field] is refused, naming the field."""
    value = config.get(field)
    if value is None:
        return default
    limit = CONFIG_INT_LIMITS[field]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        shown = repr(value)[:60] if isinstance(value, int | float) else describe_type(value)
        raise ModelRegistrationError(
            f'config.json field "{field}" must be a whole number from 0 to {limit}, found {shown}.',
            _CONFIG_HINT,
        )
    return value


def estimate_parameters(config: dict[str, Any]) -> int:
    """Parameters of a Llama-like decoder from its config, when no weights are at hand. Refused
    (naming the fields) when the sizes multiply out to more than any model has."""
    hidden = config_int(config, "hidden_size")
    layers = config_int(config, "num_hidden_layers")
    inter = config_int(config, "intermediate_size")
    vocab = config_int(config, "vocab_size")
    heads = config_int(config, "num_attention_heads", 1) or 1
    kv_heads = config_int(config, "num_key_value_heads", heads)
    head_dim = config_int(config, "head_dim") or hidden // heads
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    per_layer = attention + 3 * hidden * inter + 2 * hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    total = layers * per_layer + embeddings + hidden
    if total > MAX_PARAMETERS:
        raise ModelRegistrationError(
            f"config.json describes {total:.3g} parameters (from hidden_size, intermediate_size, "
            f"num_hidden_layers and vocab_size), more than the {MAX_PARAMETERS:.0e} any model has.",
            _CONFIG_HINT,
        )
    return total


def describe_config(config: dict[str, Any], *, trust_remote_code: bool) -> dict[str, Any]:
    """Check a config.json is a trainable causal LM and pull out what the Models page shows."""
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ModelRegistrationError(
            f'config.json field "architectures" must be a list of class names, found '
            f"{describe_type(architectures)}"
            + (" holding other values" if isinstance(architectures, list) else "")
            + ".",
            _CONFIG_HINT,
        )
    architecture = architectures[0] if architectures else ""
    family = config.get("model_type") or ""
    if not isinstance(family, str):
        raise ModelRegistrationError(
            f'config.json field "model_type" must be a string, found {describe_type(family)}.',
            _CONFIG_HINT,
        )
    if "auto_map" in config and not trust_remote_code:
        raise ModelRegistrationError(
            f"This model ({architecture or family}) ships its own Python code (trust_remote_code).",
            "Tuneboard does not run code from model repositories unless the operator allows that "
            "one model: add its id or path to TUNEBOARD_TRUST_REMOTE_CODE_MODELS.",
        )
    if not architecture.endswith("ForCausalLM") and "ForConditionalGeneration" not in architecture:
        raise ModelRegistrationError(
            f"Unsupported architecture {architecture or '(none given)'}.",
            "Tuneboard fine-tunes decoder-only language models (architectures ending in "
            "ForCausalLM, e.g. LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM).",
        )
    text_config = config.get("text_config") or config
    if not isinstance(text_config, dict):
        raise ModelRegistrationError(
            f'config.json field "text_config" must be an object, found '
            f"{describe_type(text_config)}.",
            _CONFIG_HINT,
        )
    return {
        "architecture": architecture,
        "family": family,
        "vocab_size": config_int(text_config, "vocab_size"),
        "context_length": config_int(text_config, "max_position_embeddings"),
    }


def chat_template_text(files: dict[str, Path | None]) -> str:
    """The model's chat template ("" when it has none): chat_template.jinja, else the one in
    tokenizer_config.json (the default of several named ones)."""
    template_file = files.get("chat_template.jinja")
    tokenizer_config = files.get("tokenizer_config.json")
    try:
        if template_file is not None:
            return template_file.read_text(encoding="utf-8")
        if tokenizer_config is None:
            return ""
        value = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return ""
    template = value.get("chat_template") if isinstance(value, dict) else None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use"}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("tool_use") or named.get("default")
    return template if isinstance(template, str) else ""


def hub_reachable(timeout: float = 5.0) -> bool:
    """A quick TCP connect to the hub endpoint, so an offline machine fails in seconds, not after
    the hub client's retries."""
    import os
    import socket
    from urllib.parse import urlsplit

    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _local_files(model_dir: Path) -> dict[str, Path | None]:
    names = ("config.json", "tokenizer_config.json", "chat_template.jinja")
    return {name: (model_dir / name if (model_dir / name).is_file() else None) for name in names}


def _hub_files(repo_id: str, settings: Settings) -> dict[str, Path | None]:
    """config.json and the tokenizer files of a hub model, from the cache or the hub (bounded)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cache_dir = settings.hf_hub_cache
    cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    offline = settings.hf_offline

    def fetch(name: str) -> Path | None:
        hit = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(hit, str):
            return Path(hit)
        if offline or isinstance(cached, str):
            return None
        try:
            return Path(hf_hub_download(repo_id, name, cache_dir=cache_dir, etag_timeout=10))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None

    unreachable = ModelRegistrationError(
        f"{repo_id} is not in the local cache and the model hub could not be reached.",
        "Check the network (or a proxy), or download the model on another machine and register "
        "its local folder instead.",
        code="hub_unreachable",
    )
    if offline and not isinstance(cached, str):
        raise unreachable
    if not isinstance(cached, str) and not hub_reachable():
        raise unreachable
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        future = pool.submit(
            lambda: {
                n: fetch(n) for n in ("config.json", "tokenizer_config.json", "chat_template.jinja")
            }
        )
        files = future.result(timeout=HUB_TIMEOUT_SECONDS)
    except FutureTimeout as exc:
        raise unreachable from exc
    except Exception as exc:
        name = type(exc).__name__
        if "NotFound" in name or "Unauthorized" in name or "Gated" in name:
            raise ModelRegistrationError(
                f"The hub has no model {repo_id} that this machine may read ({name}).",
                "Check the id's spelling; a gated model needs `hf auth login` (or HF_TOKEN) first, "
                "as the user who runs Tuneboard.",
                code="model_not_found",
            ) from exc
        raise unreachable from exc
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if files["config.json"] is None:
        raise unreachable
    return files


def register_model(
    db: Database, settings: Settings, source: str, name: str | None = None, *, is_demo: bool = False
) -> BaseModelEntry:
    """Register a local model folder or a hub id, reading only its config and tokenizer files."""
    source = source.strip()
    if re.search(r"[\x00-\x1f\x7f]", source) or not source:
        raise ModelRegistrationError(
            "The model source is empty or contains control characters.",
            "Give a hub id such as Qwen/Qwen2.5-0.5B-Instruct or an absolute folder path.",
        )
    try:
        local = Path(source).expanduser()
        is_local = local.is_absolute() or source.startswith((".", "~")) or local.exists()
    except (RuntimeError, OSError, ValueError) as exc:  # "~nosuchuser", names the OS cannot use
        raise ModelRegistrationError(
            f"{source[:200]!r} is not a usable folder path ({exc}).",
            "Give the absolute path of the folder, or a hub id such as org/name.",
            code="model_not_found",
        ) from exc
    if is_local:
        model_dir = local.resolve()
        if not model_dir.is_dir():
            raise ModelRegistrationError(
                f"There is no folder at {model_dir}.",
                "Give the folder that holds config.json and the *.safetensors weights, or a hub "
                "id such as meta-llama/Llama-3.2-1B-Instruct.",
                code="model_not_found",
            )
        files = _local_files(model_dir)
        if files["config.json"] is None:
            raise ModelRegistrationError(
                f"{model_dir} has no config.json.",
                "Point at a folder saved with save_pretrained (config.json + *.safetensors).",
            )
        if not list(model_dir.glob("*.safetensors")):
            raise ModelRegistrationError(
                f"{model_dir} has no .safetensors weights.",
                "Tuneboard loads only safetensors (never pickled .bin files). Convert the weights "
                "with save_pretrained(safe_serialization=True).",
            )
        source = str(model_dir)
    else:
        if not re.match(MODEL_NAME_PATTERN, source) or "/" not in source:
            raise ModelRegistrationError(
                f"{source!r} is neither an existing folder nor a hub id.",
                "A hub id looks like org/name (e.g. Qwen/Qwen2.5-0.5B-Instruct); a local model is "
                "an absolute path to its folder.",
            )
        files = _hub_files(source, settings)
    assert files["config.json"] is not None
    config = _read_json(files["config.json"])
    trusted = source in settings.trust_remote_code_models
    facts = describe_config(config, trust_remote_code=trusted)
    parameters = safetensors_parameters(Path(source)) if is_local else estimate_parameters(config)
    name = name or (Path(source).name if is_local else source)
    if not re.match(MODEL_NAME_PATTERN, name):
        raise ModelRegistrationError(
            f"{name!r} cannot be a model name.", "Use letters, digits, '.', '_', '-' (and one '/')."
        )
    template = chat_template_text(files)
    entry = BaseModelEntry(
        name=name,
        source=source,
        is_local=is_local,
        parameters=parameters,
        has_chat_template=bool(template),
        supports_tools=template_takes_tools(template),
        trust_remote_code=trusted,
        is_demo=is_demo,
        **facts,
    )
    with db.write() as s:
        if s.get(BaseModelEntry, name) is not None:
            raise Conflict(
                f"A model named {name} is already registered.",
                "Pick another name, or remove the existing one first.",
            )
        s.add(entry)
    return entry


def list_models(db: Database) -> list[BaseModelEntry]:
    with db.read() as s:
        return list(s.exec(select(BaseModelEntry).order_by(col(BaseModelEntry.created_at))))


def tool_models(db: Database) -> list[str]:
    """The registered models whose chat template takes tools: those that can train tool calls."""
    return [model.name for model in list_models(db) if model.supports_tools]


def get_model(db: Database, name: str) -> BaseModelEntry:
    with db.read() as s:
        entry = s.get(BaseModelEntry, name)
    if entry is None:
        raise NotFound(
            f"There is no registered model {name!r}.", "Register it on the Models page first."
        )
    return entry

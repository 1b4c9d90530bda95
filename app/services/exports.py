"""Taking an adapter elsewhere: a streamed zip of its files, an Ollama Modelfile, a merged model.

Every path comes from a database id and is checked to lie under the data dir's runs folder.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

from sqlmodel import col, select

from app import side_queue
from app.db import Database
from app.errors import NotFound
from app.models import Adapter, BaseModelEntry, MergeRequest, SideWorkStatus
from app.settings import Settings

CHUNK_BYTES = 1024 * 1024
# What a PEFT adapter folder holds that another tool needs (checkpoint markers are left out).
ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "train_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


def list_adapters(db: Database) -> list[Adapter]:
    """Every trained adapter, newest first: the Adapters page, where each one is exported."""
    with db.read() as s:
        return list(s.exec(select(Adapter).order_by(col(Adapter.created_at).desc())).all())


def get_adapter(db: Database, adapter_id: str) -> Adapter:
    with db.read() as s:
        adapter = s.get(Adapter, adapter_id)
    if adapter is None:
        raise NotFound(
            f"There is no adapter {adapter_id!r}.", "Adapters are listed on the Adapters page."
        )
    return adapter


def adapter_dir(settings: Settings, adapter: Adapter) -> Path:
    path = settings.layout.adapter_dir(adapter.job_id).resolve()
    if (
        not path.is_relative_to(settings.runs_dir.resolve())
        or not (path / "adapter_config.json").is_file()
    ):
        raise NotFound(
            f"The files of adapter {adapter.id} are missing.",
            "The run folder was moved or deleted; train the job again.",
        )
    return path


class _Sink:
    """A write-only file object whose bytes the zip generator hands out as they are written."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.offset = 0

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def zip_stream(files: list[tuple[str, Path | bytes]]) -> Iterator[bytes]:
    """A zip built while it is sent: never the whole archive in memory or on disk."""
    sink = _Sink()
    with zipfile.ZipFile(sink, "w", allowZip64=True) as archive:  # type: ignore[call-overload]
        for name, source in files:
            compress = zipfile.ZIP_STORED if name.endswith(".safetensors") else zipfile.ZIP_DEFLATED
            if isinstance(source, bytes):
                archive.writestr(name, source, compress_type=compress)
                yield sink.take()
                continue
            info = zipfile.ZipInfo.from_file(source, name)
            info.compress_type = compress
            with source.open("rb") as src, archive.open(info, "w", force_zip64=True) as dst:
                while chunk := src.read(CHUNK_BYTES):
                    dst.write(chunk)
                    yield sink.take()
    yield sink.take()


def adapter_zip(db: Database, settings: Settings, adapter_id: str) -> tuple[str, Iterator[bytes]]:
    """(file name, byte stream) of the adapter's PEFT files, tokenizer, config and a Modelfile."""
    adapter = get_adapter(db, adapter_id)
    folder = adapter_dir(settings, adapter)
    files: list[tuple[str, Path | bytes]] = [
        (name, folder / name) for name in ADAPTER_FILES if (folder / name).is_file()
    ]
    files.append(("Modelfile", ollama_modelfile(db, settings, adapter).text.encode()))
    return f"{adapter.id}-adapter.zip", zip_stream(files)


# --- Ollama -------------------------------------------------------------------------------------


CHATML_GO_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)


class Modelfile:
    def __init__(self, text: str, template_kind: str, note: str, base_source: str) -> None:
        self.text, self.template_kind, self.note, self.base_source = (
            text,
            template_kind,
            note,
            base_source,
        )


def chat_template_of(folder: Path) -> str:
    """The chat template saved with the adapter (chat_template.jinja or tokenizer_config.json)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except ValueError:
            return ""
        return template if isinstance(template, str) else ""
    return ""


def is_chatml(template: str) -> bool:
    return "<|im_start|>" in template and "<|im_end|>" in template


def ollama_modelfile(db: Database, settings: Settings, adapter: Adapter) -> Modelfile:
    """A Modelfile for `ollama create`: the base, this adapter, the training chat template.

    ChatML templates (`<|im_start|>role ... <|im_end|>`, what Tuneboard trains base models on and
    what Qwen, SmolLM and many others use) are converted to Ollama's Go template form. Other
    templates are not converted: the Modelfile says so and Ollama's own template for the base
    applies, which must be checked against the training one.
    """
    with db.read() as s:
        base = s.get(BaseModelEntry, adapter.base_model)
    base_source = base.source if base is not None else adapter.base_model
    is_local = base.is_local if base is not None else False
    template = chat_template_of(adapter_dir(settings, adapter))
    lines = [f"# {adapter.name} ({adapter.id}), a LoRA adapter trained by Tuneboard"]
    if is_local:
        lines.append(f"FROM {base_source}")
    else:
        lines += [
            f"# The base model {base_source}, downloaded next to this file with",
            f"#   hf download {base_source} --local-dir ./base",
            "FROM ./base",
        ]
    lines.append("ADAPTER ./")
    if is_chatml(template):
        kind, note = "chatml", "The training chat template (ChatML) is converted below."
        lines += [
            f'TEMPLATE """{CHATML_GO_TEMPLATE}"""',
            'PARAMETER stop "<|im_end|>"',
            'PARAMETER stop "<|im_start|>"',
        ]
    else:
        kind = "other" if template else "none"
        note = (
            "This adapter's chat template is not ChatML, and Tuneboard converts only ChatML "
            "templates to Ollama's form. Ollama will use the base model's own template: check it "
            "matches the one the adapter was trained with (tokenizer_config.json in the zip), or "
            "write a TEMPLATE line by hand."
        )
        lines.append("# " + note)
    return Modelfile("\n".join(lines) + "\n", kind, note, base_source)


# --- merge requests (run by a worker: worker/merge.py) -----------------------------------------


def request_merge(db: Database, adapter_id: str) -> MergeRequest:
    """Queue a merge of the adapter into its bf16 base; an unfinished request is reused.

    A request whose worker died is requeued (or failed after its last attempt) first, so a merge
    killed mid-way is never handed back as "running" forever.
    """
    get_adapter(db, adapter_id)
    side_queue.requeue_expired(db)
    with db.write() as s:
        existing = s.exec(
            select(MergeRequest)
            .where(MergeRequest.adapter_id == adapter_id)
            .where(col(MergeRequest.status).in_([SideWorkStatus.queued, SideWorkStatus.running]))
        ).first()
        if existing is not None:
            return existing
        merge = MergeRequest(adapter_id=adapter_id)
        s.add(merge)
        s.flush()
        s.refresh(merge)
        return merge


def latest_merge(db: Database, adapter_id: str) -> MergeRequest | None:
    with db.read() as s:
        return s.exec(
            select(MergeRequest)
            .where(MergeRequest.adapter_id == adapter_id)
            .order_by(col(MergeRequest.id).desc())
        ).first()


def merged_zip(db: Database, settings: Settings, merge_id: int) -> tuple[str, Iterator[bytes]]:
    with db.read() as s:
        merge = s.get(MergeRequest, merge_id)
    if merge is None or merge.status != SideWorkStatus.succeeded or not merge.output_dir:
        raise NotFound("That merged model is not ready.", "Start a merge on the adapter's page.")
    data = settings.resolved_data_dir
    folder = (data / merge.output_dir).resolve()
    if not folder.is_relative_to(settings.runs_dir.resolve()) or not folder.is_dir():
        raise NotFound("The merged model's folder is missing.", "Merge the adapter again.")
    files: list[tuple[str, Path | bytes]] = [
        (p.name, p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")
    ]
    return f"{merge.adapter_id}-merged.zip", zip_stream(files)

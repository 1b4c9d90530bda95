"""Taking an adapter elsewhere: a streamed zip of its files, an Ollama Modelfile, a merged model,
and exports built by a worker (GGUF for llama.cpp and Ollama, a LoRA GGUF, a merged model) with
their Ollama bundle.

Every path comes from a database id and is checked to lie under the data dir's runs folder.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select

from app import export_kinds, side_queue
from app.db import Database
from app.errors import Conflict, NotFound, UserError
from app.export_kinds import ExportKindName, Quantization
from app.faults import DiskFull
from app.models import (
    Adapter,
    BaseModelEntry,
    Evaluation,
    MergeRequest,
    ModelExport,
    SideWorkStatus,
)
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


# a side task asked for an adapter: what `newest` and `unfinished` look up
Task = TypeVar("Task", MergeRequest, ModelExport, Evaluation)


def newest(s: Session, table: type[Task], adapter_id: str, *where: Any) -> Task | None:
    """The adapter's newest merge, export or evaluation (of those `where` keeps), or None."""
    return s.exec(
        select(table).where(table.adapter_id == adapter_id, *where).order_by(col(table.id).desc())
    ).first()


def unfinished(s: Session, table: type[Task], adapter_id: str, *where: Any) -> Task | None:
    """The adapter's queued or running task of a kind: the one a new request reuses."""
    queued_or_running = col(table.status).in_([SideWorkStatus.queued, SideWorkStatus.running])
    return newest(s, table, adapter_id, queued_or_running, *where)


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

# Ollama's Go templates for the chat templates Tuneboard recognises, each rendering the same prompt
# text as the model's own Jinja template (less the BOS token, which the runtime adds from the
# GGUF's tokenizer settings). tests/services/test_modelfile_templates.py renders both and compares.
GO_TEMPLATES = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
    ),
    "llama3": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # Mistral's [INST] format: the system prompt goes into the last user turn, as its template does.
    "mistral": (
        '{{- range $i, $_ := .Messages }}{{- if eq .Role "user" }}'
        "{{- if and (eq (len (slice $.Messages $i)) 1) $.System }}[INST] {{ $.System }}\n\n"
        "{{ .Content }}[/INST]"
        "{{- else }}[INST] {{ .Content }}[/INST]{{ end }}"
        '{{- else if eq .Role "assistant" }} {{ .Content }}</s>'
        "{{- end }}{{- end }}"
    ),
    # Gemma has no system role: its template opens the first user turn with the system text.
    "gemma": (
        '{{- $prev := "" }}{{- range .Messages }}'
        '{{- if eq .Role "system" }}<start_of_turn>user\n{{ .Content }}\n\n'
        '{{ else if eq .Role "user" }}{{ if ne $prev "system" }}<start_of_turn>user\n{{ end }}'
        "{{ .Content }}<end_of_turn>\n"
        '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n'
        "{{ end }}{{ $prev = .Role }}{{- end }}<start_of_turn>model\n"
    ),
}
STOPS = {
    "chatml": ["<|im_end|>", "<|im_start|>"],
    "llama3": ["<|eot_id|>", "<|start_header_id|>"],
    "mistral": ["</s>", "[INST]"],
    "gemma": ["<end_of_turn>"],
}
FAMILY_NAMES = {
    "chatml": "ChatML (Qwen 2.5/3, SmolLM, Tuneboard's default)",
    "llama3": "Llama 3",
    "mistral": "Mistral [INST]",
    "gemma": "Gemma",
}


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


def template_family(template: str) -> str | None:
    """Which Go template renders this Jinja chat template's prompts, or None (untranslatable)."""
    if "<|im_start|>" in template and "<|im_end|>" in template:
        return "chatml"
    if "<|start_header_id|>" in template and "<|eot_id|>" in template:
        return "llama3"
    if "<start_of_turn>" in template and "<end_of_turn>" in template:
        return "gemma"
    if "[INST]" in template and "[/INST]" in template:
        return "mistral"
    return None


def template_lines(template: str) -> tuple[str, str, list[str]]:
    """(family or "other"/"none", a note for the user, the Modelfile's TEMPLATE and stop lines)."""
    family = template_family(template)
    if family is None:
        note = (
            "This adapter's chat template is not one Tuneboard translates to Ollama's Go template "
            "(Llama 3, ChatML, Mistral, Gemma). Use a GGUF export instead: it carries the Jinja "
            "template itself, which llama.cpp applies as it is."
            if template
            else "This adapter has no chat template; Ollama will use the base model's."
        )
        return ("other" if template else "none"), note, ["# " + note]
    note = f"The training chat template ({FAMILY_NAMES[family]}) is converted below."
    if family == "llama3" and "Cutting Knowledge Date" in template:
        note += (
            " Llama 3.1 and later also write a knowledge-date header into the system turn, which "
            "this TEMPLATE leaves out; the GGUF's embedded template keeps it."
        )
    lines = [f'TEMPLATE """{GO_TEMPLATES[family]}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in STOPS[family]]
    return family, note, lines


def ollama_modelfile(db: Database, settings: Settings, adapter: Adapter) -> Modelfile:
    """A Modelfile for `ollama create` from the adapter zip: the base, this adapter, the template.

    The training chat template is translated to Ollama's Go template for the families in
    `GO_TEMPLATES`; another template is said plainly, with a GGUF export offered instead.
    """
    with db.read() as s:
        base = s.get(BaseModelEntry, adapter.base_model)
    base_source = base.source if base is not None else adapter.base_model
    is_local = base.is_local if base is not None else False
    template = chat_template_of(adapter_dir(settings, adapter))
    lines = [f"# {adapter.name} ({adapter.id}), a LoRA adapter trained by Tuneboard"]
    if is_local:
        lines += [
            f"# The base model is a folder on the Tuneboard server ({Path(base_source).name});",
            "# copy it next to this file as ./base",
        ]
    else:
        lines += [
            f"# The base model {base_source}, downloaded next to this file with",
            f"#   hf download {base_source} --local-dir ./base",
        ]
    lines += ["FROM ./base", "ADAPTER ./"]
    kind, note, template_part = template_lines(template)
    lines += template_part
    return Modelfile("\n".join(lines) + "\n", kind, note, base_source)


def gguf_modelfile(adapter: Adapter, gguf_name: str, template: str) -> Modelfile:
    """The Modelfile of a GGUF bundle: FROM the GGUF beside it, never a path on the server."""
    kind, note, template_part = template_lines(template)
    lines = [
        f"# {adapter.name} ({adapter.id}), merged and converted to GGUF by Tuneboard",
        f"FROM ./{gguf_name}",
        *template_part,
    ]
    return Modelfile("\n".join(lines) + "\n", kind, note, f"./{gguf_name}")


# --- merge requests (run by a worker: worker/merge.py) -----------------------------------------


def request_merge(db: Database, adapter_id: str) -> MergeRequest:
    """Queue a merge of the adapter into its bf16 base; an unfinished request is reused.

    A request whose worker died is requeued (or failed after its last attempt) first, so a merge
    killed mid-way is never handed back as "running" forever.
    """
    get_adapter(db, adapter_id)
    side_queue.requeue_expired(db)
    with db.write() as s:
        existing = unfinished(s, MergeRequest, adapter_id)
        if existing is not None:
            return existing
        merge = MergeRequest(adapter_id=adapter_id)
        s.add(merge)
        s.flush()
        s.refresh(merge)
        return merge


def latest_merge(db: Database, adapter_id: str) -> MergeRequest | None:
    with db.read() as s:
        return newest(s, MergeRequest, adapter_id)


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


# --- exports: GGUF, LoRA GGUF, merged model (built by a worker: worker/export.py) ----------------


class ExportRequest(BaseModel):
    """`POST /api/adapters/{id}/exports`: what to build."""

    model_config = ConfigDict(extra="forbid")

    kind: ExportKindName = Field(
        description="gguf: the merged model as a GGUF; gguf-lora: the adapter as a GGUF for llama.cpp's --lora; merged: the merged safetensors model"
    )
    quantization: Quantization = Field(
        default="f16", description="f16, q8_0 or q4_K_M (a LoRA GGUF: f16 or q8_0)"
    )


def export_json(export: ModelExport) -> dict[str, Any]:
    """One export as the API and the page show it."""
    return {
        "id": export.id,
        "adapter_id": export.adapter_id,
        "kind": export.kind,
        "quantization": export.quantization,
        "status": export.status,
        "attempt": export.attempt,
        "stage": export.stage,
        "progress_done": export.progress_done,
        "progress_total": export.progress_total,
        "estimate_bytes": export.estimate_bytes,
        "size_bytes": export.size_bytes,
        "sha256": export.sha256,
        "check": {"status": export.check_status, "details": export.check_details or {}},
        "notice": export.notice,
        "error": side_queue.error_of(export),
        "created_at": export.created_at,
        "finished_at": export.finished_at,
    }


def list_exports(db: Database, adapter_id: str) -> list[ModelExport]:
    """The adapter's exports, newest first; expired ones are requeued (or failed) first, so none
    stays "running" after its worker died."""
    get_adapter(db, adapter_id)
    side_queue.requeue_expired(db)
    with db.read() as s:
        return list(
            s.exec(
                select(ModelExport)
                .where(ModelExport.adapter_id == adapter_id)
                .order_by(col(ModelExport.id).desc())
            ).all()
        )


def check_convertible(base: BaseModelEntry) -> None:
    """Refuse a GGUF of a base whose architecture (its folder's config.json) llama.cpp's converter
    has no class for. Where the converter is not installed beside the web app (the worker runs on
    another machine), the worker checks before it builds."""
    supported = export_kinds.converter_architectures()
    architecture = export_kinds.base_architecture(base.source, base.architecture)
    if supported is not None and architecture not in supported:
        message, hint = export_kinds.unsupported_architecture(architecture, base.name)
        raise UserError(message, hint, status_code=422, code="unsupported_architecture")


def request_export(
    db: Database, settings: Settings, adapter_id: str, request: ExportRequest
) -> ModelExport:
    """Queue an export after checking what can be checked here: the quantisation fits the kind,
    llama.cpp's converter knows the base's architecture, and the data dir has the disk the build
    needs. An unfinished identical request is reused."""
    adapter = get_adapter(db, adapter_id)
    folder = adapter_dir(settings, adapter)
    quantization: str | None = request.quantization
    if request.kind == "merged":
        quantization = None
    elif request.kind == "gguf-lora" and quantization not in export_kinds.LORA_QUANTIZATIONS:
        raise UserError(
            f"A LoRA GGUF can be {' or '.join(export_kinds.LORA_QUANTIZATIONS)}, not "
            f"{quantization}: llama.cpp's LoRA converter writes no k-quants.",
            "Choose f16 or q8_0, or export the merged model as a q4_K_M GGUF.",
            status_code=422,
            code="invalid",
        )
    with db.read() as s:
        base = s.get(BaseModelEntry, adapter.base_model)
    if request.kind != "merged" and base is not None:
        check_convertible(base)
    parameters = base.parameters if base is not None else 0
    weights = folder / "adapter_model.safetensors"
    adapter_bytes = weights.stat().st_size if weights.is_file() else 0
    need = export_kinds.disk_needed(request.kind, quantization, parameters, adapter_bytes)
    free = shutil.disk_usage(settings.resolved_data_dir).free
    if need > free:
        gib = 1024**3
        raise DiskFull(
            f"This export needs about {need / gib:.1f} GiB free while it is built; the data dir "
            f"has {free / gib:.1f} GiB.",
            "Free disk (delete old exports or checkpoints), then start the export again.",
        )
    side_queue.requeue_expired(db)
    with db.write() as s:
        existing = unfinished(
            s,
            ModelExport,
            adapter_id,
            ModelExport.kind == request.kind,
            ModelExport.quantization == quantization,
        )
        if existing is not None:
            return existing
        export = ModelExport(
            adapter_id=adapter_id,
            kind=request.kind,
            quantization=quantization,
            estimate_bytes=export_kinds.estimate_bytes(
                request.kind, quantization, parameters, adapter_bytes
            ),
        )
        s.add(export)
        s.flush()
        s.refresh(export)
        return export


def get_export(db: Database, export_id: int) -> ModelExport:
    with db.read() as s:
        export = s.get(ModelExport, export_id)
    if export is None:
        raise NotFound(
            f"There is no export {export_id}.", "Exports are listed on the adapter page."
        )
    return export


def export_file(settings: Settings, export: ModelExport) -> Path:
    """The finished export's file (or folder): only a succeeded export's, under runs/."""
    if export.status != SideWorkStatus.succeeded or not export.output_path:
        raise NotFound(
            f"Export {export.id} is not ready ({export.status}).",
            "Wait for it to finish, or start it again on the adapter page.",
        )
    path = (settings.resolved_data_dir / export.output_path).resolve()
    if not path.is_relative_to(settings.runs_dir.resolve()) or not path.exists():
        raise NotFound(f"The file of export {export.id} is missing.", "Delete it and export again.")
    return path


def export_download(
    db: Database, settings: Settings, export_id: int
) -> tuple[str, Path | Iterator[bytes]]:
    """(file name, the GGUF file or a zip stream of a merged model's folder)."""
    export = get_export(db, export_id)
    path = export_file(settings, export)
    name = export_kinds.file_name(export.adapter_id, export.kind, export.quantization)
    if path.is_dir():
        files: list[tuple[str, Path | bytes]] = [
            (p.name, p) for p in sorted(path.iterdir()) if p.is_file()
        ]
        return f"{name}.zip", zip_stream(files)
    return name, path


def ollama_bundle(db: Database, settings: Settings, export_id: int) -> tuple[str, Iterator[bytes]]:
    """A zip that runs in Ollama on another machine as it is: the GGUF, a Modelfile whose FROM
    is that GGUF (`./<name>`), and a README saying how, with the check's result."""
    export = get_export(db, export_id)
    if export.kind != "gguf":
        raise UserError(
            "An Ollama bundle is made from a GGUF of the merged model.",
            "Export the adapter as a GGUF (f16, q8_0 or q4_K_M) and download its bundle.",
            status_code=422,
            code="invalid",
        )
    path = export_file(settings, export)
    adapter = get_adapter(db, export.adapter_id)
    name = export_kinds.file_name(adapter.id, export.kind, export.quantization)
    modelfile = gguf_modelfile(adapter, name, chat_template_of(adapter_dir(settings, adapter)))
    readme = "\n".join(
        [
            f"# {adapter.name} ({adapter.id}) for Ollama and llama.cpp",
            "",
            f"{name}: the adapter merged into {adapter.base_model}, as a {export.quantization} "
            f"GGUF (sha256 {export.sha256}). Its chat template is embedded in it.",
            "",
            "Ollama, in this folder:",
            f"    ollama create {adapter.id} -f Modelfile",
            f"    ollama run {adapter.id}",
            "",
            "llama.cpp:",
            f"    llama-cli -m {name} --jinja -cnv",
            "",
            f"Modelfile: {modelfile.note}",
            f"Tuneboard's check of its answers: {export.check_status}.",
            "",
        ]
    )
    files: list[tuple[str, Path | bytes]] = [
        (name, path),
        ("Modelfile", modelfile.text.encode()),
        ("README.md", readme.encode()),
    ]
    return f"{adapter.id}-{export.quantization}-ollama.zip", zip_stream(files)


def delete_export(db: Database, settings: Settings, export_id: int) -> None:
    """Delete a finished export and its file, to free disk. One being built is refused."""
    export = get_export(db, export_id)
    if export.status in (SideWorkStatus.queued, SideWorkStatus.running):
        raise Conflict(
            f"Export {export_id} is {export.status}.",
            "Wait for it to finish (or fail), then delete it.",
        )
    if export.output_path:
        path = (settings.resolved_data_dir / export.output_path).resolve()
        if path.is_relative_to(settings.runs_dir.resolve()):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    with db.read() as s:
        adapter = s.get(Adapter, export.adapter_id)
    if adapter is not None:  # what a failed build may have left: never offered, now gone too
        shutil.rmtree(settings.layout.export_staging(adapter.job_id, export_id), ignore_errors=True)
    with db.write() as s:
        row = s.get(ModelExport, export_id)
        if row is not None:
            s.delete(row)

"""Build an export of an adapter: the worker side of the exports on the adapter page.

The side-work thread (worker/side_work.py) claims an export from `app.side_queue` and runs
`python -m worker.export --task-id N --attempt A`. A GGUF of the merged model merges the adapter
into its base on the CPU (worker/merge.py's `merged_model`, in the checkpoint's own dtype), runs
llama.cpp's own converter (worker/gguf_converter.py) and, for q4_K_M, llama.cpp's quantiser; a
LoRA GGUF runs llama.cpp's LoRA converter on the adapter; a merged export keeps the safetensors
folder. Everything is written under a staging name, fsynced and renamed into place, so a build
that fails (a full disk, a killed worker) never leaves a file that is offered for download.

Then the check (worker/export_check.py): the GGUF answers a few held-out prompts of the job's
dataset, with the chat template embedded in it, and its answers are compared with the adapter's
own. Progress (stage, steps) goes to the `model_exports` row the page polls; every write is fenced
by the claim's attempt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app import export_kinds, side_queue
from app.db import Database
from app.models import Adapter, BaseModelEntry, ModelExport, SideWorkStatus
from app.settings import Settings
from worker import gguf_converter
from worker.data import has_generation_markers
from worker.progress_meter import bytes_in, writing
from worker.side_work import child_main, run_pending

log = logging.getLogger("tuneboard.export")

HASH_CHUNK = 1024 * 1024
# The steps of each kind, as the page's progress bar counts them.
STEPS = {
    "gguf": ("merging the adapter", "converting to GGUF", "quantizing", "checking the answers"),
    "gguf-lora": ("converting the adapter to GGUF", "checking the answers"),
    "merged": ("merging the adapter", "saving"),
}


class ExportFailed(Exception):
    """An export that cannot be built, said in the user's words: (kind, message, hint)."""

    def __init__(self, kind: str, message: str, hint: str) -> None:
        super().__init__(message)
        self.kind, self.message, self.hint = kind, message, hint


@dataclass
class Build:
    """What one claimed export works on."""

    export: ModelExport
    adapter: Adapter
    base: BaseModelEntry
    adapter_dir: Path
    staging: Path
    final: Path


def _load(settings: Settings, db: Database, claim: side_queue.SideClaim) -> Build:
    from worker.merge import checked_adapter_dir, registered_adapter

    export, adapter, base = registered_adapter(db, ModelExport, claim.task_id)
    name = export_kinds.file_name(adapter.id, export.kind, export.quantization)
    layout = settings.layout
    return Build(
        export=export,
        adapter=adapter,
        base=base,
        adapter_dir=checked_adapter_dir(settings, adapter),
        staging=layout.export_staging(adapter.job_id, claim.task_id),
        final=layout.export_path(adapter.job_id, claim.task_id, name),
    )


def check_convertible(base: BaseModelEntry) -> None:
    """Refuse, before any work, a base whose architecture llama.cpp's converter does not know."""
    architecture = export_kinds.base_architecture(base.source, base.architecture)
    if architecture not in gguf_converter.supported_architectures():
        message, hint = export_kinds.unsupported_architecture(architecture, base.name)
        raise ExportFailed("unsupported_architecture", message, hint)


def check_disk(build: Build) -> None:
    adapter_bytes = (build.adapter_dir / "adapter_model.safetensors").stat().st_size
    export = build.export
    need = export_kinds.disk_needed(
        export.kind, export.quantization, build.base.parameters, adapter_bytes
    )
    build.final.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(build.final.parent).free
    if need > free:
        gib = 1024**3
        raise ExportFailed(
            "disk_full",
            f"This export needs about {need / gib:.1f} GiB free while it is built; the data dir "
            f"has {free / gib:.1f} GiB.",
            "Free disk (delete old exports or checkpoints), then start the export again.",
        )


def _run(command: list[str], what: str) -> None:
    """Run a llama.cpp script; its last lines become the error when it fails."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        if "No space left on device" in tail:
            raise OSError(28, f"No space left on device while {what}")
        raise ExportFailed(
            "conversion_failed",
            f"llama.cpp's converter failed while {what}: {tail}",
            "The worker's log (worker-side.log in the data dir) has its whole output.",
        )


def _clean_template(folder: Path) -> None:
    """Drop transformers' `{% generation %}` markers from the chat template that goes into the
    GGUF: they mark the trained tokens for transformers only, and llama.cpp's Jinja engine, like
    Ollama's, does not know them."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
        if has_generation_markers(template):
            jinja.write_text(strip_generation_markers(template), encoding="utf-8")


def strip_generation_markers(template: str) -> str:
    import re

    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


def _base_folder(build: Build) -> Path:
    """The base model's folder: its own, or the hub cache's snapshot of its id."""
    from worker.training.loading import resolve_model

    return Path(resolve_model(build.base.source))


def _save_tokenizer(build: Build, folder: Path) -> Any:
    """The adapter's tokenizer (the chat template it was trained with) saved into `folder` as
    llama.cpp's converter reads it; returns the tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        build.adapter_dir, trust_remote_code=build.base.trust_remote_code
    )
    tokenizer.save_pretrained(folder)
    for name in ("tokenizer.model", "train_config.json"):
        # A SentencePiece model the tokenizer no longer points at (the converter reads it).
        for source in (build.adapter_dir / name, _base_folder(build) / name):
            if source.is_file() and not (folder / name).is_file():
                shutil.copyfile(source, folder / name)
    declare_added_tokens(folder, tokenizer)
    return tokenizer


def declare_added_tokens(folder: Path, tokenizer: Any) -> None:
    """Write the tokenizer's added tokens into its tokenizer_config.json's `added_tokens_decoder`.

    transformers 5 keeps them only in tokenizer.json, while llama.cpp's converter reads a
    SentencePiece tokenizer's added tokens (ChatML's `<|im_start|>`, Gemma's turn markers) from
    tokenizer_config.json alone: without them it writes each as a normal piece, and llama.cpp
    then cuts `<|im_start|>` in the rendered prompt into `<`, `|`, `im`, ... so the GGUF reads
    another prompt than the adapter was trained on.
    """
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    if not added:
        return
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    config["added_tokens_decoder"] = {
        str(token_id): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for token_id, token in sorted(added.items())
    }
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def _save_merged(build: Build, folder: Path, progress: Any, dtype: Any) -> None:
    from worker.merge import merged_model

    model = merged_model(build.base, build.adapter_dir, dtype, progress, "loading the base model")
    with writing(progress, "saving the merged model", folder):
        model.save_pretrained(folder, safe_serialization=True)
    _save_tokenizer(build, folder)


def _expected_bytes(build: Build, quantization: str) -> int:
    """About the size of the base's weights as a GGUF at `quantization` (0: unknown)."""
    return int(build.base.parameters * export_kinds.BYTES_PER_WEIGHT[quantization])


def quantize(source: Path, target: Path, quantization: str) -> None:
    """llama.cpp's quantiser (llama-cpp-python's binding of llama_model_quantize)."""
    import llama_cpp

    ftype = {
        "q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    }
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype[quantization]
    params.nthread = max(1, min(os.cpu_count() or 1, 8))
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        if shutil.disk_usage(target.parent).free < source.stat().st_size // 2:
            raise OSError(28, "No space left on device while quantizing")
        raise ExportFailed(
            "quantization_failed",
            f"llama.cpp could not quantize the GGUF to {quantization}.",
            "The worker's log (worker-side.log in the data dir) has llama.cpp's output.",
        )


def build_gguf(build: Build, progress: Any) -> Path:
    """The merged model as a GGUF at the export's quantisation; returns the staged file."""
    import torch  # noqa: F401  (the merge's dtype "auto" needs it loaded)

    quantization = build.export.quantization or "f16"
    merged = build.staging / "merged"
    progress(stage=STEPS["gguf"][0], progress_done=0)
    _save_merged(build, merged, progress, "auto")
    _clean_template(merged)
    progress(stage=STEPS["gguf"][1], progress_done=1)
    converted = build.staging / ("model-f16.gguf" if quantization != "q8_0" else "model-q8_0.gguf")
    outtype = "q8_0" if quantization == "q8_0" else "f16"
    converter = gguf_converter.script("convert_hf_to_gguf.py")
    command = [sys.executable, str(converter), str(merged), "--outfile", str(converted)]
    with writing(progress, STEPS["gguf"][1], converted, _expected_bytes(build, outtype)):
        _run([*command, "--outtype", outtype], "converting the merged model")
    shutil.rmtree(merged)
    if quantization == "q4_K_M":
        progress(stage=STEPS["gguf"][2], progress_done=2)
        quantized = build.staging / "model-q4_K_M.gguf"
        # llama.cpp's quantiser writes each tensor as it is done: the file grows as it works.
        with writing(progress, STEPS["gguf"][2], quantized, _expected_bytes(build, quantization)):
            quantize(converted, quantized, quantization)
        converted.unlink()
        converted = quantized
    return converted


def build_lora_gguf(build: Build, progress: Any) -> Path:
    progress(stage=STEPS["gguf-lora"][0], progress_done=0)
    quantization = build.export.quantization or "f16"
    out = build.staging / f"lora-{quantization}.gguf"
    converter = gguf_converter.script("convert_lora_to_gguf.py")
    command = [sys.executable, str(converter), str(build.adapter_dir), "--outfile", str(out)]
    command += ["--outtype", quantization, "--base", str(build.base.source)]
    with writing(progress, STEPS["gguf-lora"][0], out):
        _run(command, "converting the adapter")
    return out


def base_gguf(build: Build, progress: Any) -> Path:
    """The base model as an f16 GGUF in the staging folder: what a LoRA GGUF is checked on. Its
    weights are the base's own (linked, not copied); its tokenizer and chat template are the
    adapter's, saved as for a merged GGUF, so the check asks what the adapter was trained on."""
    folder = build.staging / "base"
    folder.mkdir()
    for source in _base_folder(build).iterdir():
        if source.is_file() and not source.name.startswith(("tokenizer", "special_tokens")):
            (folder / source.name).symlink_to(source.resolve())
    for name in ("chat_template.jinja", "chat_template.json", "added_tokens.json"):
        (folder / name).unlink(missing_ok=True)
    _save_tokenizer(build, folder)
    _clean_template(folder)
    out = build.staging / "base-f16.gguf"
    converter = gguf_converter.script("convert_hf_to_gguf.py")
    command = [sys.executable, str(converter), str(folder), "--outfile", str(out)]
    with writing(progress, "converting the base for the check", out, _expected_bytes(build, "f16")):
        _run([*command, "--outtype", "f16"], "converting the base model for the check")
    shutil.rmtree(folder)
    return out


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def publish(staged: Path, final: Path) -> None:
    """fsync the finished file or folder, then rename it into place (atomic on one disk)."""
    if staged.is_dir():
        _fsync_tree(staged)
    else:
        with staged.open("rb+") as handle:
            os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(staged, final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def sha256_of(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def run_export(settings: Settings, db: Database, claim: side_queue.SideClaim) -> dict[str, Any]:
    """Build one claimed export; returns the fields its row is finished with."""
    from worker.export_check import check_gguf

    build = _load(settings, db, claim)
    kind = build.export.kind

    def progress(**fields: object) -> None:
        side_queue.update_progress(db, claim, **fields)

    progress(stage="checking the base and the disk", progress_total=len(STEPS[kind]))
    if kind != "merged":
        check_convertible(build.base)
    check_disk(build)
    shutil.rmtree(build.staging, ignore_errors=True)
    build.staging.mkdir(parents=True)
    check: dict[str, Any] = {"status": "not run", "details": {}}
    try:
        if kind == "merged":
            progress(stage=STEPS["merged"][0], progress_done=0)
            folder = build.staging / "merged"
            _save_merged(build, folder, progress, "auto")
            progress(stage=STEPS["merged"][1], progress_done=1)
            publish(folder, build.final)
        else:
            staged = (
                build_gguf(build, progress) if kind == "gguf" else build_lora_gguf(build, progress)
            )
            progress(stage=STEPS[kind][-1], progress_done=len(STEPS[kind]) - 1)
            base_file = base_gguf(build, progress) if kind == "gguf-lora" else None
            # Checked where it was built: a worker killed during the check leaves no file in
            # place, only the staging folder (never offered; the next attempt starts afresh).
            check = check_gguf(settings, db, build.adapter, build.base, staged, base_file, progress)
            publish(staged, build.final)
    except BaseException:
        if build.final.exists() and kind != "merged":
            build.final.unlink()  # a failed build offers nothing, not even a finished file
        raise
    finally:
        shutil.rmtree(build.staging, ignore_errors=True)
    return {
        "stage": "done",
        "progress_done": len(STEPS[kind]),
        "output_path": str(build.final.relative_to(settings.resolved_data_dir)),
        "size_bytes": bytes_in(build.final),
        "sha256": sha256_of(build.final),
        "check_status": check["status"],
        "check_details": check["details"],
    }


def run_claimed_export(settings: Settings, db: Database, claim: side_queue.SideClaim) -> bool:
    """Run a claimed export and record how it ended. False if the claim went stale meanwhile."""
    try:
        fields = run_export(settings, db, claim)
    except ExportFailed as exc:
        log.warning("export %s refused: %s", claim.task_id, exc.message)
        return side_queue.fail(db, claim, exc, stage="failed")
    except Exception as exc:
        log.exception("export %s failed", claim.task_id)
        from app.faults import is_disk_full

        if is_disk_full(exc):
            kind, message = "disk_full", f"The disk filled up while the export was built: {exc}"
            hint = "Free disk (delete old exports or checkpoints), then start the export again."
        elif isinstance(exc, MemoryError):
            kind, message = "out_of_memory", "The machine ran out of memory during the export."
            hint = "Merging needs the whole base model in RAM on the worker."
        else:
            kind, message = "export_failed", f"The export failed: {exc}"
            hint = "Look at the worker's log; the adapter's files and base model must exist."
        return side_queue.finish(
            db,
            claim,
            SideWorkStatus.failed,
            stage="failed",
            error_kind=kind,
            error_message=message,
            error_hint=hint,
        )
    return side_queue.finish(db, claim, SideWorkStatus.succeeded, **fields)


def run_pending_exports(settings: Settings, worker_id: str | None = None) -> int:
    """Claim and run every queued export in this process; returns how many ran."""
    return run_pending(settings, "export", run_claimed_export, worker_id)


def main(argv: list[str] | None = None) -> int:
    return child_main("export", run_claimed_export, argv, "Build a claimed export of an adapter.")


if __name__ == "__main__":
    raise SystemExit(main())

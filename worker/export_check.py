"""The check of a GGUF export: does it answer as the adapter does in the Playground?

A few held-out prompts of the job's dataset (`app.dataset_store` eval rows; its training rows when
the job held none out, said so) are answered twice with greedy decoding: by the adapter through the
Playground's own engine (worker/inference.py: transformers + peft), and by the GGUF loaded with
llama.cpp (llama-cpp-python, the package that built it) with the chat template embedded in the
GGUF. "match" when every answer is the same text from the same prompt tokens (llama.cpp's
tokenizer against the adapter's), "differs" (with both answers) when one is not,
"not run" with the reason when the check could not run. A k-quant of a tiny model may honestly
differ: the page shows the answers side by side.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from app.dataset_errors import DatasetError
from app.dataset_store import iter_rows
from app.db import Database
from app.generation import GenerationRequest
from app.models import Adapter, BaseModelEntry, Job
from app.settings import Settings
from worker.progress_meter import WriteProgress, nothing_said, reading

log = logging.getLogger("tuneboard.export.check")

PROMPTS = 3
MAX_NEW_TOKENS = 48
CONTEXT_TOKENS = 2048
STAGE = "checking the answers"  # the export's last step, whose stage says where the check is


def _prompt_of(row: dict[str, Any]) -> list[dict[str, str]] | None:
    """The conversation up to its first assistant turn (a chat row), or a preference row's
    prompt; None for a row with no user turn to ask."""
    messages = row.get("messages")
    if not isinstance(messages, list):
        prompt = row.get("prompt")
        if isinstance(prompt, list):
            messages = [*prompt, {"role": "assistant", "content": ""}]
        elif isinstance(prompt, str) and prompt:
            messages = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": ""},
            ]
        else:
            return None
    asked: list[dict[str, str]] = []
    for message in messages:
        if message.get("role") == "assistant":
            break
        asked.append({"role": str(message.get("role")), "content": str(message.get("content"))})
    return asked if any(m["role"] == "user" for m in asked) else None


def held_out_prompts(
    settings: Settings, db: Database, adapter: Adapter, count: int = PROMPTS
) -> tuple[list[list[dict[str, str]]], str]:
    """Up to `count` prompts of the job's held-out rows, and where they came from."""
    with db.read() as s:
        job = s.get(Job, adapter.job_id)
    if job is None:
        return [], f"job {adapter.job_id} is gone"
    fraction = job.config.get("eval_fraction") if isinstance(job.config, dict) else None
    found: list[list[dict[str, str]]] = []
    source = "held-out rows of the job's dataset"
    for split in ("eval", "train"):
        for row in iter_rows(settings, job.dataset_id, split, eval_fraction=fraction):
            prompt = _prompt_of(row)
            if prompt is not None and prompt not in found:
                found.append(prompt)
            if len(found) >= count:
                return found, source
        if found:
            return found, source
        source = "training rows of the job's dataset (the job held no rows out)"
    return found, source


def adapter_answers(
    settings: Settings,
    db: Database,
    adapter: Adapter,
    base: BaseModelEntry,
    prompts: list,
    progress: WriteProgress = nothing_said,
) -> list[tuple[str, list[int]]]:
    """The adapter's greedy answers, from the Playground's engine, each with the token ids its
    tokenizer cut the prompt into."""
    from worker.inference import Engine

    engine = Engine(settings, db)
    answers = []
    with reading(progress, f"{STAGE}: loading the adapter"):
        tokenizer = engine.prepare(base, adapter)
    for number, prompt in enumerate(prompts, 1):
        progress(stage=f"{STAGE}: the adapter's answer {number} of {len(prompts)}")
        request = GenerationRequest(
            model=adapter.id, messages=prompt, temperature=0, max_new_tokens=MAX_NEW_TOKENS
        )
        pieces: list[str] = []
        engine.generate(request, adapter, tokenizer, pieces.append)
        ids = tokenizer.apply_chat_template(
            request.chat(), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        answers.append(("".join(pieces).strip(), [int(i) for i in ids]))
    engine.unload()
    return answers


def gguf_replies(
    model_file: Path,
    prompts: list,
    lora_file: Path | None = None,
    progress: WriteProgress = nothing_said,
) -> list[tuple[str, list[int]]]:
    """The GGUF's greedy answers with its embedded chat template (llama-cpp-python), each with
    the token ids llama.cpp cut the rendered prompt into."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    kwargs: dict[str, Any] = {}
    if lora_file is not None:
        kwargs["lora_path"] = str(lora_file)
    with reading(progress, f"{STAGE}: loading the GGUF"):
        llm = Llama(
            model_path=str(model_file),
            n_ctx=CONTEXT_TOKENS,
            n_threads=max(1, min(os.cpu_count() or 1, 8)),
            seed=0,
            verbose=False,
            **kwargs,
        )
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise ValueError("the GGUF carries no chat template (tokenizer.chat_template)")
    eos = llm.token_eos()
    eos_text = llm.detokenize([eos], special=True).decode("utf-8", "replace") if eos >= 0 else ""
    formatter = Jinja2ChatFormatter(template, eos_token=eos_text, bos_token="")
    answers = []
    for number, prompt in enumerate(prompts, 1):
        progress(stage=f"{STAGE}: the GGUF's answer {number} of {len(prompts)}")
        rendered = formatter(messages=prompt)
        tokens = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=False, special=True)
        out: list[int] = []
        llm.reset()
        for token in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            if token == eos or llm.detokenize([token], special=True).decode("utf-8", "replace") in (
                rendered.stop or []
            ):
                break
            out.append(token)
            if len(out) >= MAX_NEW_TOKENS:
                break
        answers.append((llm.detokenize(out).decode("utf-8", "replace").strip(), list(tokens)))
    llm.close()
    return answers


def check_gguf(
    settings: Settings,
    db: Database,
    adapter: Adapter,
    base: BaseModelEntry,
    model_file: Path,
    base_file: Path | None = None,
    progress: WriteProgress = nothing_said,
) -> dict[str, Any]:
    """{"status": "match" | "differs" | "not run", "details": {...}} for a GGUF export; for a LoRA
    GGUF `model_file` is the LoRA and `base_file` the base's GGUF it is loaded onto. `progress`
    hears where it is: each load (bytes read), each answer (MAX_NEW_TOKENS tokens at most)."""
    try:
        prompts, source = held_out_prompts(settings, db, adapter)
    except DatasetError as exc:
        return {"status": "not run", "details": {"reason": f"the dataset: {exc}"}}
    if not prompts:
        return {"status": "not run", "details": {"reason": "the dataset has no prompt to ask"}}
    try:
        expected = adapter_answers(settings, db, adapter, base, prompts, progress)
        if base_file is not None:
            got = gguf_replies(base_file, prompts, lora_file=model_file, progress=progress)
        else:
            got = gguf_replies(model_file, prompts, progress=progress)
    except Exception as exc:
        log.exception("the check of %s could not run", model_file.name)
        return {"status": "not run", "details": {"reason": str(exc) or type(exc).__name__}}
    answers = []
    for prompt, (want, want_ids), (have, have_ids) in zip(prompts, expected, got, strict=True):
        answer: dict[str, Any] = {
            "prompt": prompt[-1]["content"],
            "adapter": want,
            "gguf": have,
            # The same prompt tokens, or the GGUF reads another prompt than the adapter was
            # trained on (its tokenizer lost a special token): a difference even where the
            # answers happen to agree.
            "same_prompt_tokens": want_ids == have_ids,
            "same": want == have and want_ids == have_ids,
        }
        if want_ids != have_ids:
            answer["prompt_tokens"] = {"adapter": want_ids, "gguf": have_ids}
        answers.append(answer)
    same = all(a["same"] for a in answers)
    return {
        "status": "match" if same else "differs",
        "details": {"source": source, "decoding": "greedy", "answers": answers},
    }

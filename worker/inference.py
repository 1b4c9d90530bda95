"""The playground's inference server: one base model on the worker's GPU, LoRA adapters by name,
streamed generation over plain HTTP.

    python -m worker.inference --host 127.0.0.1 --port 8101 [--worker-id ID]

Stdlib `http.server` only (the GPU machine needs no web stack). The web process is the only
client; it names models the way the database does (a registered base model's name, or an
adapter id such as "job-12"), and this server resolves them to files itself, so no path ever
comes from a request.

    GET  /status   what is loaded, whether a generation runs, the last generation's outcome
    POST /generate {"model", "messages", "temperature", "top_p", "max_new_tokens", "stop", "seed"}
                   -> text/event-stream: `data: {"token": "..."}` lines, then
                      `data: {"done": true, "finish_reason", "prompt_tokens", "completion_tokens"}`
                   errors before the stream starts: JSON {"error": {code, message, hint}}
    POST /complete {"model", "prompt", ..., "echo", "logprobs", "seed"} (app/generation.py's
                   CompletionRequest; worker/completion.py) -> the same stream, each token event
                   `{"token", "logprob", "top", "prompt"}` (the prompt's first when echoed)
    POST /unload   frees the model (the worker calls it before a training job needs the GPU)

Every request needs `Authorization: Bearer <secret>`: a secret per server that only the worker
and the web server know (it is written to the worker's database row), whether or not the operator
set a token; a Host that is not loopback, any Origin and a POST that is not JSON are refused.

One base model stays loaded; adapters are loaded onto it with PEFT (`load_adapter`, then
`set_adapter`) and "base only" runs under `disable_adapter()`, so switching never reloads the
base. Generations are serialised by one lock (one GPU). A client that goes away stops the
generation at the next token: the failed write sets an Event a StoppingCriteria checks.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import ValidationError
from sqlmodel import col, select
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from app.db import Database
from app.generation import CompletionRequest, GenerationRequest
from app.models import Adapter, BaseModelEntry, Job, JobStatus, Worker
from app.settings import LOOPBACK_NAMES, Settings, host_name
from worker.completion import Completion, CompletionError, held_back
from worker.data import use_chatml_if_missing

log = logging.getLogger("tuneboard.inference")

MAX_BODY_BYTES = 1_000_000
SECRET_VARIABLE = "TUNEBOARD_INFERENCE_SECRET"
MAX_LOADED_ADAPTERS = 8
LOCK_WAIT_SECONDS = 120.0
# End-of-turn tokens of the common chat templates; whichever the vocabulary has also stop.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
# Loading needs the weights plus room for activations and the KV cache of one chat.
LOAD_OVERHEAD_BYTES = 1024**3
LOAD_OVERHEAD_FACTOR = 1.2
NF4_BYTES_PER_PARAMETER = 0.56  # 4-bit weights, double-quantised scales, bf16 embeddings/norms
BF16_BYTES_PER_PARAMETER = 2.0
# Models up to this size load in bf16 when they fit; larger ones in NF4 (when bitsandbytes is here).
BF16_MAX_PARAMETERS = 4_000_000_000


class ChatInputs(NamedTuple):
    """A conversation ready to generate from (Engine.chat_inputs)."""

    tensors: dict[str, torch.Tensor]
    prompt_tokens: int
    max_new_tokens: int
    """What the answer may take: the request's, or less where the model's context ends."""


class InferenceError(Exception):
    """An error the playground shows as is: status code, code, message and what to do."""

    def __init__(self, status: int, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.hint = status, code, message, hint

    def as_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message, "hint": self.hint}}


def parse_generation_request(
    body: Any, path: str = "/generate"
) -> GenerationRequest | CompletionRequest:
    """The posted body as a GenerationRequest (`/generate`) or a CompletionRequest (`/complete`)
    (app/generation.py), or a 400 naming what is wrong."""
    kind = CompletionRequest if path == "/complete" else GenerationRequest
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the body"
        raise InferenceError(
            400, "invalid", f"{where}: {first['msg']}", "Fix the request and send it again."
        ) from exc


class _Watch(StoppingCriteria):
    """Counts generated tokens and stops the generation when `cancel` is set."""

    def __init__(self, prompt_tokens: int, cancel: threading.Event) -> None:
        self.prompt_tokens = prompt_tokens
        self.cancel = cancel
        self.generated = 0

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> bool:
        self.generated = int(input_ids.shape[-1]) - self.prompt_tokens
        return self.cancel.is_set()


ADAPTER_WEIGHTS = "adapter_model.safetensors"  # the only adapter weights ever loaded


class Engine:
    """One loaded base model with its adapters; generation under one lock."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        quantization: str = "auto",
        worker_id: str | None = None,
        device: str | None = None,
    ) -> None:
        self.settings, self.db, self.worker_id = settings, db, worker_id
        self.quantization = quantization
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.lock = threading.Lock()
        self.model: Any = None
        self.base_name: str | None = None
        self.compute_mode = ""
        self.adapters: OrderedDict[str, Path] = OrderedDict()
        self.tokenizers: dict[str, Any] = {}
        self.base_loads = 0
        self.generations = 0
        self.generating = False
        self.last_generation: dict[str, Any] | None = None

    # --- what a name means ---------------------------------------------------------------------

    def resolve(self, name: str) -> tuple[BaseModelEntry, Adapter | None]:
        with self.db.read() as s:
            adapter = s.get(Adapter, name)
            base = s.get(BaseModelEntry, adapter.base_model if adapter else name)
        if base is None and adapter is None:
            raise InferenceError(
                404,
                "model_not_found",
                f"There is no base model or adapter named {name!r}.",
                "List the models with GET /v1/models.",
            )
        if base is None:
            raise InferenceError(
                404,
                "model_not_found",
                f"Adapter {name} was trained on {adapter.base_model if adapter else '?'}, which "
                "is no longer registered.",
                "Register that base model again on the Models page.",
            )
        return base, adapter

    def adapter_dir(self, adapter: Adapter) -> Path:
        runs = self.settings.runs_dir.resolve()
        path = self.settings.layout.adapter_dir(adapter.job_id).resolve()
        if not path.is_relative_to(runs) or not (path / "adapter_config.json").is_file():
            raise InferenceError(
                404,
                "adapter_missing",
                f"The files of adapter {adapter.id} are missing.",
                "The run folder was moved or deleted; train the job again.",
            )
        if not (path / ADAPTER_WEIGHTS).is_file():
            # PEFT would fall back to adapter_model.bin, a pickle: never load one.
            raise InferenceError(
                422,
                "adapter_refused",
                f"Adapter {adapter.id} has no {ADAPTER_WEIGHTS}; only safetensors weights are "
                "loaded, never pickle files (.bin, .pt).",
                "Train the job again: Tuneboard saves adapters as safetensors.",
            )
        return path

    # --- loading -------------------------------------------------------------------------------

    def _running_job(self) -> Job | None:
        with self.db.read() as s:
            query = select(Job).where(Job.status == JobStatus.running)
            if self.worker_id:
                query = query.where(Job.worker_id == self.worker_id)
            return s.exec(query.order_by(col(Job.started_at))).first()

    def _choose_precision(self, base: BaseModelEntry) -> str:
        """bf16 or nf4 on CUDA (refusing when neither fits in the free memory); fp32 on the CPU."""
        if self.device.type != "cuda":
            return "fp32"
        has_bnb = _bitsandbytes_available()
        if self.quantization == "nf4" and has_bnb:
            wanted = ["nf4"]
        elif self.quantization == "bf16" or not has_bnb:
            wanted = ["bf16"]
        elif base.parameters > BF16_MAX_PARAMETERS:
            wanted = ["nf4"]
        else:
            wanted = ["bf16", "nf4"]
        free, _total = torch.cuda.mem_get_info(self.device)
        for precision in wanted:
            if _need_bytes(base.parameters, precision) <= free:
                return precision
        need = _need_bytes(base.parameters, wanted[-1])
        job = self._running_job()
        gib = 1024**3
        if job is not None:
            message = (
                f"The GPU is busy training job {job.id} ({job.name}): {free / gib:.1f} GiB free, "
                f"{base.name} needs about {need / gib:.1f} GiB."
            )
        else:
            message = (
                f"The GPU has {free / gib:.1f} GiB free; {base.name} needs about "
                f"{need / gib:.1f} GiB."
            )
        raise InferenceError(
            503,
            "gpu_busy",
            message,
            "Wait for it to finish, or chat with a smaller base model (the playground never "
            "takes memory a training job needs).",
        )

    def unload(self) -> None:
        self.model = None
        self.base_name = None
        self.adapters.clear()
        self.tokenizers.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _load_base(self, base: BaseModelEntry) -> None:
        self.unload()
        precision = self._choose_precision(base)
        kwargs: dict[str, Any] = {"trust_remote_code": base.trust_remote_code}
        if precision == "nf4":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            kwargs.update(dtype=torch.bfloat16, device_map={"": self.device.index or 0})
            mode = "4-bit NF4 on CUDA, bf16 compute"
        elif precision == "bf16":
            kwargs.update(dtype=torch.bfloat16, device_map={"": self.device.index or 0})
            mode = "bf16 on CUDA"
        else:
            kwargs.update(dtype=torch.float32)
            mode = "fp32 on the CPU"
        try:
            model = AutoModelForCausalLM.from_pretrained(
                base.source, use_safetensors=True, **kwargs
            )
        except torch.cuda.OutOfMemoryError as exc:
            self.unload()
            raise InferenceError(
                503,
                "gpu_busy",
                "The GPU ran out of memory while loading the model.",
                "Wait for the training job to finish, or chat with a smaller base model.",
            ) from exc
        except OSError as exc:
            raise InferenceError(
                404,
                "model_not_found",
                f"Could not load {base.name} from {base.source}: {exc}",
                "The model folder needs config.json and *.safetensors weights.",
            ) from exc
        model.eval()
        self.model, self.base_name, self.compute_mode = model, base.name, mode
        self.base_loads += 1
        log.info("loaded %s (%s)", base.name, mode)

    def _attach_adapter(self, adapter: Adapter) -> None:
        from peft import PeftModel

        if adapter.id in self.adapters:
            self.adapters.move_to_end(adapter.id)
        else:
            path = self.adapter_dir(adapter)
            if not isinstance(self.model, PeftModel):
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=adapter.id)
            else:
                self.model.load_adapter(path, adapter_name=adapter.id)
            self.model.eval()
            self.adapters[adapter.id] = path
            while len(self.adapters) > MAX_LOADED_ADAPTERS:
                oldest, _ = self.adapters.popitem(last=False)
                self.model.delete_adapter(oldest)
                self.tokenizers.pop(oldest, None)
        self.model.set_adapter(adapter.id)

    def prepare(self, base: BaseModelEntry, adapter: Adapter | None) -> Any:
        """Load what the request needs (base once, adapters onto it); return the tokenizer."""
        if self.base_name != base.name or self.model is None:
            self._load_base(base)
        if adapter is not None:
            self._attach_adapter(adapter)
        return self._tokenizer(base, adapter)

    def _tokenizer(self, base: BaseModelEntry, adapter: Adapter | None) -> Any:
        # The adapter's own tokenizer files carry the chat template it was trained with.
        key = adapter.id if adapter is not None else f"base:{base.name}"
        if key not in self.tokenizers:
            source: str | Path = base.source
            if adapter is not None:
                adapter_dir = self.adapters.get(adapter.id) or self.adapter_dir(adapter)
                if (adapter_dir / "tokenizer_config.json").is_file():
                    source = adapter_dir
            tokenizer = AutoTokenizer.from_pretrained(
                source, trust_remote_code=base.trust_remote_code
            )
            self.tokenizers[key] = use_chatml_if_missing(tokenizer)
        return self.tokenizers[key]

    # --- generation ----------------------------------------------------------------------------

    def chat_inputs(self, request: GenerationRequest, tokenizer: Any) -> ChatInputs:
        """The conversation through the chat template, as the model's inputs, and how many tokens
        the answer may take: max_new_tokens, or what the model's context leaves after the
        conversation. A 400 where the conversation alone fills the context (past it the model's
        answer is noise). Call after `prepare`."""
        inputs = tokenizer.apply_chat_template(
            request.chat(),
            tools=request.tools or None,
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        prompt_tokens = int(inputs["input_ids"].shape[-1])
        limit = getattr(self.model.config, "max_position_embeddings", None)
        room = request.max_new_tokens
        if isinstance(limit, int):
            if prompt_tokens >= limit:
                raise InferenceError(
                    400,
                    "context_length_exceeded",
                    f"The conversation is {prompt_tokens} tokens; the model takes {limit} in "
                    "all, its answer included.",
                    "Shorten the conversation (drop earlier turns or long pasted text), or start a "
                    "new chat.",
                )
            room = min(room, limit - prompt_tokens)
        tensors = {k: v.to(self.model.device) for k, v in inputs.items()}
        return ChatInputs(tensors, prompt_tokens, room)

    def generate(
        self,
        request: GenerationRequest,
        adapter: Adapter | None,
        tokenizer: Any,
        emit: Any,
        chat: ChatInputs | None = None,
    ) -> dict[str, Any]:
        """Stream the answer through `emit(text)`; a failing emit stops the generation.

        Call with `self.lock` held and after `prepare` (and `chat_inputs`, whose result `chat`
        takes). Returns the generation's summary.
        """
        chat = chat or self.chat_inputs(request, tokenizer)
        inputs, prompt_tokens, max_new_tokens = chat
        cancel = threading.Event()
        watch = _Watch(prompt_tokens, cancel)
        streamer = TextIteratorStreamer(
            tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600
        )
        kwargs: dict[str, Any] = dict(
            **inputs,
            max_new_tokens=max_new_tokens,
            eos_token_id=_stop_token_ids(self.model, tokenizer),
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([watch]),
            streamer=streamer,
        )
        if request.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=request.temperature, top_p=request.top_p)
        failure: list[BaseException] = []
        model = self.model
        base_only = adapter is None and _is_peft(model)

        def run() -> None:
            try:
                with torch.inference_mode(), _seeded(request.seed, model.device):
                    if base_only:
                        with model.disable_adapter():
                            model.generate(**kwargs)
                    else:
                        model.generate(**kwargs)
            except BaseException as exc:  # reported to the client; the server keeps serving
                failure.append(exc)
                streamer.end()

        summary: dict[str, Any] = {
            "model": request.model,
            "prompt_tokens": prompt_tokens,
            "finished": False,
            "disconnected": False,
            "max_new_tokens": max_new_tokens,
        }
        self.generating = True
        self.last_generation = summary
        started = time.monotonic()
        first_token_at: float | None = None
        reason: str | None = None
        thread = threading.Thread(target=run, name="generate", daemon=True)
        thread.start()
        try:
            pending = ""
            for piece in streamer:
                if reason is not None:
                    continue  # drain what was queued before the stop took effect
                pending += piece
                hits = [i for i in (pending.find(s) for s in request.stop) if i >= 0]
                if hits:
                    pending = pending[: min(hits)]
                    reason = "stop"
                    cancel.set()
                keep = 0 if reason else held_back(pending, request.stop)
                out, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
                if out:
                    try:
                        emit(out)
                    except OSError:
                        reason = "disconnect"
                        summary["disconnected"] = True
                        cancel.set()
                        continue
                    if first_token_at is None:
                        first_token_at = time.monotonic()
            if pending and reason is None:
                try:
                    emit(pending)
                except OSError:
                    reason = "disconnect"
                    summary["disconnected"] = True
        finally:
            cancel.set()
            thread.join()
            self.generating = False
            self.generations += 1
        if failure:
            exc = failure[0]
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
                raise InferenceError(
                    503,
                    "gpu_busy",
                    "The GPU ran out of memory while generating.",
                    "Lower max new tokens, or wait for the training job to finish.",
                ) from exc
            raise InferenceError(500, "generation_failed", f"Generation failed: {exc}") from exc
        elapsed = time.monotonic() - started
        completion = watch.generated
        if reason is None:
            reason = "length" if completion >= max_new_tokens else "stop"
        summary.update(
            finished=True,
            finish_reason=reason,
            completion_tokens=completion,
            seconds=round(elapsed, 3),
            first_token_ms=round((first_token_at - started) * 1000, 1) if first_token_at else None,
            tokens_per_second=round(completion / elapsed, 2) if elapsed > 0 else None,
        )
        return summary

    def completion(
        self, request: CompletionRequest, adapter: Adapter | None, tokenizer: Any
    ) -> Completion:
        """A raw-prompt completion (worker/completion.py), checked; call after `prepare`."""
        try:
            return Completion(
                self.model,
                tokenizer,
                request,
                base_only=adapter is None and _is_peft(self.model),
                stop_token_ids=_stop_token_ids(self.model, tokenizer),
            )
        except CompletionError as exc:
            raise InferenceError(400, exc.code, exc.message, exc.hint) from exc

    def complete(self, completion: Completion, emit: Any) -> dict[str, Any]:
        """Run it with `self.lock` held, streaming its tokens through `emit`; its summary."""
        summary: dict[str, Any] = {"model": completion.request.model, "finished": False}
        self.generating, self.last_generation = True, summary
        try:
            summary.update(completion.run(emit), finished=True)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise InferenceError(
                503,
                "gpu_busy",
                "The GPU ran out of memory while completing.",
                "Send a shorter prompt or lower max_tokens, or wait for the training job.",
            ) from exc
        finally:
            self.generating = False
            self.generations += 1
        return summary

    def status(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "compute_mode": self.compute_mode,
            "base_model": self.base_name,
            "adapters": list(self.adapters),
            "base_loads": self.base_loads,
            "busy": self.lock.locked(),
            "generating": self.generating,
            "generations": self.generations,
            "last_generation": self.last_generation,
        }


def _need_bytes(parameters: int, precision: str) -> int:
    per = NF4_BYTES_PER_PARAMETER if precision == "nf4" else BF16_BYTES_PER_PARAMETER
    return int(parameters * per * LOAD_OVERHEAD_FACTOR + LOAD_OVERHEAD_BYTES)


def _bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def _is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Any:
    """Sampling drawn from `seed` (the process's random state put back after), or as it comes.
    Generations hold the engine's lock, so no other one draws meanwhile."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS of the model and the tokenizer, plus whichever end-of-turn tokens the vocabulary has."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return sorted(ids)


# --- HTTP ---------------------------------------------------------------------------------------


class InferenceServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], engine: Engine, secret: str) -> None:
        super().__init__(address, InferenceHandler)
        self.engine = engine
        self.secret = secret

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class InferenceHandler(BaseHTTPRequestHandler):
    server: InferenceServer
    server_version = "tuneboard-inference"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        """Only Tuneboard's own web server and worker may ask: a loopback Host (no DNS
        rebinding), no Origin (no web page), a JSON body and this server's secret, which only
        they know (it reaches them through the database). False: refused and answered."""
        refusal: InferenceError | None = None
        given = self.headers.get("Authorization", "")
        if host_name(self.headers.get("Host", "")) not in LOOPBACK_NAMES:
            refusal = InferenceError(403, "forbidden_host", "This server answers loopback only.")
        elif "Origin" in self.headers:
            refusal = InferenceError(403, "forbidden_origin", "Web pages may not call this server.")
        elif self.command == "POST" and not self.headers.get("Content-Type", "").startswith(
            "application/json"
        ):
            refusal = InferenceError(415, "unsupported_media_type", "Send a JSON body.")
        elif not (
            given.lower().startswith("bearer ")
            and hmac.compare_digest(given[7:].strip().encode(), self.server.secret.encode())
        ):
            refusal = InferenceError(
                401,
                "unauthorized",
                "This server's secret is required.",
                "Chat through the web app's Playground or /v1; it knows the secret.",
            )
        if refusal is None:
            return True
        self.close_connection = True  # the refused body, if any, is never read
        self._json(refusal.status, refusal.as_json())
        return False

    def do_GET(self) -> None:
        if not self._authorised():
            return
        if self.path == "/status":
            self._json(200, self.server.engine.status())
        else:
            self._json(404, InferenceError(404, "not_found", "No such address.").as_json())

    def do_POST(self) -> None:
        if not self._authorised():
            return
        engine = self.server.engine
        if self.path == "/unload":
            with engine.lock:
                engine.unload()
            self._json(200, {"unloaded": True})
            return
        if self.path not in ("/generate", "/complete"):
            self._json(404, InferenceError(404, "not_found", "No such address.").as_json())
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                raise InferenceError(413, "too_large", "The request is too large.")
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except ValueError as exc:
                raise InferenceError(400, "invalid", "The body is not JSON.") from exc
            request = parse_generation_request(body, self.path)
            base, adapter = engine.resolve(request.model)
        except InferenceError as exc:
            self._json(exc.status, exc.as_json())
            return
        if not engine.lock.acquire(timeout=LOCK_WAIT_SECONDS):
            error = InferenceError(
                503, "busy", "Another chat is generating.", "Try again in a moment."
            )
            self._json(503, error.as_json())
            return
        try:
            if isinstance(request, CompletionRequest):
                self._complete(engine, request, base, adapter)
            else:
                self._generate(engine, request, base, adapter)
        finally:
            engine.lock.release()

    def _send(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def _generate(
        self,
        engine: Engine,
        request: GenerationRequest,
        base: BaseModelEntry,
        adapter: Adapter | None,
    ) -> None:
        try:
            tokenizer = engine.prepare(base, adapter)
            chat = engine.chat_inputs(request, tokenizer)
        except InferenceError as exc:
            self._json(exc.status, exc.as_json())
            return
        self._start_stream()
        try:
            summary = engine.generate(
                request, adapter, tokenizer, lambda t: self._send({"token": t}), chat
            )
            if not summary["disconnected"]:
                self._send({"done": True, **summary})
        except InferenceError as exc:
            with contextlib.suppress(OSError):
                self._send(exc.as_json())
        except OSError:
            pass  # the client left after the last token

    def _complete(
        self,
        engine: Engine,
        request: CompletionRequest,
        base: BaseModelEntry,
        adapter: Adapter | None,
    ) -> None:
        try:
            tokenizer = engine.prepare(base, adapter)
            completion = engine.completion(request, adapter, tokenizer)
        except InferenceError as exc:
            self._json(exc.status, exc.as_json())
            return
        self._start_stream()
        try:
            summary = engine.complete(completion, self._send)
            self._send({"done": True, **summary})
        except InferenceError as exc:
            with contextlib.suppress(OSError):
                self._send(exc.as_json())
        except OSError:
            pass  # the client left: the completion stopped at its next token


def publish_url(db: Database, worker_id: str, url: str | None, secret: str | None) -> None:
    """Write (or clear) this worker's inference URL and secret, so the web can call the server."""
    with db.write() as s:
        worker = s.get(Worker, worker_id)
        if worker is not None:
            worker.inference_url, worker.inference_secret = url, secret
            s.add(worker)


def serve(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    worker_id: str | None = None,
    quantization: str = "auto",
) -> InferenceServer:
    """Bind the server (port 0: any free port) and publish its URL and secret; call
    serve_forever on it. The secret is `TUNEBOARD_INFERENCE_SECRET` (the worker that starts the
    server sets it), else a new random one."""
    db = Database(settings.resolved_database_url)
    engine = Engine(settings, db, quantization=quantization, worker_id=worker_id)
    secret = os.environ.get(SECRET_VARIABLE) or secrets.token_urlsafe(32)
    server = InferenceServer((host, port), engine, secret)
    if worker_id:
        publish_url(db, worker_id, server.url, secret)
    return server


def _stop_when_orphaned(server: InferenceServer, worker_pid: int) -> None:
    """The worker that started this server died (SIGKILL, OOM killer): we were re-parented. Stop
    serving, so that the model this server holds gives its GPU memory back."""
    while os.getppid() == worker_pid:
        time.sleep(1.0)
    log.warning("the worker (pid %d) is gone; the inference server stops", worker_pid)
    server.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tuneboard's playground inference server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--worker-id", help="write the URL into this worker's row")
    parser.add_argument("--quantization", choices=["auto", "bf16", "nf4"], default="auto")
    parser.add_argument(
        "--worker-pid", type=int, default=0, help="stop when this parent (the worker) is gone"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("TUNEBOARD_LOG_LEVEL", "INFO"))
    settings = Settings()
    server = serve(
        settings, args.host, args.port, worker_id=args.worker_id, quantization=args.quantization
    )
    print(f"inference server listening on {server.url}", flush=True)
    if args.worker_pid:
        watch = threading.Thread(
            target=_stop_when_orphaned, args=(server, args.worker_pid), daemon=True
        )
        watch.start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if args.worker_id:
            publish_url(server.engine.db, args.worker_id, None, None)
        server.server_close()


if __name__ == "__main__":
    main()

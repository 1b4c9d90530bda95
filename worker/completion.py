"""Raw-prompt completions on the inference server's model (OpenAI's legacy /v1/completions).

A prompt (text, or token ids as given) is continued with no chat template, one token at a time
on the KV cache. With `echo` the prompt's tokens come back first; with `logprobs` every token
carries its log-probability under the model (the adapter applied, or switched off for a base
model) and the `logprobs` most likely alternatives, from the raw logits: this is what
lm-evaluation-harness scores answers with, so it is computed exactly, not sampled.

Each token goes out through `emit({"token", "logprob", "top", "prompt"})`; `token` is the
token's text, and the pieces add up to the decoded text. The server sends them as SSE events.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from transformers import DynamicCache

from app.generation import CompletionRequest

# Rows of the prompt's logits turned into log-probabilities at a time (a vocabulary of 150k
# tokens makes one row 600 KB in fp32).
SCORE_ROWS = 256
# Tokens before the new one that decoding looks at, so a piece's leading space comes out right.
DECODE_CONTEXT = 6


class CompletionError(Exception):
    """A prompt this model cannot complete (too long, a token id outside its vocabulary)."""

    def __init__(self, code: str, message: str, hint: str) -> None:
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


class _Pieces:
    """Token ids to text pieces that add up to the decoded text. A token that ends inside a
    multi-byte character gives "" and the next one the whole character."""

    def __init__(self, tokenizer: Any, context: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(context)
        self.prefix = max(0, len(self.ids) - DECODE_CONTEXT)
        self.read = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))

    def add(self, token_id: int, *, last: bool = False) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") and not last:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


def _stop_at(text: str, stops: list[str]) -> int:
    """Where the first stop string in `text` begins, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string."""
    keep = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), keep, -1):
            if text.endswith(stop[:length]):
                keep = length
                break
    return keep


class Completion:
    """One completion, checked on construction (a CompletionError before anything is sent);
    `run(emit)` streams it and returns the summary."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        request: CompletionRequest,
        *,
        base_only: bool,
        stop_token_ids: list[int],
    ) -> None:
        self.model, self.tokenizer, self.request = model, tokenizer, request
        self.base_only = base_only
        self.stop_token_ids = set(stop_token_ids)
        if isinstance(request.prompt, str):
            self.prompt_ids = [int(i) for i in tokenizer(request.prompt)["input_ids"]]
        else:
            self.prompt_ids = list(request.prompt)
        vocabulary = int(model.get_input_embeddings().num_embeddings)
        outside = [i for i in self.prompt_ids if i >= vocabulary]
        if outside:
            raise CompletionError(
                "invalid_token_id",
                f"Token id {outside[0]} is outside the model's vocabulary of {vocabulary} tokens.",
                "Send token ids from this model's tokenizer, or the prompt as text.",
            )
        if not self.prompt_ids:
            raise CompletionError(
                "empty_prompt",
                "The prompt has no tokens.",
                "Send a prompt with some text or at least one token id.",
            )
        limit = getattr(model.config, "max_position_embeddings", None)
        wanted = len(self.prompt_ids) + request.max_new_tokens
        if isinstance(limit, int) and wanted > limit:
            raise CompletionError(
                "context_length_exceeded",
                f"The prompt ({len(self.prompt_ids)} tokens) and max_tokens "
                f"({request.max_new_tokens}) make {wanted} tokens; the model takes {limit}.",
                "Shorten the prompt or lower max_tokens.",
            )

    # --- the model -----------------------------------------------------------------------------

    def _forward(self, ids: list[int], cache: Any, *, all_logits: bool) -> torch.Tensor:
        """The logits of `ids` (every position's, or the last one's) after what `cache` holds,
        which the call extends."""
        inputs = torch.tensor([ids], device=self.model.device)
        out = self.model(
            input_ids=inputs,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
            **{_cache_argument(self.model): cache},
        )
        return out.logits[0]

    def _top(self, logprobs: torch.Tensor) -> dict[str, float] | None:
        count = self.request.logprobs
        if count is None:
            return None
        values, ids = torch.topk(logprobs, count)
        top: dict[str, float] = {}
        for value, token_id in zip(values.tolist(), ids.tolist(), strict=True):
            piece = str(self.tokenizer.decode([int(token_id)], skip_special_tokens=False))
            top.setdefault(piece, float(value))
        return top

    def _choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        if self.request.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / self.request.temperature, dim=-1)
        if self.request.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= self.request.top_p
            sorted_probs[outside] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=generator))

    # --- the run -------------------------------------------------------------------------------

    def run(self, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Stream the echoed prompt and the answer through `emit`; a failing emit (OSError: the
        client left) stops it. Returns {"finish_reason", "prompt_tokens", "completion_tokens"}."""
        switched_off = self.model.disable_adapter() if self.base_only else contextlib.nullcontext()
        with torch.inference_mode(), switched_off:
            return self._run(emit)

    def _run(self, emit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        request, ids = self.request, self.prompt_ids
        scored = request.echo and request.logprobs is not None
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, cache, all_logits=scored)
        if request.echo:
            self._echo(logits if scored else None, emit)
        generator = None
        if request.seed is not None and request.temperature > 0:
            generator = torch.Generator(device=self.model.device).manual_seed(request.seed)
        pieces = _Pieces(self.tokenizer, ids)
        next_logits = logits[-1].float()
        text, sent = "", 0
        held: list[dict[str, Any]] = []  # events whose text could still begin a stop string
        generated, reason = 0, "length"
        for step in range(request.max_new_tokens):
            logprobs = torch.log_softmax(next_logits, dim=-1)
            token = self._choose(next_logits, generator)
            generated += 1
            ends = token in self.stop_token_ids
            piece = "" if ends else pieces.add(token, last=step == request.max_new_tokens - 1)
            held.append(
                {
                    "token": piece,
                    "logprob": float(logprobs[token]) if request.logprobs is not None else None,
                    "top": self._top(logprobs),
                    "prompt": False,
                }
            )
            text += piece
            cut = _stop_at(text, request.stop)
            if ends or cut >= 0:
                reason = "stop"
                if cut >= 0:
                    held = _trimmed(held, sent, cut)
                break
            keep = held_back(text, request.stop)
            while held and sent + len(held[0]["token"]) <= len(text) - keep:
                event = held.pop(0)
                emit(event)
                sent += len(event["token"])
            if step + 1 < request.max_new_tokens:
                next_logits = self._forward([token], cache, all_logits=False)[-1].float()
        for event in held:
            emit(event)
        return {
            "finish_reason": reason,
            "prompt_tokens": len(ids),
            "completion_tokens": generated,
        }

    def _echo(self, logits: torch.Tensor | None, emit: Callable[[dict[str, Any]], None]) -> None:
        """The prompt's tokens; with `logits` (every position's), each one's log-probability
        given those before it (None for the first, which nothing predicts)."""
        ids = self.prompt_ids
        pieces = _Pieces(self.tokenizer, [])
        for start in range(0, len(ids), SCORE_ROWS):
            block = ids[start : start + SCORE_ROWS]
            rows, first_row = None, max(start - 1, 0)
            if logits is not None:
                rows = torch.log_softmax(logits[first_row : start + len(block) - 1].float(), -1)
            for offset, token in enumerate(block):
                position = start + offset
                event: dict[str, Any] = {
                    "token": pieces.add(token, last=position == len(ids) - 1),
                    "logprob": None,
                    "top": None,
                    "prompt": True,
                }
                if rows is not None and position > 0:
                    row = rows[position - 1 - first_row]
                    event["logprob"] = float(row[token])
                    event["top"] = self._top(row)
                emit(event)


def _cache_argument(model: Any) -> str:
    """The KV cache's keyword: `cache` in newer transformers 5 releases, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _trimmed(events: list[dict[str, Any]], start: int, cut: int) -> list[dict[str, Any]]:
    """The held events whose text begins before `cut` (a position in the answer; the first event
    begins at `start`), the last one's text cut there."""
    kept = []
    for event in events:
        if start >= cut:
            break
        piece = event["token"]
        kept.append({**event, "token": piece[: cut - start]})
        start += len(piece)
    return kept

"""From normalised dataset rows to training tensors.

A normalised row (one JSON object per line, written by the dataset side) is either
`{"line": N, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` or
`{"line": N, "text": str}` (plain text: every token is trained). A conversation with tool calls
also has `"tools"` (OpenAI's definitions), assistant messages with `tool_calls` and `tool` results
(app/services/datasets/formats/tools.py): the template renders them (`tools=`), the assistant's
calls are trained like its answers, the tool results are not. A job of several datasets adds
`"dataset": id` to each row (worker/mix.py).

Conversations are rendered with the model's own chat template, so training and chat agree. The
trained (loss-bearing) tokens come from the template's `{% generation %}` markers when it has them
(`return_assistant_tokens_mask`), otherwise from a prefix difference: the text the template adds
for each assistant turn, between the conversation rendered up to that turn with the generation
prompt and rendered through it. That works for templates without markers (Llama 3, Qwen, Mistral).

Conversations longer than `max_seq_len` are cut at the end: the start of a conversation (system
prompt, first question) is what gives the rest its meaning, and cutting the end keeps the first
answers whole. A row left with no trained token after the cut is dropped and counted in
`TokenizeStats`. Plain-text rows longer than `max_seq_len` are split into `max_seq_len` chunks
(continued pre-training: nothing is lost; `long_text: cut` cuts them like conversations).
"""

from __future__ import annotations

import bisect
import random
import re
from collections.abc import Iterable, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from app.dataset_store import read_jsonl
from app.tool_calls import template_takes_tools
from worker.errors import ChatTemplateMissing, DatasetError

if TYPE_CHECKING:
    from worker.batch_shape import PackedShape

IGNORE_INDEX = -100

# ChatML, the fallback for a tokenizer without a chat template. The `{% generation %}` markers let
# `apply_chat_template(..., return_assistant_tokens_mask=True)` find the assistant's tokens.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class TokenizedExample:
    """One training example: token ids and labels (IGNORE_INDEX where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    line: int | None = None
    dataset: str | None = None  # the dataset it came from, in a job of several (worker/mix.py)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class TokenizeStats:
    """What happened to the rows: how many became examples, were cut, or were dropped."""

    examples: int = 0
    truncated: int = 0
    split: int = 0  # plain-text rows split into chunks
    chunks: int = 0  # the examples those rows became
    dropped_no_trained_tokens: int = 0
    dropped_lines: list[int] = field(default_factory=list)

    def notice(self, max_len: int) -> str:
        """What the job page says about the cut, or "" when no row was cut, split or left out."""
        parts = []
        if self.split:
            parts.append(
                f"{self.split} plain-text rows longer than {max_len} tokens were split into "
                f"{self.chunks} chunks of at most {max_len} tokens (nothing lost)"
            )
        if self.truncated:
            parts.append(f"{self.truncated} rows longer than {max_len} tokens were cut to fit")
        if self.dropped_no_trained_tokens:
            parts.append(
                f"{self.dropped_no_trained_tokens} rows were left out: no reply token was left "
                "to train on after the cut"
            )
        return "; ".join(parts) + "." if parts else ""


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read normalised rows (JSONL): a run's copy of its dataset's split."""
    return list(read_jsonl(path))


def template_of(tokenizer: Any, chat_template: str | None = None) -> str:
    """The chat template to use: the override, else the tokenizer's, else ChatTemplateMissing."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is for chat
        template = template.get("default")
    if not template:
        raise ChatTemplateMissing(getattr(tokenizer, "name_or_path", "") or "this model")
    return template


def use_chatml_if_missing(tokenizer: Any, template: str | None = None) -> Any:
    """Give a tokenizer without a chat template `template`, else ChatML (the Models page says so).

    Training and the playground both call it, so a model is served with the template it was
    trained with; the recipe saves the tokenizer with the adapter, template included.
    """
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template or CHATML_TEMPLATE
    return tokenizer


def has_generation_markers(template: str) -> bool:
    return bool(_GENERATION_MARKER.search(template))


def tokenize_row(
    tokenizer: Any,
    row: dict[str, Any],
    train_on: str = "assistant",
    max_seq_len: int = 2048,
    chat_template: str | None = None,
) -> TokenizedExample | None:
    """Tokenise one normalised row. None when nothing is left to train after truncation."""
    line = row.get("line")
    if is_plain_text(row):
        input_ids, trained = _tokenize_text(tokenizer, row["text"])
    elif "messages" in row:
        input_ids, trained = _tokenize_conversation(
            tokenizer, row["messages"], chat_template, row.get("tools")
        )
        if str(train_on) == "all":
            trained = [True] * len(input_ids)
    else:
        raise DatasetError(f"Row {line} has neither 'messages' nor 'text'.", "Re-upload the file.")

    truncated = len(input_ids) > max_seq_len
    input_ids, trained = input_ids[:max_seq_len], trained[:max_seq_len]
    labels = [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, trained, strict=True)]
    # A lone trained first token carries no loss (labels are shifted), so it does not count.
    if not any(label != IGNORE_INDEX for label in labels[1:]):
        return None
    return TokenizedExample(
        input_ids=input_ids,
        labels=labels,
        truncated=truncated,
        line=line,
        dataset=row.get("dataset"),
    )


def is_plain_text(row: dict[str, Any]) -> bool:
    return "text" in row and "messages" not in row


def text_chunks(tokenizer: Any, row: dict[str, Any], max_seq_len: int) -> list[TokenizedExample]:
    """A plain-text row as consecutive chunks of at most `max_seq_len` tokens, every token
    trained; a last chunk of one token (no loss: labels are shifted) is left out."""
    input_ids, _ = _tokenize_text(tokenizer, row["text"])
    line = row.get("line")
    starts = range(0, len(input_ids), max_seq_len)
    chunks = [input_ids[start : start + max_seq_len] for start in starts]
    return [
        TokenizedExample(input_ids=chunk, labels=list(chunk), line=line)
        for chunk in chunks
        if len(chunk) > 1
    ]


def tokenize_rows(
    tokenizer: Any,
    rows: Iterable[dict[str, Any]],
    train_on: str = "assistant",
    max_seq_len: int = 2048,
    chat_template: str | None = None,
    long_text: str = "split",
) -> tuple[list[TokenizedExample], TokenizeStats]:
    stats = TokenizeStats()
    examples = []
    for row in rows:
        if str(long_text) == "split" and is_plain_text(row):
            chunks = text_chunks(tokenizer, row, max_seq_len)
            if len(chunks) > 1:
                stats.split += 1
                stats.chunks += len(chunks)
                examples += chunks
                continue
        example = tokenize_row(tokenizer, row, train_on, max_seq_len, chat_template)
        if example is None:
            stats.dropped_no_trained_tokens += 1
            if row.get("line") is not None:
                stats.dropped_lines.append(row["line"])
            continue
        stats.truncated += example.truncated
        examples.append(example)
    stats.examples = len(examples)
    return examples, stats


def _tokenize_text(tokenizer: Any, text: str) -> tuple[list[int], list[bool]]:
    input_ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not input_ids or input_ids[-1] != eos):
        input_ids.append(eos)  # so the model learns where a document ends
    return input_ids, [True] * len(input_ids)


def _tokenize_conversation(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    chat_template: str | None,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[bool]]:
    template = template_of(tokenizer, chat_template)
    if tools and not template_takes_tools(template):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise DatasetError(
            f"The dataset has tool calls, but the chat template of {name} has no tool support: "
            "it would drop the tool definitions and the calls.",
            "Train tool-call data on a model whose chat template takes tools (the Datasets page "
            "lists them), or remove the tools from the dataset.",
        )
    if has_generation_markers(template):
        encoded = tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            chat_template=template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
        )
        input_ids = list(encoded["input_ids"])
        trained = [bool(flag) for flag in encoded["assistant_masks"]]
        if any(trained) or not any(m["role"] == "assistant" for m in messages):
            return input_ids, trained
    return _tokenize_by_prefix_difference(tokenizer, messages, template, tools)


def _render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    template: str,
    prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    return tokenizer.apply_chat_template(
        messages,
        tools=tools or None,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=prompt,
    )


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def assistant_spans(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    template: str,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the assistant turns add to it."""
    full = _render(tokenizer, messages, template, prompt=False, tools=tools)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = (
                _render(tokenizer, messages[:index], template, prompt=True, tools=tools)
                if index
                else ""
            )
        except Exception:  # some templates refuse a conversation that does not start with a user
            before = ""
        through = _render(tokenizer, messages[: index + 1], template, prompt=False, tools=tools)
        start = _common_prefix_length(before, full)
        end = _common_prefix_length(through, full)
        if end <= start:
            # The template renders the last turn differently from earlier ones (e.g. Qwen 3
            # drops earlier reasoning): fall back to finding the reply itself.
            found = full.find(message["content"], start)
            if found < 0:
                continue
            end = found + len(message["content"])
            if tokenizer.eos_token and full.startswith(tokenizer.eos_token, end):
                end += len(tokenizer.eos_token)
        # The separator a template writes after the end-of-turn token is not part of the reply.
        if full[start:end].strip():
            end = start + len(full[start:end].rstrip())
        spans.append((start, end))
    return full, spans


def _tokenize_by_prefix_difference(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    template: str,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[bool]]:
    full, spans = assistant_spans(tokenizer, messages, template, tools)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    trained = [
        any(start <= token_start < end for start, end in spans)
        for token_start, _ in encoded["offset_mapping"]
    ]
    return list(encoded["input_ids"]), trained


# --- what the dataset report needs -------------------------------------------------------------


def trained_segments(
    tokenizer: Any,
    row: dict[str, Any],
    train_on: str = "assistant",
    max_seq_len: int = 2048,
    chat_template: str | None = None,
) -> list[tuple[str, bool]]:
    """The row as the model sees it, split into `(text, trained)` runs for highlighting."""
    example = tokenize_row(tokenizer, row, train_on, max_seq_len, chat_template)
    if example is None:
        return []
    segments: list[tuple[str, bool]] = []
    run: list[int] = []
    run_trained = example.labels[0] != IGNORE_INDEX
    for token, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != IGNORE_INDEX
        if trained != run_trained and run:
            segments.append((tokenizer.decode(run, skip_special_tokens=False), run_trained))
            run = []
        run_trained = trained
        run.append(token)
    if run:
        segments.append((tokenizer.decode(run, skip_special_tokens=False), run_trained))
    return segments


# --- batches ----------------------------------------------------------------------------------


Packable = TypeVar("Packable", bound=Sized)  # an example, or a preference pair: its tokens


def pack_examples(
    examples: Sequence[Packable], max_tokens_per_batch: int, seed: int = 0
) -> list[list[Packable]]:
    """Group examples into micro-batches of at most `max_tokens_per_batch` tokens, no padding.

    Best-fit decreasing (longest first, each into the fullest batch it still fits), then the
    batches are shuffled with `seed`. Deterministic for a given seed.
    """
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)  # ties in length keep a seeded order
    order.sort(key=lambda i: -len(examples[i]))
    batches: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens still free, batch index), sorted
    for i in order:
        size = len(examples[i])
        if size > max_tokens_per_batch:
            raise ValueError(f"example of {size} tokens exceeds the {max_tokens_per_batch} budget")
        slot = bisect.bisect_left(free, (size, -1))
        if slot < len(free):
            remaining, batch = free.pop(slot)
            batches[batch].append(i)
        else:
            remaining, batch = max_tokens_per_batch, len(batches)
            batches.append([i])
        if remaining - size > 0:
            bisect.insort(free, (remaining - size, batch))
    packed = [[examples[i] for i in batch] for batch in batches]
    random.Random(seed + 1).shuffle(packed)
    return packed


class FlattenedBatchCollator:
    """One packed micro-batch -> one row: `position_ids` restart at 0 for every example and each
    example's first label is ignored, so no token learns from another example. No attention mask
    is returned. The examples' bounds go along as `cu_seq_lens_q/k` and `max_length_q/k`: the
    recipe's attention (worker.attention) reads them; with sdpa, eager or flex transformers builds
    the block-diagonal mask from the position ids instead (both verified in tests/worker)."""

    def __init__(self, shape: PackedShape | None = None, pad_token_id: int = 0) -> None:
        from transformers import DataCollatorWithFlattening

        self._flatten = DataCollatorWithFlattening(
            return_tensors="pt", return_flash_attn_kwargs=True
        )
        self.shape = shape  # every row padded to it (worker.batch_shape: for CUDA graphs)
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[Any]) -> dict[str, Any]:
        examples = [ex for item in features for ex in (item if isinstance(item, list) else [item])]
        batch = self._flatten([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
        # With a KV cache the packed-sequence mask is skipped (transformers 5 only derives it
        # when there is no cache), and examples would attend to each other.
        batch["use_cache"] = False
        return batch if self.shape is None else self.shape.pad(batch, self.pad_token_id)


class PaddedBatchCollator:
    """Classic right-padded batches, for `packing = false`."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[TokenizedExample]) -> dict[str, Any]:
        import torch

        longest = max(len(e) for e in features)
        input_ids, labels, attention = [], [], []
        for e in features:
            pad = longest - len(e)
            input_ids.append(e.input_ids + [self.pad_token_id] * pad)
            labels.append(e.labels + [IGNORE_INDEX] * pad)
            attention.append([1] * len(e) + [0] * pad)
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(attention),
        }

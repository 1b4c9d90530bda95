"""Token reports of datasets, computed on the worker side with the model's tokenizer only.

The web process asks for a report by adding a `queued` row to `dataset_reports`
(`app/services/datasets/reports.py`). A worker claims it from `app.side_queue` and runs it here, in
`python -m worker.dataset_report --task-id N --attempt A` (worker/side_work.py), which loads the registered model's
tokenizer (never the weights), tokenises every training row with `worker.data.tokenize_row` (the
function training uses, so the numbers are the ones training will meet) and stores `result`:

    {
      "rows": 285, "eval_rows": 15,               # training rows measured; held-out rows
      "lengths": {"min", "p50", "p95", "max", "mean"},   # untruncated tokens per row
      "histogram": [{"lo": 0, "hi": 16, "count": 3}, ...],  # rows with lo < length <= hi;
                                                  # max_seq_len is always a bin edge
      "total_tokens": 19876,                      # untruncated, all training rows
      "tokens_per_epoch": 19876,                  # what one epoch feeds: after the cut and drops
      "trained_tokens_per_epoch": 5012,           # of those, the loss-bearing ones
      "examples_per_epoch": 285,
      "over_max": {"rows", "split", "chunks", "truncated", "dropped", "tokens_cut",
                   "lines": [first 20]},          # split: plain-text rows cut into `chunks`
      "no_trained_tokens": {"rows", "lines": [first 20]},  # dropped even without a cut
      "truncation_rule": "...",                   # TRUNCATION_RULE, in words
      "chat_template": "model" | "chatml",
      "trained_tokens_from": "...",               # how the trained tokens were found
      "tokenizer": {"class", "vocab_size"},
      "sample": {"line": 3, "assistant": [{"text", "trained", "tool"?}], "all": [...]} | null,
                                                  # a row with tool calls first, when any;
                                                  # "tool": "definitions" | "call" marks them
      "seconds": 0.4
    }

A preference dataset's report has the same keys, measured on pairs by
`worker.preference_data.tokenize_pair` (what preference training uses): a pair's length is its
prompt plus its longer answer, `pairs` holds the prompt/chosen/rejected lengths apart
(`{"prompt": {"min", "p50", ...}, "chosen": ..., "rejected": ...}`), `over_max.dropped` counts
the pairs whose answer the cut leaves empty, and `sample` is `{"line", "chosen": [...],
"rejected": [...]}`.

`run_pending_reports(settings)` claims and computes every queued report in this process and
returns how many it finished. `python -m worker.dataset_report --report-id N` computes one report by
hand (or `--pending` for all): the page tells a user without a running worker to do that.
"""

from __future__ import annotations

import bisect
import math
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from app import side_queue
from app.dataset_errors import DatasetError
from app.dataset_store import DatasetRowsMissing, iter_rows
from app.db import Database
from app.models import BaseModelEntry, Dataset, DatasetReport, SideWorkStatus
from app.settings import Settings
from worker.data import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    has_generation_markers,
    is_plain_text,
    template_of,
    text_chunks,
    tokenize_row,
    trained_segments,
)
from worker.errors import ChatTemplateMissing, TrainingError
from worker.preference_data import (
    PAIR_TRUNCATION_RULE,
    TokenizedPair,
    answer_texts,
    tokenize_pair,
)
from worker.side_work import child_main, run_pending

TRUNCATION_RULE = (
    "Conversations longer than the max length are cut at the end (the start of the conversation "
    "is kept, so the first answers stay whole); a row left with no trained token after the cut is "
    "dropped. Plain-text rows longer than the max length are split into max-length chunks "
    "(continued pre-training: nothing is lost; a job's long_text: cut cuts them instead)."
)
# How chat templates write tools into the text (Hermes/Qwen, the demo's): the definitions block
# and each call, marked in the sample so a user sees what the model is shown and taught.
TOOL_MARKUP = re.compile(r"(<tools>.*?</tools>|<tool_call>.*?</tool_call>)", re.DOTALL)
MAX_BINS = 40
MAX_LINES_LISTED = 20
UNLIMITED = 10**9
PROGRESS_SECONDS = 1.0
# told(rows done, rows in all): how a report says how far it got (the row's progress columns)
Told = Callable[[int, int], object]


class ReportFailed(Exception):
    """A report that cannot be computed, with what the user can do about it."""

    def __init__(self, kind: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.kind, self.message, self.hint = kind, message, hint


def run_pending_reports(settings: Settings, *, worker_id: str | None = None) -> int:
    """Claim and compute queued reports until none is left, loading each tokenizer once; returns
    how many were finished."""
    return run_pending(
        settings, "dataset_report", partial(compute_and_store, tokenizers={}), worker_id
    )


def compute_and_store(
    settings: Settings,
    db: Database,
    claim: side_queue.SideClaim,
    tokenizers: dict[tuple[str, str | None], Any] | None = None,
) -> bool:
    """Compute a claimed report and store its result or its failure. False if the claim went
    stale meanwhile (nothing stored)."""
    with db.read() as session:
        report = session.get(DatasetReport, claim.task_id)
        assert report is not None
        dataset = session.get(Dataset, report.dataset_id)
        model = session.get(BaseModelEntry, report.base_model)
    try:
        if dataset is None:
            raise ReportFailed("dataset_missing", "The dataset was deleted.")
        if model is None:
            raise ReportFailed(
                "model_not_found",
                f"There is no registered model {report.base_model!r}.",
                "Register it on the Models page, then measure again.",
            )
        cache = tokenizers if tokenizers is not None else {}
        key = (model.source, report.chat_template)
        if key not in cache:
            cache[key] = load_tokenizer(settings, model)
        result = compute_report(
            cache[key],
            settings.layout.dataset_dir(dataset.id),
            max_seq_len=report.max_seq_len,
            train_on=report.train_on,
            chat_template=CHATML_TEMPLATE if report.chat_template == "chatml" else None,
            told=lambda done, total: side_queue.update_progress(
                db, claim, progress_done=done, progress_total=total
            ),
        )
    except (ReportFailed, TrainingError, DatasetError) as exc:
        return side_queue.fail(db, claim, exc)
    except Exception as exc:  # a report must never take its worker down
        return side_queue.finish(
            db,
            claim,
            SideWorkStatus.failed,
            error_kind="internal",
            error_message=f"{type(exc).__name__}: {exc}"[:2000],
            error_hint="Look at the worker's log; measure again to retry.",
        )
    return side_queue.finish(db, claim, SideWorkStatus.succeeded, result=result)


def load_tokenizer(settings: Settings, model: BaseModelEntry) -> Any:
    """The registered model's tokenizer alone (no weights, no GPU)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            model.source,
            cache_dir=None if model.is_local else str(settings.hf_hub_cache),
            local_files_only=model.is_local or settings.hf_offline,
            trust_remote_code=model.trust_remote_code,
        )
    except OSError as exc:
        raise ReportFailed(
            "model_not_found",
            f"Cannot load the tokenizer of {model.name}: {exc}"[:2000],
            "Check that the model folder still exists (or that the hub is reachable).",
        ) from exc


@dataclass
class _Tally:
    lengths: list[int] = field(default_factory=list)
    tokens_per_epoch: int = 0
    trained_per_epoch: int = 0
    examples: int = 0
    over_rows: int = 0
    split: int = 0
    chunks: int = 0
    truncated: int = 0
    dropped_after_cut: int = 0
    tokens_cut: int = 0
    over_lines: list[int] = field(default_factory=list)
    untrainable: int = 0
    untrainable_lines: list[int] = field(default_factory=list)


def compute_report(
    tokenizer: Any,
    dataset_dir: Path,
    *,
    max_seq_len: int,
    train_on: str = "assistant",
    chat_template: str | None = None,
    told: Told | None = None,
) -> dict[str, Any]:
    """The report of the training rows in `dataset_dir` (`store.iter_rows(..., "train")`); of
    preference pairs, `pair_report`'s. Raises ReportFailed for a conversation dataset and a
    tokenizer without a chat template (unless `chat_template` is given). `told(done, total)`
    hears the rows tokenised so far, about once a second."""
    started = time.monotonic()
    rows, eval_rows = _training_rows(dataset_dir)
    pairs = any("chosen" in row for row in rows)
    conversational = pairs or any("messages" in row for row in rows)
    template_name, trained_from = "model", "whole text (plain-text rows train on every token)"
    if conversational:
        try:
            template = template_of(tokenizer, chat_template)
        except ChatTemplateMissing as exc:
            raise ReportFailed(
                exc.kind,
                exc.message,
                "Pick a chat/instruct model, or use the ChatML template instead (then train and "
                "chat with ChatML too).",
            ) from exc
        template_name = "chatml" if chat_template == CHATML_TEMPLATE else "model"
        trained_from = (
            "the template's generation markers"
            if has_generation_markers(template)
            else "what the template adds for each assistant turn"
        )
        if train_on == "all":
            trained_from = "every token (loss on all)"
    if pairs:
        result = pair_report(
            tokenizer, rows, max_seq_len=max_seq_len, chat_template=chat_template, told=told
        )
        return {
            **result,
            "eval_rows": eval_rows,
            "chat_template": template_name,
            "seconds": round(time.monotonic() - started, 2),
        }

    tally = _Tally()
    for row in counted(rows, told):
        _measure(tokenizer, row, train_on, max_seq_len, chat_template, tally)

    sample = _sample(tokenizer, rows, max_seq_len, chat_template)
    lengths = sorted(tally.lengths)
    return {
        "rows": len(rows),
        "eval_rows": eval_rows,
        "lengths": {
            "min": lengths[0] if lengths else 0,
            "p50": _percentile(lengths, 50),
            "p95": _percentile(lengths, 95),
            "max": lengths[-1] if lengths else 0,
            "mean": round(sum(lengths) / len(lengths), 1) if lengths else 0,
        },
        "histogram": histogram(lengths, max_seq_len),
        "total_tokens": sum(lengths),
        **_tally_figures(tally),
        "truncation_rule": TRUNCATION_RULE,
        "chat_template": template_name,
        "trained_tokens_from": trained_from,
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "vocab_size": int(getattr(tokenizer, "vocab_size", 0) or 0),
        },
        "sample": sample,
        "seconds": round(time.monotonic() - started, 2),
    }


def pair_report(
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    max_seq_len: int,
    chat_template: str | None,
    told: Told | None = None,
) -> dict[str, Any]:
    """The report's numbers for preference pairs, tokenised by `tokenize_pair` (what preference
    training uses). A pair's length is its prompt plus its longer answer: the longest sequence
    it feeds the model. `pairs` gives the prompt, chosen and rejected lengths apart."""
    parts: dict[str, list[int]] = {"prompt": [], "chosen": [], "rejected": []}
    lengths: list[int] = []
    tally = _Tally()
    for row in counted(rows, told):
        whole = tokenize_pair(tokenizer, row, UNLIMITED, chat_template)
        line = row.get("line")
        if whole is None:  # an answer that renders to nothing: dropped even uncut
            tally.untrainable += 1
            if line is not None and len(tally.untrainable_lines) < MAX_LINES_LISTED:
                tally.untrainable_lines.append(line)
            continue
        sides = (whole.prompt_ids, whole.chosen_ids, whole.rejected_ids)
        for name, ids in zip(parts, sides, strict=True):
            parts[name].append(len(ids))
        longest = len(whole.prompt_ids) + max(len(whole.chosen_ids), len(whole.rejected_ids))
        lengths.append(longest)
        kept = whole
        if longest > max_seq_len:
            tally.over_rows += 1
            if line is not None and len(tally.over_lines) < MAX_LINES_LISTED:
                tally.over_lines.append(line)
            cut = tokenize_pair(tokenizer, row, max_seq_len, chat_template)
            if cut is None:
                tally.dropped_after_cut += 1
                continue
            tally.truncated += 1
            tally.tokens_cut += _pair_tokens(whole) - _pair_tokens(cut)
            kept = cut
        tally.examples += 1
        tally.tokens_per_epoch += _pair_tokens(kept)
        tally.trained_per_epoch += len(kept.chosen_ids) + len(kept.rejected_ids)
    sample = next((r for r in rows if tokenize_pair(tokenizer, r, UNLIMITED, chat_template)), None)
    return {
        "rows": len(rows),
        "lengths": _summary(lengths),
        "pairs": {name: _summary(values) for name, values in parts.items()},
        "histogram": histogram(lengths, max_seq_len),
        "total_tokens": sum(sum(values) for values in parts.values()),
        **_tally_figures(tally),
        "truncation_rule": PAIR_TRUNCATION_RULE,
        "trained_tokens_from": "the chosen and rejected answers after the prompt (the prompt "
        "carries no loss)",
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "vocab_size": int(getattr(tokenizer, "vocab_size", 0) or 0),
        },
        "sample": _pair_sample(tokenizer, sample, chat_template) if sample else None,
    }


def counted(rows: list[dict[str, Any]], told: Told | None) -> Iterator[dict[str, Any]]:
    """The rows, telling `told(done, total)` how many went by, at most every PROGRESS_SECONDS
    and once at the end: a report of a million rows takes minutes, and says that it works."""
    next_at = 0.0
    for done, row in enumerate(rows):
        if told is not None and time.monotonic() >= next_at:
            told(done, len(rows))
            next_at = time.monotonic() + PROGRESS_SECONDS
        yield row
    if told is not None:
        told(len(rows), len(rows))


def _pair_sample(tokenizer: Any, row: dict[str, Any], chat_template: str | None) -> dict[str, Any]:
    prompt, chosen, rejected = answer_texts(tokenizer, row, chat_template)
    return {
        "line": row.get("line"),
        "chosen": [{"text": prompt, "trained": False}, {"text": chosen, "trained": True}],
        "rejected": [{"text": prompt, "trained": False}, {"text": rejected, "trained": True}],
    }


def _summary(values: list[int]) -> dict[str, Any]:
    ordered = sorted(values)
    return {
        "min": ordered[0] if ordered else 0,
        "p50": _percentile(ordered, 50),
        "p95": _percentile(ordered, 95),
        "max": ordered[-1] if ordered else 0,
        "mean": round(sum(ordered) / len(ordered), 1) if ordered else 0,
    }


def _measure(
    tokenizer: Any,
    row: dict[str, Any],
    train_on: str,
    max_seq_len: int,
    chat_template: str | None,
    tally: _Tally,
) -> None:
    line = row.get("line")
    whole = tokenize_row(tokenizer, row, train_on, UNLIMITED, chat_template)
    if whole is None:  # nothing to train even uncut: training drops it
        length = len(tokenize_row(tokenizer, row, "all", UNLIMITED, chat_template) or [])
        tally.lengths.append(length)
        tally.untrainable += 1
        if line is not None and len(tally.untrainable_lines) < MAX_LINES_LISTED:
            tally.untrainable_lines.append(line)
        return
    tally.lengths.append(len(whole))
    kept = whole
    if len(whole) > max_seq_len and is_plain_text(row):
        # What training does with it (tokenize_rows' default): consecutive max-length chunks.
        chunks = text_chunks(tokenizer, row, max_seq_len)
        tally.over_rows += 1
        if line is not None and len(tally.over_lines) < MAX_LINES_LISTED:
            tally.over_lines.append(line)
        tally.split += 1
        tally.chunks += len(chunks)
        tally.examples += len(chunks)
        tally.tokens_per_epoch += sum(len(c) for c in chunks)
        tally.trained_per_epoch += sum(c.trained_tokens for c in chunks)
        return
    if len(whole) > max_seq_len:
        # Ask the training function itself what becomes of the row at this length.
        cut = tokenize_row(tokenizer, row, train_on, max_seq_len, chat_template)
        tally.over_rows += 1
        if line is not None and len(tally.over_lines) < MAX_LINES_LISTED:
            tally.over_lines.append(line)
        if cut is None:
            tally.dropped_after_cut += 1
            return
        tally.truncated += 1
        tally.tokens_cut += len(whole) - len(cut)
        kept = cut
    tally.examples += 1
    tally.tokens_per_epoch += len(kept)
    tally.trained_per_epoch += sum(label != IGNORE_INDEX for label in kept.labels)


def _sample(
    tokenizer: Any, rows: list[dict[str, Any]], max_seq_len: int, chat_template: str | None
) -> dict[str, Any] | None:
    """The first training row with a tool call, else with an assistant reply (else the first
    row), rendered twice."""
    replies = [r for r in rows if any(m.get("role") == "assistant" for m in r.get("messages", []))]
    calls = [r for r in replies if any(m.get("tool_calls") for m in r["messages"])]
    chosen = next(iter(calls or replies or rows), None)
    if chosen is None:
        return None
    return {
        "line": chosen.get("line"),
        **{
            train_on: [
                piece
                for text, trained in trained_segments(
                    tokenizer, chosen, train_on, max_seq_len, chat_template
                )
                for piece in _tool_pieces(text, trained)
            ]
            for train_on in ("assistant", "all")
        },
    }


def _tool_pieces(text: str, trained: bool) -> list[dict[str, Any]]:
    """A sample segment cut where the template wrote tool definitions or calls, those marked."""
    pieces: list[dict[str, Any]] = []
    for part in TOOL_MARKUP.split(text):
        if not part:
            continue
        piece: dict[str, Any] = {"text": part, "trained": trained}
        if TOOL_MARKUP.fullmatch(part):
            piece["tool"] = "definitions" if part.startswith("<tools>") else "call"
        pieces.append(piece)
    return pieces


def _training_rows(dataset_dir: Path) -> tuple[list[dict[str, Any]], int]:
    """The rows a job trains on at the dataset's own eval fraction, and how many are held out."""
    datasets_dir, dataset_id = dataset_dir.parent, dataset_dir.name
    try:
        rows = list(iter_rows(datasets_dir, dataset_id, "train"))
    except DatasetRowsMissing as exc:
        raise ReportFailed("dataset_missing", exc.message, "Upload the file again.") from exc
    return rows, sum(1 for _ in iter_rows(datasets_dir, dataset_id, "eval"))


def _percentile(sorted_values: list[int], pct: float) -> int:
    """Nearest-rank percentile (a length that some row really has)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def histogram(
    lengths: list[int], max_seq_len: int, max_bins: int = MAX_BINS
) -> list[dict[str, int]]:
    """Bins of a round width covering 0..longest, counting rows with lo < length <= hi.

    `max_seq_len` is always an edge, so a bin is either wholly within the limit or wholly over
    it (app.js draws bins with lo >= max length in the danger colour).
    """
    if not lengths:
        return []
    top = max(lengths)
    width = _round_width(max(top, 1) / max_bins)
    edges = list(range(0, top + width, width))
    if len(edges) < 2 or edges[-1] < top:
        edges.append(edges[-1] + width)
    if 0 < max_seq_len < edges[-1] and max_seq_len not in edges:
        edges = sorted([*edges, max_seq_len])
    counts = [0] * (len(edges) - 1)
    for length in lengths:
        # first edge >= length closes the bin: lo < length <= hi; length 0 goes to the first bin
        index = bisect.bisect_left(edges, length)
        counts[max(index - 1, 0)] += 1
    return [
        {"lo": lo, "hi": hi, "count": count}
        for lo, hi, count in zip(edges[:-1], edges[1:], counts, strict=True)
    ]


def _round_width(raw: float) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least `raw` (and at least 1)."""
    magnitude = 10 ** max(0, math.floor(math.log10(max(raw, 1))))
    for step in (1, 2, 5, 10):
        if step * magnitude >= raw:
            return int(step * magnitude)
    return int(10 * magnitude)


def _pair_tokens(pair: TokenizedPair) -> int:
    """A pair's tokens, its prompt counted once (the report's measure, not a training batch's)."""
    return len(pair.prompt_ids) + len(pair.chosen_ids) + len(pair.rejected_ids)


def main(argv: list[str] | None = None) -> int:
    return child_main(
        "dataset_report",
        compute_and_store,
        argv,
        "Compute dataset token reports (settings from TUNEBOARD_* variables).",
        pending=run_pending_reports,
        by_id="--report-id",
    )


def _tally_figures(tally: _Tally) -> dict[str, Any]:
    """What a report says of the epoch and of the rows the max length cuts (rows and pairs)."""
    return {
        "tokens_per_epoch": tally.tokens_per_epoch,
        "trained_tokens_per_epoch": tally.trained_per_epoch,
        "examples_per_epoch": tally.examples,
        "over_max": {
            "rows": tally.over_rows,
            "split": tally.split,
            "chunks": tally.chunks,
            "truncated": tally.truncated,
            "dropped": tally.dropped_after_cut,
            "tokens_cut": tally.tokens_cut,
            "lines": tally.over_lines,
        },
        "no_trained_tokens": {"rows": tally.untrainable, "lines": tally.untrainable_lines},
    }


if __name__ == "__main__":
    sys.exit(main())

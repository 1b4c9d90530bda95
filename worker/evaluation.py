"""The evaluation report of an adapter: did the fine-tune help, and where? The worker side.

When a job succeeds, `app/queue.py` queues an `Evaluation` of its adapter (a re-run is another
one); the worker's side-work thread (worker/side_work.py) claims it once the GPU is free of
training, holds the GPU's compute lock (worker/gpu_lock.py) for it, and runs
`python -m worker.evaluation --task-id N --attempt A`. On the job's held-out rows
(`app.dataset_store.iter_rows(..., "eval", eval_fraction=...)`, the rows training held out):

- the loss of base and adapter on the trained tokens (worker.token_logps: never a whole
  sequence's logits at once), tokenised and masked by the recipe's own functions
  (`worker.data.tokenize_rows` for sft; `worker.recipes.preference` for dpo and orpo, where the
  loss is on the chosen answers), and its perplexity;
- preference adapters: reward accuracy and margin, with `answer_logps` (the recipe's scoring).
  The base prefers the chosen answer when its own log-probability of it is higher than of the
  rejected one (margin: the difference); the adapter's reward is DPO's implicit reward against
  the base, beta x ((adapter - base) on chosen - (adapter - base) on rejected);
- greedy answers of base and adapter to up to `max_prompts` held-out prompts (the setting
  `eval_max_prompts` unless the request says), the row's own answer as the reference, scored by
  `worker.evaluation_scores`; and with a judge (worker/judge.py), its verdicts.

The base and the adapter are the playground's (`worker.inference.Engine`: one base, the adapter
on it, "base" under `disable_adapter()`). Progress (stage, steps done of total, ETA) and the rows
answered so far are written to the row as they come, fenced by the claim, so the page streams
them; the figures are written only with `succeeded`. A new attempt (the worker died) starts
again from nothing, and a cancelled one is left with no figures and no rows: only a succeeded
evaluation is ever a report.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from app import side_queue
from app.dataset_errors import DatasetError
from app.dataset_store import DatasetRowsMissing, iter_rows
from app.db import Database
from app.generation import GenerationRequest
from app.models import Adapter, BaseModelEntry, Dataset, Evaluation, Job, SideWorkStatus
from app.settings import Settings
from app.train_config import TrainConfig
from worker import evaluation_scores, gpu
from worker.data import tokenize_rows
from worker.errors import TrainingError
from worker.gpu_lock import GpuLocks
from worker.inference import Engine, InferenceError
from worker.judge import Judge, JudgeError
from worker.progress_meter import metered, reading
from worker.side_work import LOCK_HELD_ENV, child_main
from worker.token_logps import trained_token_logps

log = logging.getLogger("tuneboard.evaluation")

PREFERENCE_METHODS = ("dpo", "orpo")
WAIT_SECONDS = 1.0


class EvaluationFailed(Exception):
    """An evaluation that cannot be done, with what the user can do about it."""

    def __init__(self, kind: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.kind, self.message, self.hint = kind, message, hint


class Cancelled(Exception):
    """The user cancelled the evaluation while it ran."""


@dataclass
class Progress:
    """Writes the stage, the steps done, the ETA and the rows so far; raises Cancelled."""

    db: Database
    claim: side_queue.SideClaim
    total: int = 0
    done: int = 0
    started: float = field(default_factory=time.monotonic)

    def stage(self, stage: str, **fields: Any) -> None:
        self._write(stage=stage, **fields)

    def step(self, **fields: Any) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        self._write(progress_done=self.done, progress_total=self.total, eta_seconds=eta, **fields)

    def _write(self, **fields: Any) -> None:
        with self.db.read() as s:
            row = s.get(Evaluation, self.claim.task_id)
            if row is not None and row.cancel_requested:
                raise Cancelled
        if not side_queue.update_progress(self.db, self.claim, **fields):
            raise Cancelled  # the claim went stale: another attempt owns it, write nothing


@dataclass
class Subject:
    """What one evaluation needs, read once from the database."""

    evaluation: Evaluation
    adapter: Adapter
    base: BaseModelEntry
    job: Job
    config: TrainConfig


def load_subject(db: Database, task_id: int) -> Subject:
    with db.read() as s:
        evaluation = s.get(Evaluation, task_id)
        if evaluation is None:
            raise EvaluationFailed("not_found", f"There is no evaluation {task_id}.")
        adapter = s.get(Adapter, evaluation.adapter_id)
        if adapter is None:
            raise EvaluationFailed(
                "adapter_deleted",
                f"Adapter {evaluation.adapter_id} was deleted, so there is nothing to evaluate.",
                "Train the job again to get an adapter to evaluate.",
            )
        job = s.get(Job, adapter.job_id)
        base = s.get(BaseModelEntry, adapter.base_model)
        dataset = s.get(Dataset, job.dataset_id) if job else None
    if job is None:
        raise EvaluationFailed("job_deleted", f"The job of adapter {adapter.id} was deleted.")
    if base is None:
        raise EvaluationFailed(
            "model_not_found",
            f"Adapter {adapter.id} was trained on {adapter.base_model}, which is no longer "
            "registered.",
            "Register that base model again on the Models page, then run the evaluation again.",
        )
    if dataset is None:
        raise EvaluationFailed(
            "dataset_deleted",
            f"The dataset job {job.id} trained on was deleted, so its held-out rows are gone.",
            "Upload the dataset again and train a new job to get a report.",
        )
    return Subject(evaluation, adapter, base, job, TrainConfig.model_validate(job.config))


def held_out_rows(settings: Settings, subject: Subject) -> list[dict[str, Any]]:
    config = subject.config
    try:
        rows = list(
            iter_rows(settings, config.dataset_id, "eval", eval_fraction=config.eval_fraction)
        )
    except DatasetRowsMissing as exc:
        raise EvaluationFailed(
            "dataset_deleted",
            f"The rows of the dataset job {subject.job.id} trained on are gone from the data "
            "dir (deleted or moved).",
            exc.hint,
        ) from exc
    if not rows:
        raise EvaluationFailed(
            "no_held_out_rows",
            f"Job {subject.job.id} held out no rows (eval_fraction {config.eval_fraction:g}), "
            "so there is nothing to evaluate the adapter on.",
            "Train with an eval fraction above 0 (and a dataset of at least 2 rows).",
        )
    return rows


def judge_for(settings: Settings, evaluation: Evaluation) -> Judge | None:
    """The request's judge, else the settings' one, else None. The key is the setting's only."""
    asked = evaluation.judge or {}
    url = asked.get("url") or settings.judge_url
    model = asked.get("model") or settings.judge_model
    if not url or not model:
        return None
    key = settings.judge_api_key.get_secret_value() if settings.judge_api_key else None
    rubric = asked.get("rubric") or settings.judge_rubric
    return Judge(url, model, rubric, key, settings.judge_timeout_seconds)


# --- prompts and references ---------------------------------------------------------------------


def prompt_and_reference(row: dict[str, Any]) -> tuple[list[dict[str, str]], str] | None:
    """The conversation up to its last answer, and that answer; None for a row without one."""
    if "prompt" in row and "chosen" in row:  # a preference pair: the chosen answer is the reference
        answers = [m for m in row["chosen"] if m.get("role") == "assistant"]
        return (list(row["prompt"]), answers[-1]["content"]) if answers else None
    messages = row.get("messages") or []
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or not any(m.get("role") == "user" for m in messages[:last]):
        return None
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:last]]
    return prompt, messages[last]["content"]


def prompt_text(messages: list[dict[str, str]]) -> str:
    """The prompt as the report shows it: the question alone, or every turn with its role."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


# --- the figures --------------------------------------------------------------------------------


def _loss_figures(total_nll: float, tokens: int) -> dict[str, float | None]:
    if not tokens:
        return {"eval_loss": None, "perplexity": None}
    loss = total_nll / tokens
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 700.0))}


def sft_losses(
    engine: Engine, tokenizer: Any, config: TrainConfig, rows: list[dict[str, Any]], step: Callable
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Base and adapter loss on the assistant tokens (the recipe's masking), per trained token."""
    examples, _ = tokenize_rows(tokenizer, rows, str(config.train_on), config.max_seq_len, None)
    model = engine.model
    nll = {"base": 0.0, "adapter": 0.0}
    tokens = 0
    with torch.inference_mode():
        for example in examples:
            input_ids = torch.tensor([example.input_ids], device=model.device)
            labels = torch.tensor([example.labels], device=model.device)
            batch = {"input_ids": input_ids, "labels": labels}
            with model.disable_adapter():
                base_logps, _ = trained_token_logps(model, batch)
            logps, _ = trained_token_logps(model, batch)
            nll["base"] -= float(base_logps.float().sum())
            nll["adapter"] -= float(logps.float().sum())
            tokens += logps.numel()
            step()
    return _loss_figures(nll["base"], tokens), _loss_figures(nll["adapter"], tokens)


def preference_figures(
    engine: Engine, tokenizer: Any, config: TrainConfig, rows: list[dict[str, Any]], step: Callable
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Loss on the chosen answers, reward accuracy and margin of base and adapter on the pairs."""
    from worker.recipes.preference import PairCollator, answer_logps, tokenize_pairs

    pairs, _ = tokenize_pairs(tokenizer, rows, config.max_seq_len, None)
    beta = float(config.beta or 0.1)
    model, collate = engine.model, PairCollator()
    base_margins, adapter_rewards = [], []
    nll = {"base": 0.0, "adapter": 0.0}
    tokens = 0
    with torch.inference_mode():
        for pair in pairs:
            batch = {
                k: v.to(model.device) if torch.is_tensor(v) else v
                for k, v in collate([pair]).items()
            }
            with model.disable_adapter():
                base_logps, counts = answer_logps(model, batch)
            logps, _ = answer_logps(model, batch)
            base_margins.append(float(base_logps[0] - base_logps[1]))
            chosen, rejected = logps[0] - base_logps[0], logps[1] - base_logps[1]
            adapter_rewards.append(beta * float(chosen - rejected))
            nll["base"] -= float(base_logps[0])
            nll["adapter"] -= float(logps[0])
            tokens += int(counts[0])
            step()

    def rewards(values: list[float]) -> dict[str, float | None]:
        if not values:
            return {"reward_accuracy": None, "reward_margin": None}
        return {
            "reward_accuracy": sum(v > 0 for v in values) / len(values),
            "reward_margin": sum(values) / len(values),
        }

    base = {**_loss_figures(nll["base"], tokens), **rewards(base_margins), "pairs": len(pairs)}
    adapter = {
        **_loss_figures(nll["adapter"], tokens),
        **rewards(adapter_rewards),
        "pairs": len(pairs),
    }
    return base, adapter


def answer(
    engine: Engine,
    tokenizer: Any,
    adapter: Adapter,
    messages: list[dict[str, str]],
    max_new_tokens: int,
    *,
    base: bool,
    heard: list[str] | None = None,
) -> str:
    """The greedy answer of the base (adapter off) or the adapter, through the playground's code;
    `heard` gets its pieces too, as they come."""
    request = GenerationRequest(
        model=adapter.id, messages=messages, temperature=0, max_new_tokens=max_new_tokens
    )
    pieces: list[str] = []

    def emit(piece: str) -> None:
        pieces.append(piece)
        if heard is not None:
            heard.append(piece)

    engine.generate(request, None if base else adapter, tokenizer, emit)
    return "".join(pieces).strip()


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def judge_row(judge: Judge, row: dict[str, Any]) -> dict[str, Any]:
    """Two verdicts, base first then adapter first: the adapter's share of the win (tie: half)."""
    try:
        first = judge.verdict(
            row["prompt"], row["reference"], row["base_answer"], row["adapter_answer"]
        )
        second = judge.verdict(
            row["prompt"], row["reference"], row["adapter_answer"], row["base_answer"]
        )
    except JudgeError as exc:
        return {"error": str(exc)}
    points = {"A": 0.0, "tie": 0.5, "B": 1.0}
    adapter_points = points[first] + (1.0 - points[second])
    return {"verdicts": [first, second], "adapter_score": adapter_points / 2}


def evaluate(settings: Settings, db: Database, claim: side_queue.SideClaim) -> dict[str, Any]:
    """Compute a claimed evaluation; returns the fields `finish` stores with `succeeded`."""
    subject = load_subject(db, claim.task_id)
    progress = Progress(db, claim)
    # A new attempt starts from nothing: rows of an attempt that died are not this one's.
    progress.stage(
        "reading the held-out rows", rows=[], progress_done=0, progress_total=0, eta_seconds=None
    )
    rows = held_out_rows(settings, subject)
    method = str(subject.config.method)
    limit = subject.evaluation.max_prompts
    limit = settings.eval_max_prompts if limit is None else limit
    prompts = [p for p in map(prompt_and_reference, rows) if p is not None][:limit]
    judge = judge_for(settings, subject.evaluation)
    progress.total = len(rows) + len(prompts) * (2 if judge else 1)

    loading = "loading the base model and the adapter"
    progress.stage(loading, method=method)
    engine = Engine(settings, db)
    try:
        with reading(progress.stage, loading):
            tokenizer = engine.prepare(subject.base, subject.adapter)
    except InferenceError as exc:
        raise EvaluationFailed(exc.code, exc.message, exc.hint) from exc

    progress.stage("loss on the held-out rows")
    if method in PREFERENCE_METHODS:
        base, adapter = preference_figures(engine, tokenizer, subject.config, rows, progress.step)
    else:
        base, adapter = sft_losses(engine, tokenizer, subject.config, rows, progress.step)
    base["rows"] = adapter["rows"] = len(rows)
    base["compute_mode"] = adapter["compute_mode"] = engine.compute_mode  # e.g. "bf16 on CUDA"

    answering = "answering held-out prompts"
    progress.stage(answering)
    answered: list[dict[str, Any]] = []
    # A step is two answers of up to eval_max_new_tokens: minutes for a large model, so the text
    # written so far is progress too (the side loop's stall watchdog reads it).
    heard: list[str] = []
    limit_tokens = settings.eval_max_new_tokens
    with metered(
        progress.stage,
        lambda: sum(map(len, heard)),
        lambda written: {"stage": f"{answering}: {written:,} characters written"},
    ):
        for messages, reference in prompts:
            base_answer = answer(
                engine, tokenizer, subject.adapter, messages, limit_tokens, base=True, heard=heard
            )
            adapter_answer = answer(
                engine, tokenizer, subject.adapter, messages, limit_tokens, base=False, heard=heard
            )
            base_scores = evaluation_scores.score(base_answer, reference)
            adapter_scores = evaluation_scores.score(adapter_answer, reference)
            answered.append(
                {
                    "prompt": prompt_text(messages),
                    "reference": reference,
                    "base_answer": base_answer,
                    "adapter_answer": adapter_answer,
                    "base_scores": base_scores,
                    "adapter_scores": adapter_scores,
                    # where they differ most: the adapter's ROUGE-L gain (negative: it did worse)
                    "difference": adapter_scores["rouge_l"] - base_scores["rouge_l"],
                }
            )
            progress.step(rows=answered)
    for name in evaluation_scores.SCORES:
        base[name] = mean([r["base_scores"][name] for r in answered])
        adapter[name] = mean([r["adapter_scores"][name] for r in answered])
    base["prompts"] = adapter["prompts"] = len(answered)

    judged: dict[str, Any] = {}
    if judge is not None:
        progress.stage(f"asking the judge ({judge.model})")
        for row in answered:
            row["judge"] = judge_row(judge, row)
            progress.step(rows=answered)
        scores = [r["judge"]["adapter_score"] for r in answered if "adapter_score" in r["judge"]]
        judged = {
            **judge.describe(),
            "judged": len(scores),
            "errors": sum("error" in r["judge"] for r in answered),
            "adapter_win_rate": mean(scores),
            "base_win_rate": None if not scores else 1 - (mean(scores) or 0.0),
        }
    return {
        "stage": "done",
        "method": method,
        "base_figures": base,
        "adapter_figures": adapter,
        "judge_figures": judged,
        "rows": answered,
        "eta_seconds": 0.0,
        "progress_done": progress.total,
        "progress_total": progress.total,
    }


def run_claimed_evaluation(settings: Settings, db: Database, claim: side_queue.SideClaim) -> bool:
    """Run a claimed evaluation and record how it ended. False if the claim went stale."""
    try:
        result = evaluate(settings, db, claim)
    except Cancelled:
        return side_queue.finish(db, claim, SideWorkStatus.failed, **side_queue.CANCELLED)
    except EvaluationFailed as exc:
        return _fail(db, claim, exc.kind, exc.message, exc.hint)
    except (TrainingError, DatasetError) as exc:
        return _fail(db, claim, "evaluation_failed", exc.message, exc.hint)
    except Exception as exc:
        log.exception("evaluation %s failed", claim.task_id)
        out_of_memory = isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError)
        return _fail(
            db,
            claim,
            "out_of_memory" if out_of_memory else "evaluation_failed",
            f"The evaluation failed: {exc}",
            "The machine ran out of memory."
            if out_of_memory
            else "Look at worker-side.log in "
            "the data dir for the details, then run the evaluation again.",
        )
    return side_queue.finish(db, claim, SideWorkStatus.succeeded, **result)


def _fail(db: Database, claim: side_queue.SideClaim, kind: str, message: str, hint: str) -> bool:
    # No half-written report: what the attempt wrote so far goes with the failure.
    return side_queue.finish(
        db,
        claim,
        SideWorkStatus.failed,
        error_kind=kind,
        error_message=message,
        error_hint=hint,
        stage="failed",
        base_figures={},
        adapter_figures={},
        judge_figures={},
        rows=[],
        eta_seconds=None,
    )


def hold_the_gpu(settings: Settings, db: Database, claim: side_queue.SideClaim) -> GpuLocks:
    """The compute lock of this process's GPUs, waiting (and saying so) while training holds it."""
    locks = GpuLocks(
        gpu.parse_gpus(os.environ.get("CUDA_VISIBLE_DEVICES", "")),
        settings.gpu_lock_dir,
        role="compute",
    )
    told = False
    while not locks.try_acquire():
        if not told:
            side_queue.update_progress(
                db, claim, stage="waiting for the GPU: a training job is using it"
            )
            told = True
        time.sleep(WAIT_SECONDS)
    return locks


def run_with_the_gpu(settings: Settings, db: Database, claim: side_queue.SideClaim) -> bool:
    """`run_claimed_evaluation` holding the GPU's compute lock: the side loop hands its child the
    lock it took; run by hand, the child takes its own."""
    locks = None if os.environ.get(LOCK_HELD_ENV) else hold_the_gpu(settings, db, claim)
    try:
        return run_claimed_evaluation(settings, db, claim)
    finally:
        if locks is not None:
            locks.release()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO)
    return child_main("evaluation", run_with_the_gpu, argv, "Evaluate an adapter against its base.")


if __name__ == "__main__":
    raise SystemExit(main())

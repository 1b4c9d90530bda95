"""The preference recipes (DPO, ORPO) on the real tiny demo model, on the CPU: the loss and its
gradients against TRL's on the same pairs, packing that keeps pairs apart, and short runs that
learn, stop, resume and save."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sqlmodel import col, select

from app import queue
from app.db import Database
from app.migrate import upgrade
from app.models import Adapter, Dataset, JobStatus, Metric
from app.train_config import Method, TrainConfig
from tests.fakes.real_workers import (
    RealWorkers,
    add_dataset,
    add_demo,
    real_job,
    short_lease_settings,
)
from tests.worker.test_loop import finished, wait_for
from worker.metrics import ListSink
from worker.preference_data import TokenizedPair, tokenize_pair
from worker.recipes import RECIPES, recipe_for
from worker.recipes.dpo import DPORecipe
from worker.recipes.orpo import ORPORecipe
from worker.recipes.preference import PairCollator, answer_logps
from worker.recipes.sft import LocalControl

pytestmark = pytest.mark.slow


def _pairs(demo_dataset: Path) -> list[dict]:
    """Preference rows from the demo chats: the demo's answer is chosen, another row's answer
    (about something else) is rejected."""
    chats = [json.loads(line)["messages"] for line in demo_dataset.read_text().splitlines()]
    rows = []
    for number, messages in enumerate(chats[:24], start=1):
        other = chats[(number * 7) % len(chats)]
        rows.append(
            {
                "line": number,
                "prompt": messages[:-1],
                "chosen": [messages[-1]],
                "rejected": [other[-1]],
            }
        )
    return [r for r in rows if r["chosen"] != r["rejected"]]


@pytest.fixture(scope="module")
def pair_rows(demo_dataset: Path, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _pairs(demo_dataset)))
    return path


def _config(method: str, **overrides) -> TrainConfig:
    fields = dict(
        dataset_id="0" * 32,
        method=method,
        max_steps=8,
        micro_batch_size=2,
        grad_accum_steps=1,
        max_seq_len=128,
        learning_rate=5e-3,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        lora_r=8,
        lora_alpha=16,
        eval_fraction=0.0,
        eval_every=1000,
        save_every=1000,
        logging_every=1,
        seed=7,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def _base_model(demo_model: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)


LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")


def _nudged(model):
    """LoRA B starts at zero (the adapter is the base): nudge it, so the adapter and the
    reference differ and the comparison has something to compare."""
    from transformers import set_seed

    set_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.02)
    return model


def _lora_model(demo_model: Path):
    from peft import LoraConfig, get_peft_model

    return _nudged(get_peft_model(_base_model(demo_model), LoraConfig(**LORA)))


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradients_match_trls_dpo_trainer_on_the_same_pairs(
    demo_model, demo_dataset, tokenizer, tmp_path, loss_type
):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    rows = _pairs(demo_dataset)[:4]
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=0.2,
        loss_type=[loss_type],
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=None,
        per_device_train_batch_size=4,
    )
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    # The adapter from a LoRA config, as users run TRL: its reference is the base model.
    trl = DPOTrainer(
        model=_base_model(demo_model),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    model = _nudged(trl.model)
    model.train()
    processed = [trl.train_dataset[i] for i in range(len(rows))]
    # The same tokens on both sides: TRL's (ours leave out the separator after the end of turn).
    ours = [TokenizedPair(t["prompt_ids"], t["chosen_ids"], t["rejected_ids"]) for t in processed]
    for pair, row in zip(ours, rows, strict=True):
        mine = tokenize_pair(tokenizer, row, 10_000)
        assert mine.prompt_ids == pair.prompt_ids
        assert pair.chosen_ids[: len(mine.chosen_ids)] == mine.chosen_ids

    model.zero_grad()
    trl_loss = trl.compute_loss(model, trl.data_collator(processed))
    trl_loss.backward()
    trl_grads = _lora_grads(model)

    model.zero_grad()
    recipe = DPORecipe(
        _config("dpo", beta=0.2, loss_type=loss_type),
        demo_model,
        tmp_path,
        ListSink(),
        LocalControl(),
        train_examples=ours,
    )
    our_loss = recipe.batch_loss(model, PairCollator()([ours]))
    our_loss.backward()
    our_grads = _lora_grads(model)

    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-4, atol=1e-5)
    assert our_grads.keys() == trl_grads.keys() and len(our_grads) > 10
    for name in trl_grads:
        torch.testing.assert_close(our_grads[name], trl_grads[name], rtol=1e-3, atol=1e-6)
    figures = recipe.logged_figures("train")
    assert set(figures) == {
        "rewards_chosen",
        "rewards_rejected",
        "reward_margin",
        "reward_accuracy",
    }
    assert figures["reward_margin"] != 0.0  # the adapter differs from the base


def test_orpos_odds_ratio_term_matches_trls(demo_model, demo_dataset, tokenizer, tmp_path):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    model = _lora_model(demo_model)
    pairs = [tokenize_pair(tokenizer, row, 10_000) for row in _pairs(demo_dataset)[:4]]
    batch = PairCollator()([pairs])
    logps, tokens = answer_logps(model, batch)
    average = logps / tokens
    beta = 0.3
    stand_in = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=average.device))
    trl_losses, trl_chosen, trl_rejected, _, _ = ORPOTrainer.odds_ratio_loss(
        stand_in, average[0::2], average[1::2]
    )

    recipe = ORPORecipe(
        _config("orpo", beta=beta),
        demo_model,
        tmp_path,
        ListSink(),
        LocalControl(),
        train_examples=pairs,
    )
    loss = recipe.batch_loss(model, batch)
    nll = -logps[0::2].sum() / tokens[0::2].sum()
    torch.testing.assert_close(loss, nll - trl_losses.mean())
    figures = recipe.logged_figures("train")
    assert figures["rewards_chosen"] == pytest.approx(float(trl_chosen.mean()), rel=1e-5)
    assert figures["rewards_rejected"] == pytest.approx(float(trl_rejected.mean()), rel=1e-5)


def test_pairs_packed_in_one_row_score_as_they_do_alone(demo_model, demo_dataset, tokenizer):
    """No sequence attends to another in the padding-free row: each answer's log-probability is
    the one it has in a batch of its own."""
    model = _lora_model(demo_model).eval()
    pairs = [tokenize_pair(tokenizer, row, 10_000) for row in _pairs(demo_dataset)[:5]]
    with torch.no_grad():
        together, tokens = answer_logps(model, PairCollator()([pairs]))
        alone = torch.cat([answer_logps(model, PairCollator()([[p]]))[0] for p in pairs])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    want = [n for p in pairs for n in (len(p.chosen_ids), len(p.rejected_ids))]
    assert tokens.tolist() == want


def test_every_training_method_has_a_recipe():
    assert set(RECIPES) == {m.value for m in Method}
    assert recipe_for("dpo") is DPORecipe and recipe_for("orpo") is ORPORecipe


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_short_preference_run_prefers_the_chosen_answers_resumes_and_saves(
    method, demo_model, pair_rows, tmp_path
):
    def run(config, output_dir, control=None):
        sink, control = ListSink(), control or LocalControl()
        # Evaluated on the pairs it trains on: has it learnt to prefer their chosen answers?
        recipe = recipe_for(method)(
            config,
            demo_model,
            output_dir,
            sink,
            control,
            rows_path=pair_rows,
            eval_rows_path=pair_rows,
        )
        try:
            recipe.setup()
            result = recipe.train()
            adapter = recipe.save() if result.stop_reason is None else None
        finally:
            recipe.cleanup()
        return result, sink, control, adapter

    # ORPO's reward is beta x the mean log-odds: it moves slower than DPO's on the tiny model
    learning_rate = {"dpo": 1e-3, "orpo": 1e-2}[method]
    config = _config(method, max_steps=8, save_every=4, eval_every=4, learning_rate=learning_rate)
    stopped, first, _, _ = run(config, tmp_path, LocalControl(stop_at_step=4))
    assert stopped.stop_reason == "cancel" and stopped.global_step == 4
    result, sink, control, adapter = run(config, tmp_path)

    assert result.resumed_from_step == 4 and result.global_step == 8
    rows = first.train_rows + sink.train_rows
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    for row in rows:
        assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= set(
            row
        )
        assert row["tokens"] > 0
    evals = first.eval_rows + sink.eval_rows
    assert [r["step"] for r in evals] == [4, 8]
    # The chosen answers gain on the rejected ones, and more with more training.
    margins = [r["eval_reward_margin"] for r in evals]
    assert margins[0] < margins[1], margins
    if method == "dpo":  # ORPO's margin starts below 0 on the SentencePiece demo and climbs slower
        assert margins[0] > 0 and evals[-1]["eval_reward_accuracy"] > 0.5, evals
    assert control.fields["compute_mode"].startswith("fp32 LoRA on the CPU")
    saved = TrainConfig.model_validate_json((adapter / "train_config.json").read_text())
    assert saved.method == method and saved.beta == 0.1
    assert (adapter / "adapter_model.safetensors").is_file()


def test_a_dpo_job_runs_through_the_queue_and_writes_reward_rows(
    tmp_path, demo_build, demo_dataset
):
    """The real worker loop and training child (`python -m worker.run`) on a DPO job: the method
    picks the recipe, the rows and their rewards reach the database, the adapter is registered."""
    settings = short_lease_settings(tmp_path / "data")
    upgrade(settings.resolved_database_url)
    database = Database(settings.resolved_database_url)
    add_demo(database, settings, demo_build)  # the demo model, registered
    pairs = add_dataset(database, settings, "e" * 32, "pairs", _pairs(demo_dataset))
    with database.write() as s:
        row = s.get(Dataset, pairs)
        row.format = "preference"
        s.add(row)
    job = real_job(
        database, pairs, method="dpo", max_steps=4, max_seq_len=128, eval_fraction=0.2, eval_every=4
    )
    workers = RealWorkers(settings, tmp_path)
    try:
        workers.start()
        done = wait_for(lambda: finished(database, job.id), timeout=300, what="the DPO job")
    finally:
        workers.stop_all()
    assert done.status == JobStatus.succeeded, (done.error_kind, done.error_message)
    # The job page's start timing, dated from the claim by the training child.
    assert done.start_timing.startswith("claim to first step "), done.start_timing
    assert "model load" in done.start_timing and "trial steps" in done.start_timing
    with database.read() as s:
        rows = list(s.exec(select(Metric).where(Metric.job_id == job.id).order_by(col(Metric.id))))
        adapter = s.get(Adapter, f"job-{job.id}")
    train = [r for r in rows if r.loss is not None]
    evals = [r for r in rows if r.eval_loss is not None]
    assert [r.step for r in train] == [1, 2, 3, 4]
    assert all(r.rewards_chosen is not None and r.reward_accuracy is not None for r in train)
    assert evals and evals[-1].eval_reward_margin is not None
    assert adapter is not None
    assert queue.get_job(database, job.id).config["method"] == "dpo"
    database.dispose()

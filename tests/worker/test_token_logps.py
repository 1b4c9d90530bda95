"""Losses from slices of the logits (worker.token_logps), on the real tiny demo model, on the CPU."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tests.worker.conftest import lora_recipe
from worker import token_logps


class LogitRows(TorchFunctionMode):
    """The most token rows any vocabulary-wide tensor had while it was on (logits, their
    softmax)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.most = vocab, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if torch.is_tensor(out) and out.dim() and out.shape[-1] == self.vocab:
            self.most = max(self.most, out.numel() // self.vocab)
        return out


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_a_jobs_evaluation_is_the_models_loss_without_a_whole_batchs_logits(
    demo_model, demo_rows, tmp_path, monkeypatch, packing
):
    """The evaluation a job runs (every `eval_every` steps and after its last) gives the model's
    own loss on the held-out batches, and no vocabulary-wide tensor ever has more tokens than
    one slice: a whole batch's fp32 logits ran an 8 GB card's job out of memory after its last
    step (bench/RESULTS.md, session 16)."""
    recipe = lora_recipe(
        demo_model, demo_rows, tmp_path, eval_fraction=0.2, packing=packing, max_seq_len=64
    )
    try:
        vocab = recipe.model.get_output_embeddings().weight.shape[0]
        slice_tokens = 8
        monkeypatch.setattr(token_logps, "SLICE_BYTES", 4 * vocab * slice_tokens)
        trainer = recipe.trainer
        batches = [trainer._prepare_inputs(b) for b in trainer.get_eval_dataloader()]
        recipe.model.eval()
        with torch.no_grad():
            own = [float(recipe.model(**batch).loss) for batch in batches]
            ours = [float(trainer.compute_loss(recipe.model, dict(b))) for b in batches]
        assert ours == pytest.approx(own, rel=1e-5)
        assert max(int((b["labels"] != -100).sum()) for b in batches) > 4 * slice_tokens

        rows = LogitRows(vocab)
        with rows:
            metrics = trainer.evaluate()
        assert 0 < rows.most <= slice_tokens
        if packing:  # one packed row a batch: the Trainer's mean is the batches' mean
            assert metrics["eval_loss"] == pytest.approx(sum(own) / len(own), rel=1e-5)
    finally:
        recipe.cleanup()


def test_a_slice_boundary_changes_no_token_log_probability(
    demo_model, demo_rows, tmp_path, monkeypatch
):
    """Slices of 1, 5 and all tokens give every trained token the same log-probability, and
    the same gradient flows back through slices recomputed in the backward pass."""
    recipe = lora_recipe(demo_model, demo_rows, tmp_path, eval_fraction=0.0)
    try:
        batch = next(iter(recipe.trainer.get_train_dataloader()))
        batch = recipe.trainer._prepare_inputs(batch)
        batch.pop("real_tokens", None)
        vocab = recipe.model.get_output_embeddings().weight.shape[0]
        lora = [p for p in recipe.model.parameters() if p.requires_grad]
        results = []
        for tokens in (1, 5, 10**6):
            monkeypatch.setattr(token_logps, "SLICE_BYTES", 4 * vocab * tokens)
            recipe.model.zero_grad(set_to_none=True)
            logps, trained = token_logps.trained_token_logps(recipe.model, batch)
            logps.sum().backward()
            grads = torch.cat([p.grad.flatten() for p in lora])
            results.append((logps.detach(), grads))
        assert logps.numel() == int(trained.sum()) > 5
        for logps, grads in results[:-1]:
            torch.testing.assert_close(logps, results[-1][0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grads, results[-1][1], rtol=1e-4, atol=1e-5)
    finally:
        recipe.cleanup()

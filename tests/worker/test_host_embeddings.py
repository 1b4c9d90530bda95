"""worker/host_embeddings.py on the CPU: the input embeddings moved to (pinned, on a GPU machine)
host memory give the same loss and LoRA gradients under every memory policy, keep the hook
reentrant checkpointing puts on them, and stay where they are when the model moves. Tied or
trained embeddings never move. On the GPU, tests/worker/test_gpu_recipe.py checks that `auto`
moves them when the card must checkpoint, and the card's memory they free."""

from __future__ import annotations

import pytest
import torch

from tests.worker.test_recipe import lora_gradients
from worker.host_embeddings import HostEmbedding, movable_bytes, move_to_host


def _assert_same(result, expected) -> None:
    loss, grads = result
    assert loss == pytest.approx(expected[0], rel=1e-6)
    for name, grad in expected[1].items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("policy", ["off", "on", "partial"])
def test_embeddings_in_host_memory_give_the_same_loss_and_gradients(recipe, policy):
    """Moved after checkpointing was set (transformers' hook that makes the embeddings' output
    want a gradient is then on the old module: without it, reentrant checkpointing gives the
    checkpointed layers no LoRA gradients), and again after the policy is set anew."""
    batch = recipe._longest_batch()
    recipe._set_memory_policy(policy, kept_layers=1)
    eager = lora_gradients(recipe, batch)
    table = recipe.model.get_input_embeddings().weight
    freed = move_to_host(recipe.model)
    assert freed == table.numel() * table.element_size() > 0
    moved = recipe.model.get_input_embeddings()
    assert isinstance(moved, HostEmbedding) and moved.table.device.type == "cpu"
    assert torch.equal(moved.table, table)
    _assert_same(lora_gradients(recipe, batch), eager)
    for again in ("off", policy):  # the hook comes off with checkpointing and back with it
        recipe._set_memory_policy(again, kept_layers=1)
    _assert_same(lora_gradients(recipe, batch), eager)
    assert move_to_host(recipe.model) == 0  # already there
    recipe.model.to("cpu", torch.float32)
    assert recipe.model.get_input_embeddings().table is moved.table  # not a parameter: stays


def test_the_embeddings_output_layer_shares_or_trains_stays_on_the_card():
    from transformers import LlamaForCausalLM

    from devkit.model_families import make_config, tiny_architecture

    def tiny(tied: bool) -> LlamaForCausalLM:
        config = make_config(tiny_architecture("llama", 64) | {"tie_word_embeddings": tied})
        return LlamaForCausalLM(config)

    tied = tiny(tied=True)
    tied.requires_grad_(False)
    assert movable_bytes(tied) == 0 and move_to_host(tied) == 0
    assert type(tied.get_input_embeddings()) is torch.nn.Embedding
    trained = tiny(tied=False)  # every weight wants a gradient: the embeddings are trained
    assert movable_bytes(trained) == 0
    frozen = tiny(tied=False)
    frozen.requires_grad_(False)
    table_bytes = 64 * frozen.config.hidden_size * 4
    assert movable_bytes(frozen) == table_bytes
    ids = torch.tensor([[1, 5, 63, 0]])
    before = frozen(ids).logits
    assert move_to_host(frozen) == table_bytes
    torch.testing.assert_close(frozen(ids).logits, before, rtol=0, atol=0)


def test_a_cpu_run_keeps_its_embeddings_where_they_are(demo_model, demo_rows, tmp_path):
    """The memory policy moves them only for a CUDA card (a CPU run has no card memory to free),
    and only when the card must checkpoint (tests/worker/test_gpu_recipe.py)."""
    from tests.worker.conftest import lora_recipe
    from worker.training import memory_policy

    recipe = lora_recipe(demo_model, demo_rows, tmp_path)
    try:
        assert memory_policy.embeddings_to_host(recipe) == 0
        assert type(recipe.model.get_input_embeddings()) is torch.nn.Embedding
        assert "host memory" not in recipe.compute_mode
    finally:
        recipe.cleanup()


@pytest.mark.parametrize(("freed", "said"), [(3 * 2**20, "3 MiB"), (int(1.02 * 2**30), "1.02 GiB")])
def test_the_compute_mode_says_what_moving_them_freed_in_a_unit_that_shows_it(
    demo_model, demo_rows, tmp_path, monkeypatch, freed, said
):
    """A small model's table is megabytes: "0.00 GiB freed" would say nothing was."""
    from tests.worker.conftest import lora_recipe
    from worker.training import memory_policy

    recipe = lora_recipe(demo_model, demo_rows, tmp_path)
    try:
        monkeypatch.setattr(recipe, "device", torch.device("cuda"))  # the card's branch, here
        monkeypatch.setattr(memory_policy.host_embeddings, "move_to_host", lambda model: freed)
        monkeypatch.setattr(memory_policy, "free_cuda", lambda: None)
        assert memory_policy.embeddings_to_host(recipe) == freed
        assert recipe.compute_mode.endswith(f", input embeddings in host memory ({said} freed)")
    finally:
        recipe.cleanup()

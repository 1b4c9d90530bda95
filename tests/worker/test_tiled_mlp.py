"""worker.tiled_mlp on the CPU: a Llama MLP with LoRA (and LoRA dropout) run a slice of tokens at
a time gives the same output and gradients as run whole, while its forward pass keeps only its
input for the backward pass."""

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from worker.tiled_mlp import tile_mlps, untile_mlps

TOKENS, HIDDEN, INTERMEDIATE = 100, 32, 128


@pytest.fixture
def layer():
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE))
    mlp.requires_grad_(False)  # the base weights are frozen, as in QLoRA
    lora = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["gate_proj", "up_proj", "down_proj"]
    )
    mlp = inject_adapter_in_model(lora, mlp)
    for name, param in mlp.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a non-zero B makes every gradient non-zero
            torch.nn.init.normal_(param, std=0.1)
    return SimpleNamespace(mlp=mlp.train())


def _run(layer, x, forward=None):
    """Output, input gradient, LoRA gradients, and the bytes the forward kept for backward."""
    kept = []

    def pack(tensor):
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    x = x.detach().requires_grad_(True)
    layer.mlp.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks for runs that draw them in the same order
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = (forward or layer.mlp)(x)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
    grads = {n: p.grad.clone() for n, p in layer.mlp.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads, sum(kept)


def _assert_same(run, reference):
    (out, grad_x, grads, _), (ref_out, ref_grad_x, ref_grads, _) = run, reference
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(grad_x, ref_grad_x)
    assert grads.keys() == ref_grads.keys() and len(grads) == 6
    for name, grad in ref_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, msg=name)


def test_slices_give_the_same_output_and_gradients_keeping_only_the_input(layer):
    layer.mlp.eval()  # no dropout: slices and the whole sequence compute the same function
    x = torch.randn(1, TOKENS, HIDDEN)
    whole = _run(layer, x)
    tile_mlps([layer], tokens=16)  # 7 slices, the last one shorter
    tiled = _run(layer, x)
    _assert_same(tiled, whole)
    # Whole, the forward keeps the intermediates (gate, up, their product...); tiled, its input
    # and the weights' references only.
    input_bytes = x.numel() * x.element_size()
    assert whole[3] > 3 * TOKENS * INTERMEDIATE * 4
    assert tiled[3] < 2 * input_bytes, (tiled[3], input_bytes)


def test_the_backward_pass_reruns_each_slice_with_its_forward_dropout_masks(layer):
    """With LoRA dropout the gradient is the one of the masks the forward pass drew: the same as
    plain autograd through the same slices in the same order."""
    x = torch.randn(1, TOKENS, HIDDEN)
    untiled = layer.mlp.forward
    reference = _run(layer, x, lambda x: torch.cat([untiled(p) for p in x.split(16, -2)], -2))
    tile_mlps([layer], tokens=16)
    _assert_same(_run(layer, x), reference)


def test_short_inputs_run_whole_and_untiling_restores_the_mlp(layer):
    forward = layer.mlp.forward
    tile_mlps([layer], tokens=TOKENS)  # no input longer than a slice: the MLP runs as before
    x = torch.randn(1, TOKENS, HIDDEN)
    _, _, _, kept = _run(layer, x)
    assert kept > 3 * TOKENS * INTERMEDIATE * 4
    untile_mlps([layer])
    assert layer.mlp.forward == forward and not hasattr(layer.mlp, "_untiled_forward")


def test_without_autograd_the_slices_still_bound_the_intermediates(layer):
    """A reentrant-checkpointed layer's first pass and evaluation run without autograd."""
    x = torch.randn(1, TOKENS, HIDDEN)
    layer.mlp.eval()  # no dropout: the two runs are comparable
    with torch.no_grad():
        whole = layer.mlp(x)
        tile_mlps([layer], tokens=16)
        calls = []
        handle = layer.mlp.down_proj.register_forward_hook(lambda m, i, o: calls.append(o.shape))
        tiled = layer.mlp(x)
        handle.remove()
    torch.testing.assert_close(tiled, whole)
    assert [shape[-2] for shape in calls] == [16] * 6 + [4]

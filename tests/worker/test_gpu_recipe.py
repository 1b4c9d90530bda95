"""The recipe on a real GPU: NF4 QLoRA on a ~1B Llama-shaped model (random weights, the demo
tokenizer). Run on the GPU machine with `pytest -m gpu tests/worker/test_gpu_recipe.py`."""

import gc
import json

import pytest
import torch

from app.train_config import TrainConfig
from worker.demo import build_demo_tokenizer
from worker.errors import OutOfMemory
from worker.metrics import ListSink
from worker.recipes.sft import LocalControl, SFTRecipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory, demo_dataset):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("models") / "llama-1b-shape"
    tokenizer = build_demo_tokenizer(demo_dataset)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    gc.collect()
    return folder


def _config(**overrides):
    fields = dict(
        dataset_id="0" * 32,
        max_steps=4,
        save_every=2,
        eval_every=2,
        micro_batch_size=4,
        grad_accum_steps=2,
        max_seq_len=512,
        quantization="nf4",
        seed=3,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def test_qlora_trains_checkpoints_resumes_and_saves(llama_1b, demo_rows, tmp_path):
    config = _config()
    control = LocalControl(stop_at_step=2, reason="shutdown")
    first = SFTRecipe(config, llama_1b, tmp_path, ListSink(), control, rows_path=demo_rows)
    first.setup()
    assert control.fields["compute_mode"].startswith("4-bit NF4 QLoRA")
    assert control.fields["memory_policy"] in ("off", "on", "offload")
    assert "trial step" in control.fields["memory_policy_reason"]
    # No fp32 upcast of the base: embeddings and lm_head stay bf16.
    base = first.model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert first.train().stop_reason == "shutdown"
    first.cleanup()

    sink = ListSink()
    second = SFTRecipe(config, llama_1b, tmp_path, sink, LocalControl(), rows_path=demo_rows)
    second.setup()
    result = second.train()
    assert result.resumed_from_step == 2 and result.global_step == 4
    adapter = second.save()
    second.cleanup()
    rows = sink.train_rows
    assert all(r["tokens_per_second"] and r["vram_allocated_mib"] for r in rows)
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == config.lora_r
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0


def test_oom_is_typed_and_vram_comes_back(llama_1b, tmp_path):
    rows = tmp_path / "rows.jsonl"
    text = "The Zephyr Kettle 3000 boils one litre of water in 94 seconds. " * 20000
    rows.write_text(json.dumps({"line": 1, "text": text}) + "\n")
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    config = _config(
        max_seq_len=131072,
        micro_batch_size=1,
        grad_accum_steps=1,
        packing=False,
        gradient_checkpointing="off",
        eval_fraction=0.0,
    )
    recipe = SFTRecipe(
        config, llama_1b, tmp_path / "run", ListSink(), LocalControl(), rows_path=rows
    )
    recipe.setup()
    with pytest.raises(OutOfMemory) as raised:
        recipe.train()
    error = raised.value
    assert error.kind == "oom" and error.micro_batch_size == 1 and error.seq_len > 100_000
    assert error.hint
    del raised, error
    recipe.cleanup()
    del recipe
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() - start < 64 * 1024**2

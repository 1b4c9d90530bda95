import gc
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.real_workers import RealWorkers
from worker.demo import build_demo_model, build_demo_tokenizer, write_demo_dataset


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "demo.jsonl")


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory, demo_dataset) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("models") / "demo-tiny-llama", demo_dataset)


@pytest.fixture(scope="session")
def demo_rows(tmp_path_factory, demo_dataset) -> Path:
    """The demo dataset as normalised rows (what the dataset side writes)."""
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    with demo_dataset.open() as source, path.open("w") as out:
        for number, line in enumerate(source, start=1):
            out.write(json.dumps({"line": number, **json.loads(line)}) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer(demo_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


@pytest.fixture
def real_workers(settings, tmp_path: Path) -> Iterator[RealWorkers]:
    """Real worker loops over the test's settings; killed, with their children, at the end."""
    workers = RealWorkers(settings, tmp_path)
    yield workers
    workers.stop_all()


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory, demo_dataset) -> Path:
    """A Llama-3.2-1B-shaped model with random bf16 weights and the demo tokenizer (GPU tests)."""
    import torch
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


LAYERS = 4  # the demo model's decoder layers


def lora_recipe(demo_model: Path, demo_rows: Path, tmp_path: Path, **overrides):
    """The demo model's SFT recipe, set up (unquantised, on the CPU), with every LoRA B
    non-zero: peft starts B at zero, and non-zero B makes every LoRA gradient non-zero."""
    import torch

    from app.train_config import TrainConfig
    from worker.metrics import ListSink
    from worker.recipes.sft import LocalControl, SFTRecipe

    fields = dict(
        dataset_id="0" * 32, max_steps=1, micro_batch_size=2, max_seq_len=64, lora_r=8,
        lora_alpha=16, lora_dropout=0.0, quantization="none", eval_fraction=0.0, seed=3,
    )  # fmt: skip
    config = TrainConfig(**{**fields, **overrides})
    recipe = SFTRecipe(
        config, demo_model, tmp_path, ListSink(), LocalControl(), rows_path=demo_rows
    )
    recipe.setup()
    for name, param in recipe.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return recipe


@pytest.fixture
def recipe(demo_model, demo_rows, tmp_path):
    """`lora_recipe` with the defaults, cleaned up after the test."""
    recipe = lora_recipe(demo_model, demo_rows, tmp_path)
    yield recipe
    recipe.cleanup()

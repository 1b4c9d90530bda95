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

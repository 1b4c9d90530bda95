"""Which runs can capture their decoder layers as CUDA graphs (worker/layer_graphs.py): the GPU
test's 1B shape under a few conditions, each capture's outcome and, where it failed, the
traceback. A diagnostic for the GPU machine: `python bench/graph_probe.py`."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

logging.basicConfig(level=logging.WARNING, stream=sys.stdout)


def main() -> None:
    from app.train_config import TrainConfig
    from worker.layer_graphs import graph_layers, graphs_of, ungraph_layers
    from worker.metrics import ListSink
    from worker.recipes.sft import LocalControl, SFTRecipe

    model, rows_demo = Path(sys.argv[1]), Path(sys.argv[2])
    work = Path(tempfile.mkdtemp())
    fixed = work / "fixed.jsonl"
    text = "the quick brown fox jumps over the lazy dog " * 40
    fixed.write_text("".join(json.dumps({"line": i + 1, "text": text}) + "\n" for i in range(64)))
    cases = [
        ("demo rows, auto policy, then off", rows_demo, "auto", "off"),
        ("demo rows, off set in the config", rows_demo, "off", "off"),
        ("fixed rows, off set in the config", fixed, "off", "off"),
        ("demo rows, on set in the config", rows_demo, "on", "on"),
    ]
    for name, rows, asked, policy in cases:
        config = TrainConfig(
            dataset_id="0" * 32, max_steps=1, micro_batch_size=8, max_seq_len=512,
            quantization="nf4", lora_dropout=0.0, gradient_checkpointing=asked, seed=3,
        )  # fmt: skip
        recipe = SFTRecipe(config, model, work / name.replace(" ", "_"), ListSink(),
                           LocalControl(), rows_path=rows)  # fmt: skip
        recipe.setup()
        recipe._set_memory_policy(policy)
        layers = recipe._decoder_layers()
        graphs = graphs_of(layers) or graph_layers(layers)
        batch = recipe._longest_batch()
        for _ in range(3):
            recipe.model.zero_grad(set_to_none=True)
            recipe.forward_backward(batch)
        torch.cuda.synchronize()
        alloc = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
        print(
            f"== {name} (allocator {alloc}): replays {graphs.replays}, failure {graphs.failure}",
            flush=True,
        )
        ungraph_layers(layers)
        recipe.cleanup()


if __name__ == "__main__":
    main()

"""Run the SFT recipe once, alone or as one rank under torchrun (tests/worker/test_gpu_multi.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 \
        -m tests.worker.gpu_multi_driver --model M --rows R --out DIR --config '{...}'

Rank 0 writes DIR/result.json: the TrainResult fields and the metric rows.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from app.train_config import TrainConfig
from worker.metrics import ListSink
from worker.recipes.sft import LocalControl, SFTRecipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--rows", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", required=True, help="TrainConfig fields as JSON")
    parser.add_argument("--stop-at", type=int, default=None)
    args = parser.parse_args()
    config = TrainConfig.model_validate(json.loads(args.config))
    sink = ListSink()
    control = LocalControl(stop_at_step=args.stop_at, reason="shutdown")
    recipe = SFTRecipe(config, args.model, args.out, sink, control, rows_path=args.rows)
    recipe.setup()
    try:
        result = recipe.train()
        if result.stop_reason is None:
            recipe.save()
        if int(os.environ.get("RANK", "0")) == 0:
            (args.out / "result.json").write_text(
                json.dumps(
                    {
                        "global_step": result.global_step,
                        "stop_reason": result.stop_reason,
                        "resumed_from_step": result.resumed_from_step,
                        "compute_mode": recipe.compute_mode,
                        "rows": sink.rows,
                    }
                )
            )
    finally:
        recipe.cleanup()


if __name__ == "__main__":
    main()

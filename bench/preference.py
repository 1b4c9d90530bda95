"""Preference training (DPO) throughput: pairs a second, three arms, one table.

    python bench/preference.py --shape 8b --cap-gib 22.5      # on the GPU machine (bench/gpu.sh dpo)
    python bench/preference.py --smoke                         # the harness on the CPU

Arms, each in its own process, on the same random-initialised model folder (bench/train.py's
cache) and the same pairs:

- `trl`: TRL's `DPOTrainer` with a PEFT LoRA config on the 4-bit model, as its docs run it
  (gradient checkpointing on, padded batches of `--pairs` pairs, the reference the base with the
  adapter off, computed every step).
- `unsloth`: Unsloth's DPO path: `PatchDPOTrainer()`, `FastLanguageModel` 4-bit +
  `get_peft_model(use_gradient_checkpointing="unsloth")`, then TRL's `DPOTrainer` (its own site
  with trl<=1.15; `import unsloth` first in its process).
- `tuneboard`: the product's `worker.recipes.dpo.DPORecipe` (the code the worker runs), pairs
  packed without padding, `gradient_checkpointing: auto`.

Pairs: a prompt and two answers, token ids in [3, 1000) (the bench tokenizer's words, so TRL's
text path tokenizes them one to one), log-normal lengths (prompt mean ~190, answers ~250 at --max-len
2048, at most a quarter and a half of it), each answer ending in EOS. LoRA r=16 alpha=32 on q,k,v,o,gate,up,down; AdamW
lr 5e-6; beta 0.1, sigmoid loss. Pairs/s = pairs of the timed optimizer steps / their time,
after `--warmup` steps; for the packing arm, pairs = real tokens / the mean tokens of a pair.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.train import (
    GIB,
    LORA_TARGETS,
    SHAPES,
    bnb_config,
    build_model_dir,
    keep_process_peak,
    require_product_kernels,
    versions,
)

ARMS = ("trl", "unsloth", "tuneboard")
_FIELDS: dict = {}
EOS = 128001  # the bench model's EOS (Llama-3's <|end_of_text|>); the smoke model's is 2


def make_pairs(n: int, seed: int, eos: int, vocab: int, max_len: int) -> list[dict]:
    """Prompt at most max_len/4 tokens, each answer at most max_len/2: a side always fits."""
    rng = random.Random(seed)
    top = min(vocab, 1000) - 4  # the bench tokenizer's words w0..w{top-1} are ids 0..top-1
    scale = max_len / 2048

    def length(mean: float, most: int) -> int:
        drawn = rng.lognormvariate(math.log(mean * scale) - 0.5, 1.0)
        return int(min(most, max(8, drawn)))

    def words(k: int) -> list[int]:
        return [rng.randrange(3, top) for _ in range(k)]

    pairs = []
    for _ in range(n):
        prompt = words(length(190, max_len // 4))
        answers = [[*words(length(250, max_len // 2 - 1)), eos] for _ in range(2)]
        chosen, rejected = answers
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def pair_tokens(pair: dict) -> int:
    return 2 * len(pair["prompt"]) + len(pair["chosen"]) + len(pair["rejected"])


# --- child side ----------------------------------------------------------------------------------


class StepTimes:
    """A TrainerCallback recording each optimizer step's wall time (the GPU waited for)."""

    def __new__(cls):
        import torch
        from transformers import TrainerCallback

        class _Times(TrainerCallback):
            def __init__(self) -> None:
                self.times: list[float] = []
                self.losses: list[float] = []
                self._start = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self._start)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    self.losses.append(float(logs["loss"]))

        return _Times()


def text_dataset(pairs: list[dict]):
    from datasets import Dataset

    def text(ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids if i != EOS)

    # TRL adds the EOS to each answer of a text (not chat) dataset.
    rows = [{k: text(p[k]) for k in ("prompt", "chosen", "rejected")} for p in pairs]
    return Dataset.from_list(rows)


def run_trl_arm(args, pairs: list[dict]) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.arm == "unsloth":
        from unsloth import FastLanguageModel, PatchDPOTrainer

        PatchDPOTrainer()
    from trl import DPOConfig, DPOTrainer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    peft_config = None
    if args.arm == "unsloth":
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(args.model_path),
            max_seq_length=args.max_len,
            dtype=torch.bfloat16,
            load_in_4bit=True,
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=args.seed,
        )
    else:
        cuda = torch.cuda.is_available()
        model = AutoModelForCausalLM.from_pretrained(
            args.model_path,
            dtype=torch.bfloat16 if cuda else torch.float32,
            quantization_config=bnb_config() if cuda and not args.smoke else None,
            device_map={"": 0} if cuda else None,
        )
        peft_config = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            task_type="CAUSAL_LM",
        )
    config = DPOConfig(
        output_dir=str(Path(args.result).with_suffix(".run")),
        beta=0.1,
        loss_type=["sigmoid"],
        learning_rate=5e-6,
        per_device_train_batch_size=args.pairs,
        gradient_accumulation_steps=1,
        max_steps=args.warmup + args.steps,
        max_length=args.max_len,
        gradient_checkpointing=args.arm == "trl",  # Unsloth brings its own
        bf16=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=text_dataset(pairs),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    load_s = time.perf_counter() - t0
    times = StepTimes()
    trainer.add_callback(times)
    trainer.train()
    timed = times.times[args.warmup :]
    seconds = sum(timed)
    n_pairs = args.pairs * len(timed)
    mean_tokens = sum(map(pair_tokens, pairs)) / len(pairs)
    return {
        "ok": True,
        "load_s": load_s,
        "steps": len(timed),
        "pairs_per_second": n_pairs / seconds,
        "tokens_per_second": n_pairs * mean_tokens / seconds,
        "median_step_s": sorted(timed)[len(timed) // 2],
        "first_loss": times.losses[0] if times.losses else None,
        "pairs_per_step": args.pairs,
    }


def run_tuneboard_arm(args, pairs: list[dict]) -> dict:
    import torch

    import worker  # noqa: F401  (its GPU-process settings, before CUDA starts, as in the worker)
    from app.train_config import TrainConfig
    from worker.control import LocalControl
    from worker.metrics import ListSink
    from worker.recipes.dpo import DPORecipe
    from worker.recipes.preference import TokenizedPair

    config = TrainConfig(
        name="bench",
        base_model="bench",
        dataset_id="0" * 32,
        method="dpo",
        beta=0.1,
        loss_type="sigmoid",
        max_seq_len=args.max_len,
        max_steps=args.warmup + args.steps,
        micro_batch_size=args.tb_micro_batch,
        grad_accum_steps=1,
        learning_rate=5e-6,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        lora_targets=LORA_TARGETS,
        quantization="nf4" if torch.cuda.is_available() and not args.smoke else "none",
        packing=True,
        gradient_checkpointing=args.tb_checkpointing,
        eval_fraction=0.0,
        eval_every=1_000_000,
        save_every=1_000_000,
        logging_every=1,
        seed=args.seed,
    )
    train = [TokenizedPair(p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    sink, control = ListSink(), LocalControl()
    _FIELDS.update(fields=control.fields)  # what the recipe said, kept for a failed arm's row
    out_dir = Path(args.result).with_suffix(".run")
    recipe = DPORecipe(config, args.model_path, out_dir, sink, control, train_examples=train)
    try:
        t0 = time.perf_counter()
        recipe.setup()
        load_s = time.perf_counter() - t0
        require_product_kernels(recipe)
        recipe.train()
    finally:
        recipe.cleanup()
    rows = [r for r in sink.train_rows][args.warmup :]
    seconds = sum(r["step_seconds"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    mean_tokens = sum(map(len, train)) / len(train)
    return {
        "ok": True,
        "load_s": load_s,
        "steps": len(rows),
        "pairs_per_second": tokens / mean_tokens / seconds,
        "tokens_per_second": tokens / seconds,
        "median_step_s": sorted(r["step_seconds"] for r in rows)[len(rows) // 2],
        "first_loss": sink.train_rows[0]["loss"] if sink.train_rows else None,
        "pairs_per_step": round(tokens / mean_tokens / len(rows), 2),
        "memory_policy": control.fields.get("memory_policy"),
        "compute_mode": control.fields.get("compute_mode"),
    }


def child(args) -> None:
    result: dict = {"arm": args.arm}
    if args.arm == "unsloth":
        try:
            import unsloth  # noqa: F401  (first: it patches transformers at import)
        except Exception as exc:
            result["skipped"] = f"import unsloth failed: {type(exc).__name__}: {exc}"[:300]
            Path(args.result).write_text(json.dumps(result))
            return
    import torch

    if torch.cuda.is_available():
        if args.cap_gib:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total))
        keep_process_peak(torch)
    vocab = SHAPES[args.shape]["vocab_size"]
    pairs = make_pairs(args.n_pairs, args.seed, args.eos, vocab, args.max_len)
    try:
        run = run_tuneboard_arm if args.arm == "tuneboard" else run_trl_arm
        result.update(run(args, pairs))
    except Exception as exc:
        import traceback

        traceback.print_exc()
        text = f"{type(exc).__name__}: {exc}"
        result["oom" if "out of memory" in text.lower() else "error"] = text[:500]
        fields = _FIELDS.get("fields") or {}
        result["memory_policy"] = fields.get("memory_policy")
        result["memory_policy_reason"] = fields.get("memory_policy_reason")
    if torch.cuda.is_available():
        from bench.train import _PEAK

        result["peak_alloc_gib"] = max(_PEAK["alloc"], torch.cuda.max_memory_allocated()) / GIB
        result["peak_reserved_gib"] = max(_PEAK["reserved"], torch.cuda.max_memory_reserved()) / GIB
    Path(args.result).write_text(json.dumps(result))


# --- parent side ---------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--pairs", type=int, default=4, help="pairs a step, padded arms")
    parser.add_argument("--tb-micro-batch", type=int, default=2, help="x max-len tokens, packed")
    parser.add_argument("--tb-checkpointing", default="auto")
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cap-gib", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/tuneboard-bench-cache"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/tuneboard-bench-work"))
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--site", default="", help="extra site for the trl/tuneboard arms")
    parser.add_argument("--unsloth-site", default="")
    parser.add_argument("--deadline", type=float, default=0.0, help="epoch seconds")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--name", default="", help="output files' name (default dpo-<shape>)")
    # child
    parser.add_argument("--arm")
    parser.add_argument("--model-path")
    parser.add_argument("--result")
    parser.add_argument("--n-pairs", type=int, default=0)
    parser.add_argument("--eos", type=int, default=EOS)
    args = parser.parse_args(argv)
    if args.arm:
        child(args)
        return 0

    if args.smoke:
        args.shape, args.steps, args.warmup, args.max_len, args.pairs = "smoke", 2, 1, 256, 2
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = build_model_dir(args.shape, args.cache, args.seed)
    eos = EOS if SHAPES[args.shape]["vocab_size"] > 128000 else 2
    n_pairs = max(64, args.pairs * (args.steps + args.warmup + 1) * 4)
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, **versions()}
    results = []
    for arm in args.arms.split(","):
        if args.deadline and time.time() > args.deadline - 60:
            results.append({"arm": arm, "skipped": "deadline"})
            continue
        result_path = args.work / f"{args.name or 'dpo-' + args.shape}-{arm}.json"
        result_path.unlink(missing_ok=True)
        # A run folder left by an earlier call holds its final checkpoint: the recipe would
        # resume from it and train no step.
        shutil.rmtree(result_path.with_suffix(".run"), ignore_errors=True)
        env = dict(os.environ)
        site = args.unsloth_site if arm == "unsloth" else args.site
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, site, env.get("PYTHONPATH")) if p)
        command = [
            sys.executable,
            __file__,
            "--arm",
            arm,
            "--model-path",
            str(model_path),
            "--result",
            str(result_path),
            "--n-pairs",
            str(n_pairs),
            "--eos",
            str(eos),
            *("--shape", args.shape, "--pairs", str(args.pairs), "--max-len", str(args.max_len)),
            *("--tb-micro-batch", str(args.tb_micro_batch), "--steps", str(args.steps)),
            *("--tb-checkpointing", args.tb_checkpointing, "--warmup", str(args.warmup)),
            *("--cap-gib", str(args.cap_gib), "--seed", str(args.seed)),
        ]
        if args.smoke:
            command.append("--smoke")
        timeout = max(60.0, args.deadline - time.time() - 20) if args.deadline else None
        print(f"--> {arm}", flush=True)
        try:
            with result_path.with_suffix(".log").open("w") as log:
                subprocess.run(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
                )
        except subprocess.TimeoutExpired:
            pass
        result = json.loads(result_path.read_text()) if result_path.exists() else {"arm": arm}
        result.setdefault("arm", arm)
        if not any(k in result for k in ("ok", "oom", "error", "skipped")):
            result["error"] = "no result (timed out or crashed): see the arm's log"
        results.append(result)
        print(f"<-- {arm}: {json.dumps(result)[:400]}", flush=True)
    lines = table(args, results, meta)
    print("\n".join(lines))
    name = args.name or f"dpo-{args.shape}"
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0 if any(r.get("ok") for r in results) else 1


def table(args, results: list[dict], meta: dict) -> list[str]:
    base = next((r for r in results if r.get("arm") == "trl" and r.get("ok")), None)
    lines = [
        f"DPO, {SHAPES[args.shape].get('label', args.shape)}, "
        f"cap {args.cap_gib or 'none'} GiB, {meta.get('gpu')}, torch {meta.get('torch')}, "
        f"transformers {meta.get('transformers')}, peft {meta.get('peft')}, trl {meta.get('trl')}",
        "",
        "| arm | pairs/s | x trl | tokens/s (real) | median step s | pairs a step | peak alloc GiB "
        "| load s | first loss | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if not r.get("ok"):
            why = r.get("skipped") or r.get("oom") or r.get("error") or "?"
            if r.get("memory_policy"):
                why += f" (policy {r['memory_policy']}: {r.get('memory_policy_reason')})"
            lines.append(f"| {r['arm']} | - | - | - | - | - | - | - | - | {why[:400]} |")
            continue
        ratio = f"{r['pairs_per_second'] / base['pairs_per_second']:.2f}" if base else "-"
        peak = r.get("peak_alloc_gib")
        note = r.get("memory_policy") or ""
        if r.get("memory_policy_reason"):
            note += f": {r['memory_policy_reason']}"
        lines.append(
            f"| {r['arm']} | {r['pairs_per_second']:.2f} | {ratio} | {r['tokens_per_second']:,.0f} "
            f"| {r['median_step_s']:.3f} | {r['pairs_per_step']} | "
            f"{'-' if peak is None else f'{peak:.2f}'} | {r['load_s']:.1f} | "
            f"{r['first_loss'] if r['first_loss'] is None else round(r['first_loss'], 4)} | {note} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

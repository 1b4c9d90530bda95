"""Training throughput and memory benchmark: standard QLoRA recipe vs Unsloth vs Tuneboard.

Runs on the GPU machine (see bench/README.md for the exact device command) and prints one markdown
table; `--smoke` runs the same harness on the CPU with a tiny Llama and no 4-bit, so the harness
itself is tested by tests/bench/test_bench_smoke.py.

This parent process never imports torch: every arm runs in its own subprocess (kernel patches such
as Unsloth's and Liger's are global), with the same seed and the same synthetic token data, and
writes one JSON result that the parent collects. Results are written after every arm, so a run
stopped by the device's time limit still leaves its table behind.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # devkit, when run as a script

from devkit import model_families as families  # noqa: E402

ARMS = ("standard", "unsloth", "tuneboard")
# Tuneboard with its memory policy forced instead of "auto" (e.g. to compare VRAM at equal policy).
TUNEBOARD_VARIANTS = ("tuneboard-on", "tuneboard-off", "tuneboard-offload", "tuneboard-tiled")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
H200_BF16_PEAK_FLOPS = 790e12  # measured 8192^3 bf16 matmul on this workplace's H200 (KINDS.md)
GIB = 1024**3
SMOKE_TOKENS_PER_GIB = 64  # --smoke on the CPU: what a memory cap lets a step hold, in tokens

# The published architectures (devkit.model_families: each model's config.json values) and how
# the harness runs them: `batch` sequences of --seq tokens a step (fixed data; Tuneboard's packed
# rows), `var_batch` examples a step for the padded arms on variable-length data.
RUN_KEYS = ("label", "batch", "var_batch")
_PUBLISHED_SHAPES = {
    "1b": ("llama-3.2-1b", 4, 16),
    "3b": ("llama-3.2-3b", 2, 8),
    "8b": ("llama-3.1-8b", 2, 8),
    "qwen7b": ("qwen2.5-7b", 2, 8),
    "mistral7b": ("mistral-7b-v0.3", 2, 8),
    "gemma9b": ("gemma-2-9b", 2, 8),
}
SHAPES: dict[str, dict] = {
    key: {"label": families.label(name), **families.architecture(name), "batch": b, "var_batch": v}
    for key, (name, b, v) in _PUBLISHED_SHAPES.items()
}
# The harness's own test shapes: tiny, CPU, seconds; one per family (`smoke` is the Llama).
for _family in families.FAMILY_MODELS:
    SHAPES["smoke" if _family == "llama" else f"smoke-{_family}"] = {
        "label": f"tiny-{_family} (smoke)",
        **families.tiny_architecture(_family, vocab_size=1024),
        "batch": 2,
        "var_batch": 4,
    }


def matmul_params(shape: dict) -> int:
    """N on the 4N basis: weights that take part in matrix products (every projection and lm_head;
    the embedding lookup is not a product)."""
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    head_dim = shape.get("head_dim") or h // shape["num_attention_heads"]
    q = shape["num_attention_heads"] * head_dim
    kv = shape["num_key_value_heads"] * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * inter
    return shape["num_hidden_layers"] * per_layer + h * shape["vocab_size"]


# ---------------------------------------------------------------------------------------------
# Synthetic data: the same seeded token ids in every arm.


def make_examples(kind: str, n: int, seq_len: int, vocab: int, seed: int) -> list[list[int]]:
    """`fixed`: n sequences of exactly seq_len tokens. `variable`: log-normal lengths (mean about
    350 tokens at seq_len 2048, scaled with seq_len), clipped to [16, seq_len]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if kind == "fixed":
        lengths = [seq_len] * n
    else:
        sigma = 1.0
        mean = 350 * seq_len / 2048
        mu = math.log(mean) - sigma**2 / 2
        lengths = np.clip(rng.lognormal(mu, sigma, n).astype(int), 16, seq_len).tolist()
    # Stay below the Llama-3 special tokens (128000+) so every id is an ordinary token.
    high = min(vocab, 128000)
    return [rng.integers(3, high, size=length).tolist() for length in lengths]


def padded_batches(examples: list[list[int]], batch: int, pad_id: int) -> list[dict]:
    """HF-style per-batch padding (right side), labels = input_ids with -100 on padding."""
    import torch

    out = []
    for i in range(0, len(examples) - batch + 1, batch):
        chunk = examples[i : i + batch]
        width = max(len(x) for x in chunk)
        ids = torch.full((batch, width), pad_id, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for row, x in enumerate(chunk):
            ids[row, : len(x)] = torch.tensor(x)
            mask[row, : len(x)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


# ---------------------------------------------------------------------------------------------
# Model cache: random-initialised weights of the real architecture, saved once like a hub model.


def build_model_dir(shape_name: str, cache: Path, seed: int) -> Path:
    shape = SHAPES[shape_name]
    arch = {k: v for k, v in shape.items() if k not in RUN_KEYS}
    import hashlib

    tag = f"{shape_name}-{hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:8]}"
    path = cache / tag
    cache.mkdir(parents=True, exist_ok=True)
    # One process builds; others asking at once (searches run side by side, two streams) wait
    # for it and then find it built.
    with open(cache / f"{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "DONE").exists():
            import torch

            make_room(cache, keep=path, need_bytes=2 * matmul_params(shape) + 2 * GIB)
            config = families.make_config(arch)
            config.dtype = "bfloat16"
            families.save_random_model(config, path, seed=seed, dtype=torch.bfloat16)
            save_tokenizer(path, shape["vocab_size"])
            (path / "DONE").write_text("ok\n")
    os.utime(path)  # recently used: the last that make_room removes
    return path


def make_room(cache: Path, keep: Path, need_bytes: int) -> None:
    """Delete the least recently used cached models until `need_bytes` are free: the ladder's six
    bf16 models (about 75 GB) do not fit the GPU machine's disk together."""
    import shutil

    cached = sorted(
        (p for p in cache.iterdir() if p.is_dir() and p != keep),
        key=lambda p: p.stat().st_mtime,
    )
    while shutil.disk_usage(cache).free < need_bytes and cached:
        victim = cached.pop(0)
        print(f"model cache: removing {victim.name} to make room", flush=True)
        shutil.rmtree(victim, ignore_errors=True)


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A small word-level tokenizer with Llama-3's special tokens: the data is already token ids,
    but loaders (Unsloth's, maybe the recipe's) expect a tokenizer beside the weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<unk>"]
    words = [f"w{i}" for i in range(min(vocab_size, 1000) - len(specials))]
    vocab = {tok: i for i, tok in enumerate(words + specials)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
        unk_token="<unk>",
        model_max_length=131072,
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(path)


# ---------------------------------------------------------------------------------------------
# Child side: one arm, one shape, one data kind, in its own process.


def child_main(args: argparse.Namespace) -> None:
    result: dict = {"arm": args.arm, "shape": args.shape, "data": args.data}
    if args.arm == "unsloth":
        # Unsloth patches transformers at import time: it must come first, and only here.
        try:
            import unsloth  # noqa: F401
        except Exception as exc:
            result["skipped"] = f"import unsloth failed: {type(exc).__name__}: {exc}"[:300]
            Path(args.result).write_text(json.dumps(result))
            return
    tokens = args.seq * args.batch
    if args.smoke and args.cap_gib and tokens > args.cap_gib * SMOKE_TOKENS_PER_GIB:
        # The CPU has no card to fill: a smoke cap stands for a token budget, so that the
        # ladder's does-not-fit search runs in tests/bench.
        budget = int(args.cap_gib * SMOKE_TOKENS_PER_GIB)
        result["oom"] = f"smoke cap: {tokens} tokens a step, over the stand-in budget of {budget}"
        Path(args.result).write_text(json.dumps(result))
        return
    if args.arm.startswith("tuneboard"):
        import worker  # noqa: F401  (its GPU-process settings, before CUDA starts, as in the worker)
    import torch

    if torch.cuda.is_available():
        if args.cap_gib:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * GIB / total))
            result["cap_gib"] = args.cap_gib
        keep_process_peak(torch)
    try:
        result.update(run_arm(args))
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower()
        result["oom" if oom else "error"] = text[:500]
        if not oom:
            import traceback

            traceback.print_exc()
    if torch.cuda.is_available():
        result["peak_alloc_gib"] = max(_PEAK["alloc"], torch.cuda.max_memory_allocated()) / GIB
        result["peak_reserved_gib"] = max(_PEAK["reserved"], torch.cuda.max_memory_reserved()) / GIB
        # Allocations that had to free the cache and retry: a sign of a fragmented, full card.
        result["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
        result["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    Path(args.result).write_text(json.dumps(result))


_PEAK = {"alloc": 0, "reserved": 0}


def keep_process_peak(torch) -> None:
    """The recipe resets CUDA peak stats per metric row and per memory-policy trial; record the
    peak before every reset so the arm reports its whole process's peak, like the other arms."""
    original = torch.cuda.reset_peak_memory_stats

    def reset(*a, **kw):
        _PEAK["alloc"] = max(_PEAK["alloc"], torch.cuda.max_memory_allocated())
        _PEAK["reserved"] = max(_PEAK["reserved"], torch.cuda.max_memory_reserved())
        return original(*a, **kw)

    torch.cuda.reset_peak_memory_stats = reset


def run_arm(args: argparse.Namespace) -> dict:
    shape = SHAPES[args.shape]
    examples = make_examples(args.data, args.n_examples, args.seq, shape["vocab_size"], args.seed)
    if args.arm.startswith("tuneboard"):
        return run_tuneboard(args, examples)
    return run_plain_loop(args, examples)


def bnb_config():
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_standard(args: argparse.Namespace):
    """The tutorial recipe: 4-bit load, prepare_model_for_kbit_training (fp32 cast of every
    non-4-bit weight, reentrant gradient checkpointing), LoRA on every projection."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32, "attn_implementation": "sdpa"}
    if getattr(AutoConfig.from_pretrained(args.model_path), "attn_logit_softcapping", None):
        kwargs["attn_implementation"] = "eager"  # Gemma-2: sdpa has no soft-capping (HF's advice)
    if cuda and not args.smoke:
        kwargs |= {"quantization_config": bnb_config(), "device_map": {"": 0}}
    model = AutoModelForCausalLM.from_pretrained(args.model_path, **kwargs)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()  # from_pretrained returns eval mode; HF checkpointing acts only in train mode
    return model


def load_unsloth(args: argparse.Namespace):
    import torch
    from unsloth import FastLanguageModel

    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(args.model_path),
        max_seq_length=args.seq,
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
    FastLanguageModel.for_training(model)
    return model


def run_plain_loop(args: argparse.Namespace, examples: list[list[int]]) -> dict:
    """A plain timed loop (the same for `standard` and `unsloth`): AdamW, one optimizer step per
    padded batch, loss.item() each step so the timing includes the whole step."""
    import peft  # noqa: F401  (imported before the clock starts, as the recipe's are)
    import torch
    import transformers  # noqa: F401

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = load_unsloth(args) if args.arm == "unsloth" else load_standard(args)
    load_s = time.perf_counter() - t0
    device = next(p.device for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    batches = padded_batches(examples, args.batch, pad_id=0)[: args.warmup + args.steps]
    losses, times, tokens = [], [], []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        sync(device)
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        sync(device)
        times.append(time.perf_counter() - t)
        tokens.append(int(batch["attention_mask"].sum()))
    return summarize(args, load_s, losses, times, tokens)


def tuneboard_recipe(
    model_path: Path,
    out_dir: Path,
    examples: list[list[int]],
    *,
    seq: int,
    batch: int,
    steps: int,
    checkpointing: str,
    seed: int,
    quantize: bool,
):
    """The product's recipe (worker.recipes.sft, the code the worker runs) as the benchmark
    configures it, fed pre-tokenized examples: (recipe, sink, control), not yet set up."""
    from app.train_config import TrainConfig
    from worker.data import TokenizedExample
    from worker.metrics import ListSink
    from worker.recipes.sft import SFTRecipe

    try:
        from worker.recipes.sft import LocalControl
    except ImportError:
        from worker.control import LocalControl

    config = TrainConfig(
        name="bench",
        base_model="bench",
        dataset_id="0" * 32,
        max_seq_len=seq,
        max_steps=steps,
        micro_batch_size=batch,
        grad_accum_steps=1,
        learning_rate=2e-4,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        lora_targets=LORA_TARGETS,
        quantization="nf4" if quantize else "none",
        train_on="all",
        packing=True,
        gradient_checkpointing=checkpointing,
        eval_fraction=0.0,
        eval_every=1_000_000,
        save_every=1_000_000,
        logging_every=1,
        seed=seed,
    )
    train = [TokenizedExample(input_ids=list(x), labels=list(x)) for x in examples]
    sink, control = ListSink(), LocalControl()
    recipe = SFTRecipe(
        config, model_path, out_dir, sink, control, train_examples=train, eval_examples=None
    )
    return recipe, sink, control


def run_tuneboard(args: argparse.Namespace, examples: list[list[int]]) -> dict:
    """The product's own recipe, the code the worker runs, fed pre-tokenized examples."""
    import torch

    recipe, sink, control = tuneboard_recipe(
        Path(args.model_path),
        Path(args.result).with_suffix(".run"),  # adapter/checkpoints: under the work dir
        examples,
        seq=args.seq,
        batch=args.batch,
        steps=args.warmup + args.steps,
        checkpointing=args.arm.partition("-")[2] or args.tb_checkpointing,
        seed=args.seed,
        quantize=torch.cuda.is_available() and not args.smoke,
    )
    try:
        t0 = time.perf_counter()
        recipe.setup()
        load_s = time.perf_counter() - t0
        require_product_kernels(recipe)
        result = recipe.train()
    finally:
        recipe.cleanup()
    rows = sink_rows(sink)
    losses, times, tokens = rows_to_steps(rows)
    fields = getattr(control, "fields", {})
    try:
        summary = summarize(args, load_s, losses, times, tokens)
    except RuntimeError as error:  # say what the recipe did, so a short run can be diagnosed
        raise RuntimeError(
            f"{error}; the recipe ended at step {result.global_step} "
            f"(stop reason {result.stop_reason}); its rows: {json.dumps(rows)[:3000]}; "
            f"its fields: {json.dumps(fields, default=str)[:1500]}"
        ) from error
    return summary | {
        "memory_policy": fields.get("memory_policy"),
        "memory_policy_reason": fields.get("memory_policy_reason"),
        "compute_mode": fields.get("compute_mode"),
        "notice": fields.get("notice"),
        "start": recipe.start_timing.as_dict(),
    }


def require_product_kernels(recipe) -> None:
    """Stop the Tuneboard arm when its recipe runs without a kernel the product uses on this
    machine: its figure would be of a slower recipe than a user with `make run` gets."""
    from app.verified_versions import LIGER_INSTALL

    missing = getattr(recipe, "missing_kernels", [])
    if missing:
        raise SystemExit(
            f"The Tuneboard arm would run without {', '.join(missing)}, which the product's "
            f"recipe uses on this machine ({recipe.compute_mode}); no figure is recorded. "
            f"Install it in the arm's site ({LIGER_INSTALL}) and run the arm again."
        )


def sink_rows(sink) -> list[dict]:
    rows = getattr(sink, "rows", None)
    if rows is None:
        rows = getattr(sink, "metrics", [])
    return [r if isinstance(r, dict) else dict(vars(r)) for r in rows]


def _first(row: dict, *names: str):
    for name in names:
        if row.get(name) is not None:
            return row[name]
    return None


def rows_to_steps(rows: list[dict]) -> tuple[list[float], list[float], list[int]]:
    """Per-step loss, seconds and real tokens from the recipe's metric rows (worker.metrics:
    `tokens` and `step_seconds` since the previous row, over `steps` optimizer steps). A row that
    covers several steps counts as that many equal steps."""
    rows = [r for r in rows if _first(r, "loss", "train_loss") is not None]
    losses, times, tokens = [], [], []
    prev_time = None
    for row in rows:
        loss = float(_first(row, "loss", "train_loss"))
        dt = _first(row, "step_seconds", "step_time_s", "step_time")
        stamp = _first(row, "elapsed_seconds", "time", "timestamp")
        if dt is None and isinstance(stamp, int | float) and prev_time is not None:
            dt = stamp - prev_time
        if isinstance(stamp, int | float):
            prev_time = stamp
        n_tok = _first(row, "tokens", "num_tokens")
        tps = _first(row, "tokens_per_second")
        if n_tok is None and tps is not None and dt:
            n_tok = tps * dt
        if dt is None and tps and n_tok:
            dt = n_tok / tps
        k = max(1, int(_first(row, "steps") or 1))
        for _ in range(k):
            losses.append(loss)
            times.append(float(dt) / k if dt is not None else float("nan"))
            tokens.append(int(n_tok) // k if n_tok is not None else 0)
    return losses, times, tokens


def summarize(args, load_s, losses, times, tokens) -> dict:
    timed = list(zip(times, tokens, strict=True))[args.warmup :]
    timed = [(t, n) for t, n in timed if t == t and t > 0]
    if not timed:
        raise RuntimeError(f"no timed steps ({len(times)} steps ran, warm-up {args.warmup})")
    step_s = statistics.median(t for t, _ in timed)
    # Real tokens per second: total non-padding tokens over total time of the timed steps.
    tps = sum(n for _, n in timed) / sum(t for t, _ in timed)
    return {
        "ok": True,
        "load_s": load_s,
        "steps_run": len(times),
        "step0_loss": losses[0] if losses else None,
        "median_step_s": step_s,
        "tokens_per_s": tps,
        "real_tokens_per_step": statistics.mean(n for _, n in timed),
    }


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Parent side: build models, launch arms, collect, print and write the table.


def child_env(args: argparse.Namespace, arm: str) -> dict:
    env = dict(os.environ)
    parts = [str(REPO_ROOT)]
    site = args.unsloth_site if arm == "unsloth" and args.unsloth_site else args.site
    if site:
        parts.append(site)
    elif env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def pool_size(data: str, seq: int, batches: list[int], steps: int) -> int:
    """Examples generated for one (shape, data): enough for every arm. Padded arms take `batch`
    examples a step; the packing arm fills `batch` rows of `seq` tokens a step (variable lengths
    average about 350 x seq/2048 tokens, so it needs more). One pool, one order, for all arms."""
    need = max(batches) * (steps + 1)
    if data == "variable":
        need = max(need, math.ceil(2.0 * max(batches) * seq * (steps + 1) / (350 * seq / 2048)))
    return need


def launch(
    args,
    arm: str,
    shape: str,
    data: str,
    seq: int,
    batch: int,
    steps: int,
    warmup: int,
    model_path: Path,
    tag: str,
    n_examples: int | None = None,
) -> dict:
    result_path = args.work / f"{tag}.json"
    if args.reuse and result_path.exists():
        res = json.loads(result_path.read_text())
        if res.get("ok") or res.get("oom"):
            print(f"<-- {tag}: reused {short_status(res)}", flush=True)
            return res
    if n_examples is None:
        n_examples = pool_size(data, seq, [batch], warmup + steps)
    remaining = args.deadline - time.time() if args.deadline else None
    if remaining is not None and remaining < args.min_arm_s:
        print(f"--- {tag}: skipped, {remaining:.0f}s left before the deadline", flush=True)
        return {"arm": arm, "shape": shape, "data": data, "seq": seq, "batch": batch,
                "skipped": "deadline: too little time left"}  # fmt: skip
    timeout = args.arm_timeout if remaining is None else min(args.arm_timeout, remaining - 5)
    result_path.unlink(missing_ok=True)
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "_arm",
        "--arm", arm, "--shape", shape, "--data", data, "--seq", str(seq),
        "--batch", str(batch), "--steps", str(steps), "--warmup", str(warmup),
        "--seed", str(args.seed), "--model-path", str(model_path), "--result", str(result_path),
        "--tb-checkpointing", args.tb_checkpointing, "--n-examples", str(n_examples),
    ]  # fmt: skip
    if args.cap_gib:
        cmd += ["--cap-gib", str(args.cap_gib)]
    if args.smoke:
        cmd.append("--smoke")
    print(f"--> {tag}: {arm} {shape} {data} {seq}x{batch}", flush=True)
    t0 = time.perf_counter()
    log = (args.work / f"{tag}.log").open("w") if args.quiet_children else None
    try:
        proc = subprocess.run(
            cmd, env=child_env(args, arm), cwd=REPO_ROOT, timeout=timeout,
            stdout=log, stderr=subprocess.STDOUT if log else None,
        )  # fmt: skip
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    finally:
        if log:
            log.close()
    wall = time.perf_counter() - t0
    if result_path.exists():
        res = json.loads(result_path.read_text())
    else:
        res = {"arm": arm, "shape": shape, "data": data, "error": f"child exited {rc}, no result"}
    res.update(seq=seq, batch=batch, wall_s=wall, rc=rc)
    print(f"<-- {tag}: {short_status(res)} ({wall:.0f}s)", flush=True)
    return res


def short_status(res: dict) -> str:
    if res.get("ok"):
        return f"{res['tokens_per_s']:,.0f} tok/s, step-0 loss {res['step0_loss']:.4f}"
    return next((f"{k}: {res[k]}" for k in ("skipped", "oom", "error") if res.get(k)), "no result")


def ensure_model(args, shape: str) -> Path:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import train; "
        "print(train.build_model_dir(sys.argv[2], __import__('pathlib').Path(sys.argv[3]), "
        "int(sys.argv[4])))"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).parent), shape, str(args.cache),
         str(args.seed)],
        env=child_env(args, "standard"), cwd=REPO_ROOT, capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"building the {shape} model failed")
    path = Path(proc.stdout.strip().splitlines()[-1])
    print(f"model {shape}: {path} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return path


def throughput_rows(args, results: list[dict]) -> list[str]:
    head = (
        "| model | data | seq x batch | arm | tokens/s (real) | x standard | median step s "
        "| peak alloc GiB | peak reserved GiB | MFU (4N) | load s | step-0 loss | note |"
    )
    lines = [head, "|" + "---|" * 13]
    base = {
        (r["shape"], r["data"]): r["tokens_per_s"]
        for r in results
        if r["arm"] == "standard" and r.get("ok")
    }
    for r in results:
        shape = SHAPES[r["shape"]]
        cells = [shape["label"], r["data"], f"{r['seq']} x {r['batch']}", r["arm"]]
        if r.get("ok"):
            std = base.get((r["shape"], r["data"]))
            mfu = r["tokens_per_s"] * 4 * matmul_params(shape) / H200_BF16_PEAK_FLOPS
            cells += [
                f"{r['tokens_per_s']:,.0f}",
                f"{r['tokens_per_s'] / std:.2f}" if std else "-",
                f"{r['median_step_s']:.3f}",
                fmt_gib(r.get("peak_alloc_gib")),
                fmt_gib(r.get("peak_reserved_gib")),
                f"{100 * mfu:.1f}%" if not args.smoke else "-",
                f"{r['load_s']:.1f}",
                f"{r['step0_loss']:.4f}" if r.get("step0_loss") is not None else "-",
                f"{r['steps_run']} steps, {r['real_tokens_per_step']:,.0f} real tok/step"
                + (f", checkpointing {r['memory_policy']}" if r.get("memory_policy") else "")
                + (", packed" if r["arm"].startswith("tuneboard") else "")
                + (f", {start_note(r)}" if r.get("start") else ""),
            ]
        else:
            note = short_status(r).replace("|", "/").replace("\n", " ")[:160]
            cells += ["-"] * 8 + [note]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def start_note(r: dict) -> str:
    """Tuneboard's setup to first optimizer step, itemised (worker/training/start_timing.py)."""
    t = r["start"]
    return (
        f"start {t['total_s']:.1f} s (model load {t.get('model_load_s', 0):.1f}, "
        f"{t['trial_steps']} trial steps {t.get('memory_policy_s', 0):.1f}, "
        + (f"CUDA graphs {t['CUDA_graphs_s']:.1f}, " if "CUDA_graphs_s" in t else "")
        + f"first step {t['first_step_s']:.1f})"
    )


def fmt_gib(x) -> str:
    return f"{x:.2f}" if isinstance(x, int | float) else "-"


def footer(args, shapes: list[str]) -> list[str]:
    bases = ", ".join(
        f"{SHAPES[s]['label']} N = {matmul_params(SHAPES[s]) / 1e9:.3f}B" for s in shapes
    )
    return [
        "",
        f"MFU = real tokens/s x 4N / {H200_BF16_PEAK_FLOPS / 1e12:.0f} TFLOP/s (H200 bf16 "
        f"matmul, measured); N = weights in matrix products (projections + lm_head): {bases}. "
        "Attention FLOPs and recomputation are not counted.",
        f"Seed {args.seed}; warm-up {args.warmup} steps, then {args.steps} timed steps (median "
        "step time; tokens/s = real tokens / time of the timed steps). Peak VRAM is "
        "torch.cuda.max_memory_* of the arm's whole process."
        + (f" Memory capped at {args.cap_gib} GiB." if args.cap_gib else ""),
    ]


def write_outputs(args, name: str, lines: list[str], payload: dict) -> None:
    text = "\n".join(lines) + "\n"
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=1, default=str))


def versions() -> dict:
    code = (
        "import json, importlib.metadata as m, sys\n"
        "out = {'python': sys.version.split()[0]}\n"
        "for p in ['torch','transformers','peft','bitsandbytes','liger-kernel','accelerate',"
        "'unsloth','unsloth_zoo','trl']:\n"
        "    try: out[p] = m.version(p)\n"
        "    except Exception: pass\n"
        "try:\n"
        "    import torch; out['gpu'] = torch.cuda.get_device_name(0)\n"
        "except Exception: out['gpu'] = 'none'\n"
        "print(json.dumps(out))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except Exception:
        return {}


def run_throughput(args) -> None:
    results: list[dict] = []
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, **versions()}
    for shape in args.shapes:
        model_path = ensure_model(args, shape)
        spec = SHAPES[shape]
        for data in args.data:
            # Padded arms take var_batch examples a step on variable data; Tuneboard packs them
            # into `batch` rows of seq tokens, so its steps carry about as many tokens as fixed.
            padded_batch = spec["batch"] if data == "fixed" else spec["var_batch"]
            n = pool_size(data, args.seq, [spec["batch"], padded_batch], args.warmup + args.steps)
            for arm in args.arms:
                batch = spec["batch"] if arm.startswith("tuneboard") else padded_batch
                tag = f"{shape}-{data}-{arm}" + (f"-cap{args.cap_gib:g}" if args.cap_gib else "")
                results.append(
                    launch(args, arm, shape, data, args.seq, batch, args.steps, args.warmup,
                           model_path, tag, n_examples=n)
                )  # fmt: skip
                lines = throughput_rows(args, results) + footer(args, args.shapes)
                write_outputs(args, args.name, lines, {"meta": meta, "results": results})
    lines = throughput_rows(args, results) + footer(args, args.shapes)
    write_outputs(args, args.name, lines, {"meta": meta, "results": results})
    print("\n" + "\n".join(lines), flush=True)


def probe(args, arm, shape, seq, model_path) -> dict:
    # Two full steps of one sequence, in a fresh process: the second carries the optimizer's
    # state, made at the end of the first (a first step alone passed where a second would not).
    return launch(args, arm, shape, "fixed", seq, 1, 1, 1, model_path,
                  f"probe-{shape}-{arm}-{seq}")  # fmt: skip


def longest(args, arm, shape, model_path) -> dict:
    """Doubling from --longest-start until a step runs out of memory, then bisection in steps of
    --granule. A probe that neither trains nor runs out of memory (cut by the deadline, broken)
    ends the search unsettled: its length is no failure, and the result's note names it."""
    step = args.granule
    lo, hi, probes = 0, None, []

    def tried(seq: int) -> dict:
        res = probe(args, arm, shape, seq, model_path)
        probes.append((seq, outcome(res)))
        return res

    def found(note: str | None = None) -> dict:
        return {"arm": arm, "shape": shape, "longest": lo, "first_fail": hi, "probes": probes} | (
            {"note": note} if note else {}
        )

    seq = args.longest_start
    while seq <= args.longest_max:
        res = tried(seq)
        if res.get("skipped") and not lo:  # nothing measured (after a fit: not settled)
            return {"arm": arm, "shape": shape, "skipped": res["skipped"], "probes": probes}
        if not res.get("ok"):
            if not res.get("oom"):
                return found(f"{seq:,} not settled ({outcome(res)})")
            hi = seq
            break
        lo = seq
        if seq >= args.longest_max:
            break
        seq = min(seq * 2, args.longest_max)  # the ceiling itself is probed
    if hi is None:
        return found(f"no failure up to {args.longest_max}")
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            mid = lo + step
        res = tried(mid)
        if res.get("ok"):
            lo = mid
        elif res.get("oom"):
            hi = mid
        else:
            return found(f"{mid:,} not settled ({outcome(res)})")
    return found()


def outcome(res: dict) -> str:
    if res.get("ok"):
        return "ok"
    return next((k for k in ("skipped", "oom", "error") if res.get(k)), "error")


def run_longest(args) -> None:
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, **versions()}
    results = []
    for shape in args.shapes:
        model_path = ensure_model(args, shape)
        for arm in args.arms:
            results.append(longest(args, arm, shape, model_path))
            write_outputs(args, args.name, longest_rows(args, results), {"meta": meta,
                          "results": results})  # fmt: skip
    lines = longest_rows(args, results)
    write_outputs(args, args.name, lines, {"meta": meta, "results": results})
    print("\n" + "\n".join(lines), flush=True)


def longest_rows(args, results) -> list[str]:
    cap = f"{args.cap_gib} GiB cap" if args.cap_gib else "no cap"
    lines = [
        f"| model | arm | longest sequence, batch 1 ({cap}) | first failure | probes |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        probes = ", ".join(f"{s}:{o}" for s, o in r.get("probes", []))
        if r.get("skipped"):
            cells = ["-", "-", r["skipped"][:120]]
        else:
            fail = r.get("first_fail")
            failure = "; ".join(x for x in (f"{fail:,}" if fail else "", r.get("note", "")) if x)
            cells = [f"{r['longest']:,}", failure or "-", probes]
        lines.append(f"| {SHAPES[r['shape']]['label']} | {r['arm']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Doubling from {args.longest_start} then bisection in steps of {args.granule}; "
        "each probe is two full training steps in a fresh process (the second with the "
        "optimizer's state).",
    ]
    return lines


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny Llama, no 4-bit")
    p.add_argument("--shapes", default=None, help="comma list of 1b,8b (default: 1b,8b)")
    p.add_argument("--data", default="fixed,variable", help="comma list of fixed,variable")
    p.add_argument("--arms", default=",".join(ARMS), help="comma list of " + ",".join(ARMS))
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 8)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cap-gib", type=float, default=None, help="cap the process like a small card")
    p.add_argument("--longest", action="store_true", help="search the longest single sequence")
    p.add_argument("--longest-start", type=int, default=4096)
    p.add_argument("--longest-max", type=int, default=262144)
    p.add_argument("--granule", type=int, default=1024)
    p.add_argument("--tb-checkpointing", default="auto", help="Tuneboard gradient_checkpointing")
    p.add_argument("--site", default=None, help="site dir for standard/tuneboard (PYTHONPATH)")
    p.add_argument("--unsloth-site", default=None, help="site dir for the unsloth arm only")
    p.add_argument("--cache", type=Path, default=None, help="model cache dir")
    p.add_argument("--out", type=Path, default=None, help="default: $OUT or bench/out")
    p.add_argument("--work", type=Path, default=None, help="per-arm results and logs")
    p.add_argument("--name", default=None, help="output file stem (default throughput/longest)")
    p.add_argument("--arm-timeout", type=float, default=900, help="seconds per arm process")
    p.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="unix time: start no arm after deadline - min-arm-s, kill at deadline",
    )
    p.add_argument("--min-arm-s", type=float, default=45, help="see --deadline")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse an arm's result already in --work (resume a --longest search)",
    )
    p.add_argument("--quiet-children", action="store_true", help="arm output to OUT/<tag>.log")
    args = p.parse_args(argv)
    args.shapes = (args.shapes or ("smoke" if args.smoke else "1b,8b")).split(",")
    args.data = args.data.split(",")
    args.arms = args.arms.split(",")
    for name, smoke_default, gpu_default in (("seq", 128, 2048), ("steps", 2, 8), ("warmup", 1, 3)):
        if getattr(args, name) is None:
            setattr(args, name, smoke_default if args.smoke else gpu_default)
    if args.smoke and args.longest:
        args.longest_start, args.longest_max, args.granule = 64, 256, 64
    args.out = Path(args.out or os.environ.get("OUT") or REPO_ROOT / "bench" / "out")
    args.cache = Path(args.cache or os.environ.get("BENCH_CACHE") or "/tmp/tuneboard-bench-cache")
    args.work = Path(args.work or args.out / "work")
    args.name = args.name or ("longest" if args.longest else "throughput")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    return args


def parse_child(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    for name in ("--arm", "--shape", "--data", "--model-path", "--result", "--tb-checkpointing"):
        p.add_argument(name, required=True)
    for name in ("--seq", "--batch", "--steps", "--warmup", "--seed"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--cap-gib", type=float, default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--n-examples", type=int, required=True)
    return p.parse_args(argv)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "_arm":
        child_main(parse_child(argv[1:]))
        return
    args = parse(argv)
    for arm in args.arms:
        if arm not in ARMS + TUNEBOARD_VARIANTS:
            raise SystemExit(f"unknown arm {arm!r}")
    if args.longest:
        run_longest(args)
    else:
        run_throughput(args)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Supervised fine-tuning with LoRA/QLoRA on one GPU (or the CPU): the Tuneboard recipe.

Read it top to bottom: `setup()` loads the tokenizer, the data and the base model (4-bit NF4 on
CUDA), attaches LoRA, picks the memory policy and builds a `transformers.Trainer`; `train()` runs
it (resuming from the newest complete checkpoint); `save()` writes the PEFT adapter; `cleanup()`
gives the memory back. The Trainer does the loop, gradient accumulation, the scheduler, eval and
checkpoint/resume (optimizer, scheduler, RNG, data position); `_RecipeCallback` does what is ours:
metric rows, stop requests, the non-finite-loss guard and atomic checkpoints.

Several GPUs (a job with `gpus: N`, started by torchrun, one process per GPU): the same recipe on
every rank, with the Trainer's FSDP (FSDP1: full shard, one unit per decoder layer) over 4-bit
weights stored as bf16 so FSDP can shard them (FSDP-QLoRA). Each rank loads the model onto its own
GPU; rank 0 writes metric rows, progress and the completion markers (after a barrier); each step
the ranks agree on the token count, the finiteness flag and whether to stop. Checkpoints are the
Trainer's FSDP checkpoints: they resume on the same number of GPUs.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A hub id that is not cached must fail fast when the hub is unreachable (set before the hub
# client is imported; the operator's own values win).
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from app.train_config import Quantization, TrainConfig
from worker import attention, checkpoints
from worker.control import LocalControl, RunControl
from worker.data import (
    FlattenedBatchCollator,
    PaddedBatchCollator,
    TokenizedExample,
    pack_examples,
    read_rows,
    tokenize_rows,
    use_chatml_if_missing,
)
from worker.errors import (
    DatasetError,
    DiskFull,
    ModelNotFound,
    NonFiniteLoss,
    OutOfMemory,
    TrainingError,
)
from worker.fused_mlp import fuse_mlps
from worker.metrics import MetricsSink, vram_readings
from worker.offload import ActivationOffload
from worker.tiled_mlp import tile_mlps, untile_mlps

__all__ = ["LocalControl", "RunControl", "SFTRecipe", "TrainResult"]

NON_FINITE_STEPS_BEFORE_STOP = 3
KEEP_LAST_CHECKPOINTS = 2
MAX_EVAL_ROWS = 1000
# A trial step must leave this share of the card free for optimizer state and fragmentation.
TRIAL_HEADROOM = 0.90


@dataclass
class TrainResult:
    global_step: int
    stop_reason: str | None  # None: ran to the end; else "cancel", "lease_lost" or "shutdown"
    resumed_from_step: int | None


class SFTRecipe:
    def __init__(
        self,
        config: TrainConfig,
        model_path: Path | str,
        output_dir: Path,
        sink: MetricsSink,
        control: RunControl,
        train_examples: list[TokenizedExample] | None = None,
        eval_examples: list[TokenizedExample] | None = None,
        rows_path: Path | None = None,
        eval_rows_path: Path | None = None,
        chat_template: str | None = None,
    ) -> None:
        if train_examples is None and rows_path is None:
            raise ValueError("give either train_examples or rows_path")
        self.config = config
        self.model_path = model_path
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.sink = sink
        self.control = control
        self.train_examples = train_examples
        self.eval_examples = eval_examples or []
        self.rows_path = rows_path
        self.eval_rows_path = eval_rows_path
        self.chat_template = chat_template  # e.g. data.CHATML_TEMPLATE for a base model
        # torchrun sets these; alone they are 1 and 0 and nothing below changes.
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.distributed = self.world_size > 1
        if self.distributed:
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model: Any = None
        self.trainer: _SFTTrainer | None = None
        self.memory_policy = "off"
        self.quantization_used: Quantization | None = None  # set when the base model loads
        self.offload_stream: Any = None  # made by the first offloaded step (activation_offload)

    # --- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        if self.distributed:
            if not torch.cuda.is_available():
                raise ModelNotFound(
                    f"A job on {self.world_size} GPUs needs CUDA; this machine has none.",
                    "Set gpus to 1, or run the job on a worker started with --gpus 0,1.",
                )
            torch.cuda.set_device(self.local_rank)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = self._load_tokenizer()
        self._prepare_data()
        self.model = self._load_base_model()
        self._apply_liger_kernels()
        self.model = self._attach_lora(self.model)
        self._fuse_mlps()
        self.model.train()  # from_pretrained returns eval mode; checkpointing only acts in train
        self._choose_memory_policy()
        self.trainer = self._build_trainer()

    def _resolve_model(self) -> str:
        path = Path(self.model_path)
        if path.exists():
            return str(path)
        try:  # a hub id: cached, or downloaded (fails fast offline: HF_HUB_OFFLINE, timeouts)
            from huggingface_hub import snapshot_download

            return snapshot_download(
                str(self.model_path),
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
            )
        except Exception as error:
            raise ModelNotFound(
                f"Model {self.model_path} is not on this machine and could not be downloaded "
                f"({type(error).__name__}).",
                "Register a local model folder, or download it once on a machine with access to "
                "the model hub (`hf download <id>`) and share the HF cache.",
            ) from error

    def _load_tokenizer(self) -> Any:
        self.model_dir = self._resolve_model()
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        use_chatml_if_missing(tokenizer, self.chat_template)  # saved with the adapter
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _prepare_data(self) -> None:
        cfg = self.config
        if self.train_examples is None:
            assert self.rows_path is not None
            rows = read_rows(self.rows_path)
            if self.eval_rows_path is not None:  # the split recorded on the dataset
                train_rows, eval_rows = rows, read_rows(self.eval_rows_path)
            else:
                order = list(range(len(rows)))
                random.Random(cfg.seed).shuffle(order)
                n_eval = min(MAX_EVAL_ROWS, round(len(rows) * cfg.eval_fraction))
                n_eval = n_eval if len(rows) - n_eval >= 1 else 0
                eval_rows = [rows[i] for i in sorted(order[:n_eval])]
                train_rows = [rows[i] for i in sorted(order[n_eval:])]
            args = (str(cfg.train_on), cfg.max_seq_len, self.chat_template)
            self.train_examples, stats = tokenize_rows(self.tokenizer, train_rows, *args)
            self.eval_examples, _ = tokenize_rows(self.tokenizer, eval_rows, *args)
            if notice := stats.notice(cfg.max_seq_len):
                self.control.update(notice=notice)
        if not self.train_examples:
            raise DatasetError(
                "No training examples are left after tokenisation.",
                "Check that rows have assistant replies, or raise max_seq_len.",
            )
        # Packing: micro-batches of up to micro_batch_size x max_seq_len real tokens, no padding.
        if cfg.packing:
            budget = cfg.micro_batch_size * cfg.max_seq_len
            longest = max(len(e) for e in self.train_examples + self.eval_examples)
            budget = max(budget, longest)
            self.train_batches: list[Any] = pack_examples(self.train_examples, budget, cfg.seed)
            self.eval_batches: list[Any] = pack_examples(self.eval_examples, budget, cfg.seed)
        else:
            self.train_batches, self.eval_batches = self.train_examples, self.eval_examples

    def _load_base_model(self) -> Any:
        on_cuda = self.device.type == "cuda"
        kwargs: dict[str, Any] = {"attn_implementation": self._attention()}
        if on_cuda and self.config.quantization == "nf4" and _bitsandbytes_available():
            from transformers import BitsAndBytesConfig

            quantization: dict[str, Any] = {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": torch.bfloat16,
            }
            if self.distributed:
                # FSDP flattens parameters of one dtype: packed 4-bit weights stored as bf16
                # shard alongside the bf16 norms and embeddings.
                quantization["bnb_4bit_quant_storage"] = torch.bfloat16
            kwargs["quantization_config"] = BitsAndBytesConfig(**quantization)
            kwargs.update(dtype=torch.bfloat16, device_map={"": self.device.index or 0})
            self.compute_mode = "4-bit NF4 QLoRA, bf16 compute"
        elif on_cuda:
            kwargs.update(dtype=torch.bfloat16, device_map={"": self.device.index or 0})
            self.compute_mode = "bf16 LoRA" + (
                " (bitsandbytes missing: no 4-bit)" if self.config.quantization == "nf4" else ""
            )
        else:
            # fp32: bf16 matmuls on most CPUs are slower and less accurate than fp32.
            kwargs.update(dtype=torch.float32)
            self.compute_mode = "fp32 LoRA on the CPU (no CUDA device)"
        self.quantization_used = Quantization.nf4 if "quantization_config" in kwargs else None
        if self.distributed:
            self.compute_mode += f", FSDP over {self.world_size} GPUs"
        try:
            # safetensors only: never unpickle weights a user's folder or the hub supplied.
            model = AutoModelForCausalLM.from_pretrained(
                self.model_dir, use_safetensors=True, **kwargs
            )
        except OSError as error:
            raise ModelNotFound(
                f"Could not load model weights from {self.model_path}: {error}",
                "The model folder needs config.json and *.safetensors weights.",
            ) from error
        # No prepare_model_for_kbit_training: it casts embeddings, norms and lm_head to fp32,
        # the largest single cost in memory and speed. Only the LoRA weights are fp32 (peft).
        model.config.use_cache = False
        return model

    def _attention(self) -> str:
        """Packed rows attend per example (worker.attention); otherwise transformers' sdpa."""
        if not self.config.packing:
            return "sdpa"
        from transformers import AutoConfig

        reason = attention.unsupported_reason(AutoConfig.from_pretrained(self.model_dir))
        if reason:
            self.control.update(notice=f"Packed attention uses sdpa's dense mask: {reason}.")
            return "sdpa"
        return attention.register()

    def _apply_liger_kernels(self) -> None:
        """Fused RoPE / RMSNorm / SwiGLU / linear cross-entropy where liger has the architecture."""
        self.liger = False
        # Liger's fused loss reads lm_head's weight directly; under FSDP that is a shard.
        if self.device.type != "cuda" or self.distributed:
            return
        try:
            from liger_kernel.transformers.monkey_patch import (
                MODEL_TYPE_TO_APPLY_LIGER_FN,
                _apply_liger_kernel_to_instance,
            )
        except Exception:  # not installed, or no triton for this GPU
            return
        if self.model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            return
        try:
            _apply_liger_kernel_to_instance(model=self.model)
            self.liger = True
            self.compute_mode += ", Liger kernels"
        except Exception as error:  # an architecture variant liger does not handle
            self.control.update(notice=f"Liger kernels not applied: {error}")

    def _attach_lora(self, model: Any) -> Any:
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        cfg = self.config
        set_seed(cfg.seed)  # the LoRA initialisation
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets) if cfg.lora_targets else "all-linear",
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            return get_peft_model(model, lora)
        except ValueError as error:  # a target module that this architecture lacks
            raise DatasetError(
                f"LoRA could not be attached: {error}",
                "Leave lora_targets empty to adapt every linear projection.",
            ) from error

    def _fuse_mlps(self) -> None:
        """Each LoRA SwiGLU MLP as one autograd function (worker.fused_mlp): it keeps less (8B,
        4,096 tokens: 3.4 GiB) and is faster with checkpointing (bench/RESULTS.md, session 5).
        Not under FSDP, whose shards the function would read as whole weights."""
        if not self.distributed and fuse_mlps(self.model):
            self.compute_mode += ", fused LoRA MLPs"

    # --- memory policy ---------------------------------------------------------------------

    def _choose_memory_policy(self) -> None:
        requested = str(self.config.gradient_checkpointing)
        kept = 0
        if requested == "offload" and self.device.type != "cuda":
            policy, reason = "on", "offload asked for, but a CPU run has no device memory to free"
        elif requested == "tiled" and self.distributed:
            policy, reason = "on", "tiled is for one GPU; FSDP checkpoints every layer"
        elif requested != "auto":
            policy, reason = requested, "set in the job config"
        elif self.device.type != "cuda":
            policy, reason = "off", "CPU run: activations live in host memory"
        elif self.distributed:
            # A trial step here would run the unsharded model on one GPU and measure the wrong
            # thing; checkpointing is the safe default for a model big enough to need FSDP.
            policy, reason = "on", f"FSDP over {self.world_size} GPUs: checkpointing by default"
        else:
            policy, reason, kept = self._measure_memory_policy()
        self._set_memory_policy(policy, kept)
        self.control.update(
            memory_policy=policy, memory_policy_reason=reason, compute_mode=self.compute_mode
        )

    def _set_memory_policy(self, policy: str, kept_layers: int = 0) -> None:
        """Checkpointing of every decoder layer (`_checkpoint_kwargs`); "offload" also moves
        what a step saves outside the layers (their inputs) to pinned host memory
        (worker.offload); "partial" checkpoints all but the last `kept_layers`, which keep their
        activations (no recompute) in memory the card has to spare; "tiled" is "offload" with
        every MLP run a slice of tokens at a time (worker.tiled_mlp), for sequences "offload"
        cannot fit."""
        self.memory_policy = policy
        base = self.model.get_base_model()
        layers = self._decoder_layers()
        if policy == "tiled":
            tile_mlps(layers, self._tile_tokens())
        else:
            untile_mlps(layers)
        if policy == "off":
            if hasattr(base, "activation_checkpointing_disable"):
                base.activation_checkpointing_disable()
            else:
                base.gradient_checkpointing_disable()
        elif hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.20
            base.activation_checkpointing_enable(self._checkpoint_kwargs())
        else:
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=self._checkpoint_kwargs()
            )
        if policy == "partial":
            for index, layer in enumerate(layers):
                layer.gradient_checkpointing = index < len(layers) - kept_layers

    def _tile_tokens(self) -> int:
        """MLP slices as long as the model is wide (ALST's choice): at 8B, 4,096 tokens, whose
        intermediates take about 0.7 GB."""
        return int(getattr(self.model.config, "hidden_size", 0) or 4096)

    def _checkpoint_kwargs(self) -> dict[str, Any]:
        """Reentrant checkpointing on one GPU: a checkpointed layer's forward runs without
        autograd, and its backward reruns it and backpropagates through it as one piece. The
        non-reentrant kind runs Python hooks for every tensor each layer saves, twice, and the
        GPU waited for them: 8B, 4,096 tokens, every layer checkpointed, 779 ms a step against
        486 ms reentrant (bench/RESULTS.md, session 4). FSDP keeps the non-reentrant kind, the one
        the 2-GPU test verifies. Transformers makes the embeddings' output want a gradient, as
        reentrant needs."""
        return {"use_reentrant": not self.distributed}

    def _decoder_layers(self) -> list[Any]:
        """The decoder layers that checkpointing wraps (transformers' GradientCheckpointingLayer)."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        base = self.model.get_base_model()
        return [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]

    def activation_offload(self) -> Any:
        """The context a forward pass runs in: what it saves for the backward pass goes to
        pinned host memory, or nothing happens."""
        if self.memory_policy not in ("offload", "tiled") or self.device.type != "cuda":
            return contextlib.nullcontext()
        if self.offload_stream is None:
            self.offload_stream = torch.cuda.Stream(self.device)
        return ActivationOffload(self.offload_stream)

    def _measure_memory_policy(self) -> tuple[str, str, int]:
        """Trial forward+backward steps on the longest micro-batch, cheapest policy first: no
        checkpointing; else checkpointing of as few layers as the card needs (the rest keep their
        activations); else every layer; else every layer offloaded to host memory; else that with
        the MLPs in slices."""
        batch = self._longest_batch()
        tokens = int(batch["input_ids"].numel())
        limit = TRIAL_HEADROOM * self._usable_memory()
        gib = 1024**3

        def fits(how: str, peak: int) -> str:
            return (
                f"a trial step on the longest micro-batch ({tokens} tokens) fits {how}: peak "
                f"{peak / gib:.1f} GiB of {limit / gib:.1f} GiB usable"
            )

        peak_off = self._try_policy(batch, "off")
        if peak_off is not None and peak_off <= limit:
            return "off", fits("without checkpointing", peak_off), 0
        peak_on = self._try_policy(batch, "on")
        if peak_on is not None and peak_on <= limit:
            partial = self._most_layers_kept(batch, peak_on, peak_off, limit)
            if partial is None:
                return "on", fits("with checkpointing", peak_on), 0
            kept, peak = partial
            total = len(self._decoder_layers())
            how = (
                f"with {total - kept} of {total} layers checkpointed "
                f"(the other {kept} keep their activations: less recompute)"
            )
            return "partial", fits(how, peak), kept
        peak_offload = self._try_policy(batch, "offload")
        if peak_offload is not None:
            return "offload", fits("with activations offloaded to CPU memory", peak_offload), 0
        peak_tiled = self._try_policy(batch, "tiled")
        if peak_tiled is not None:
            how = "with activations offloaded and each MLP run in slices of tokens"
            return "tiled", fits(how, peak_tiled), 0
        raise OutOfMemory(
            step=0,
            micro_batch_size=self.config.micro_batch_size,
            seq_len=tokens,
            detail="Even offloaded checkpointing with sliced MLPs does not fit one micro-batch.",
        )

    def _most_layers_kept(
        self, batch: dict[str, torch.Tensor], peak_on: int, peak_off: int | None, limit: float
    ) -> tuple[int, int] | None:
        """The most layers that can keep their activations (the rest are checkpointed) with a
        trial step within `limit`, and that step's peak. A first guess from the memory a kept
        layer adds (two trial steps), then bisection between a count that fits and one that
        does not: each layer kept is recompute saved."""
        total = len(self._decoder_layers())
        if total < 2:
            return None
        good, good_peak, bad = 0, peak_on, total  # none kept is "on" (fits), all is "off" (not)
        probe, probe_peak = total, peak_off
        while probe_peak is None and probe > 1:  # "off" ran out of memory: measure fewer layers
            bad, probe = probe, probe // 2
            probe_peak = self._try_policy(batch, "partial", probe)
        if probe_peak is None:
            return None
        if probe_peak <= limit:
            good, good_peak = probe, probe_peak
        else:
            bad = probe
        per_layer = max(1.0, (probe_peak - peak_on) / probe)
        guess: int | None = int((limit - peak_on) / per_layer)
        for _ in range(6):
            if bad - good <= 1:
                break
            middle = (good + bad) // 2 if guess is None else min(max(guess, good + 1), bad - 1)
            guess = None
            peak = self._try_policy(batch, "partial", middle)
            if peak is not None and peak <= limit:
                good, good_peak = middle, peak
            else:
                bad = middle
        return (good, good_peak) if good else None

    def _try_policy(self, batch: dict[str, torch.Tensor], policy: str, kept: int = 0) -> int | None:
        """Peak memory of one trial step under a policy, or None when it ran out of memory."""
        self._set_memory_policy(policy, kept)
        try:
            return self._trial_step(batch)
        except torch.OutOfMemoryError:
            self.model.zero_grad(set_to_none=True)
            self._free_cuda()
            return None

    def _usable_memory(self) -> int:
        """The card's memory, or the share this process is capped at (a small card's stand-in)."""
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        try:
            fraction = torch.cuda.get_per_process_memory_fraction(index)
        except (AttributeError, RuntimeError, ValueError):  # an older torch without the getter
            fraction = 1.0
        return int(total * min(1.0, fraction))

    def _longest_batch(self) -> dict[str, torch.Tensor]:
        if self.config.packing:
            batch = self._collator()([max(self.train_batches, key=lambda b: sum(map(len, b)))])
        else:
            longest = sorted(self.train_examples or [], key=len)[-self.config.micro_batch_size :]
            batch = self._collator()(longest)
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    def _trial_step(self, batch: dict[str, torch.Tensor]) -> int:
        self._free_cuda()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.forward_backward(batch)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.model.zero_grad(set_to_none=True)
        self._free_cuda()
        return peak

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One micro-batch's forward and backward pass under the memory policy (bf16 autocast on
        the GPU), outside the Trainer: for trial steps and measurements. The gradients stay on
        the model; the detached loss is returned."""
        cuda = self.device.type == "cuda"
        with self.activation_offload(), torch.autocast(self.device.type, torch.bfloat16, cuda):
            loss = self.model(**batch).loss
        loss.backward()
        return loss.detach()

    def _free_cuda(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- the Trainer ---------------------------------------------------------------------------

    def _collator(self) -> Any:
        if self.config.packing:
            return FlattenedBatchCollator()
        return PaddedBatchCollator(self.tokenizer.pad_token_id)

    def _build_trainer(self) -> _SFTTrainer:
        cfg = self.config
        on_cuda = self.device.type == "cuda"
        has_eval = bool(self.eval_batches)
        args = TrainingArguments(
            output_dir=str(self.checkpoint_dir),
            per_device_train_batch_size=1 if cfg.packing else cfg.micro_batch_size,
            per_device_eval_batch_size=1 if cfg.packing else cfg.micro_batch_size,
            gradient_accumulation_steps=cfg.grad_accum_steps,
            learning_rate=cfg.learning_rate,
            lr_scheduler_type=str(cfg.lr_scheduler),
            warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_steps=cfg.max_steps or -1,
            num_train_epochs=cfg.num_epochs,
            logging_steps=cfg.logging_every,
            logging_nan_inf_filter=False,  # a NaN must show, not be averaged away
            eval_strategy="steps" if has_eval else "no",
            eval_steps=cfg.eval_every,
            save_strategy="steps",
            save_steps=cfg.save_every,
            save_total_limit=None,  # pruning is ours: only after the completion marker
            seed=cfg.seed,
            data_seed=cfg.seed,
            bf16=on_cuda,
            use_cpu=not on_cuda,
            optim="adamw_torch_fused" if on_cuda else "adamw_torch",
            remove_unused_columns=False,
            label_names=["labels"],
            dataloader_num_workers=0,
            dataloader_pin_memory=on_cuda,
            report_to=[] if str(cfg.report_to) == "none" else [str(cfg.report_to)],
            disable_tqdm=True,
            **self._fsdp_arguments(),
        )
        if not self.distributed:
            # One process, one GPU: with several visible the Trainer would wrap the model in
            # DataParallel, hand it two packed rows at once and scale the loss by the GPU count.
            _ = args.n_gpu  # sets up the devices, which also sets _n_gpu
            args._n_gpu = min(args._n_gpu, 1)
        trainer = _SFTTrainer(
            model=self.model,
            args=args,
            train_dataset=_ListDataset(self.train_batches),
            eval_dataset=_ListDataset(self.eval_batches) if has_eval else None,
            data_collator=self._collator(),
        )
        trainer.recipe = self
        trainer.remove_callback(PrinterCallback)  # rows go to the sink, not to stdout
        self.callback = _RecipeCallback(self)
        trainer.add_callback(self.callback)
        return trainer

    def _fsdp_arguments(self) -> dict[str, Any]:
        """TrainingArguments for FSDP-QLoRA on several GPUs; nothing on one.

        FSDP1 (`version: 1`): bitsandbytes' 4-bit parameters shard as flat bf16 storage; FSDP2
        (transformers' default from 5.16) does not handle them. The Trainer wraps the LoRA layers
        in units of their own (peft's policy) and sets mixed precision to the storage dtype.
        """
        if not self.distributed:
            return {}
        return {
            "fsdp": "full_shard auto_wrap",
            "fsdp_config": {
                "version": 1,
                "transformer_layer_cls_to_wrap": [self._decoder_layer_class()],
                "use_orig_params": "false",
                "sync_module_states": "true",  # one LoRA initialisation on every rank
                "cpu_ram_efficient_loading": "false",
                "activation_checkpointing": "false",  # ours (_set_memory_policy) is on the model
                "state_dict_type": "FULL_STATE_DICT",
            },
            "ddp_timeout": 1800,
        }

    def _decoder_layer_class(self) -> str:
        base = self.model.get_base_model()
        names = list(getattr(base, "_no_split_modules", None) or [])
        if names:
            return str(names[0])
        layers = getattr(getattr(base, "model", base), "layers", None)
        if layers is None or len(layers) == 0:
            raise DatasetError(
                "This model's decoder layers could not be found for FSDP.",
                "Train it on one GPU (gpus: 1).",
            )
        return type(layers[0]).__name__

    def _is_main_rank(self) -> bool:
        return not self.distributed or torch.distributed.get_rank() == 0

    def _barrier(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def shared_stop_reason(self, reason: str | None) -> str | None:
        """Rank 0's stop decision on every rank (after training: whether all ranks save)."""
        if not self.distributed:
            return reason
        box = [reason]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _load_adapter_weights(self, checkpoint: Path) -> None:
        """A checkpoint's LoRA weights into the (not yet wrapped) model, on every rank."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = checkpoint / "adapter_model.safetensors"
        if not path.is_file():
            raise TrainingError(
                f"The checkpoint {checkpoint.name} has no adapter weights to resume from.",
                "Delete the job's checkpoints folder to start over, or retry from a newer one.",
            )
        weights = load_file(path, device=str(self.device))  # as save_sharded_adapter wrote it
        loaded = set_peft_model_state_dict(self.model, weights)
        missing = [key for key in getattr(loaded, "missing_keys", []) if "lora_" in key]
        if missing:
            found = next(iter(weights), "nothing")
            raise TrainingError(
                f"The checkpoint {checkpoint.name} does not match this job's LoRA layers "
                f"({len(missing)} missing, e.g. {missing[0]}; it holds {len(weights)} tensors, "
                f"e.g. {found}).",
                "Resume with the same config it was started with, or delete its checkpoints.",
            )

    def save_sharded_adapter(self, directory: Path) -> None:
        """Every rank joins in gathering the FSDP-sharded LoRA weights; rank 0 writes the adapter
        (the same files as `save_pretrained` on one GPU).

        Ours, not the Trainer's: its FSDP save of a PEFT model, through peft's state-dict filter,
        wrote an adapter file with no tensors in it (transformers 5.17, peft 0.21, FSDP1).
        """
        from safetensors.torch import save_file
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        assert self.trainer is not None
        wrapped, main = self.trainer.model_wrapped, self._is_main_rank()
        adapter = ".default."  # peft's name for the one adapter; not in the saved names
        with FSDP.summon_full_params(
            wrapped, writeback=False, rank0_only=True, offload_to_cpu=True
        ):
            weights = {
                _without_wrapper_parts(name).replace(adapter, "."): parameter.detach().clone()
                for name, parameter in wrapped.named_parameters()
                if main and "lora_" in name
            }
        if not main:
            return
        odd = [f"{k} {tuple(v.shape)}" for k, v in weights.items() if v.dim() != 2 or not v.numel()]
        if not weights or odd:
            raise TrainingError(
                "The LoRA weights could not be gathered whole from the GPUs "
                f"({len(weights)} found{', e.g. ' + odd[0] if odd else ''}).",
                "Train this model on one GPU (gpus: 1) and report the job's log.",
            )
        directory.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        self.model.peft_config["default"].save_pretrained(str(directory))
        self.tokenizer.save_pretrained(directory)

    # --- train -----------------------------------------------------------------------------

    def train(self) -> TrainResult:
        assert self.trainer is not None, "call setup() first"
        resume = checkpoints.newest_complete_checkpoint(self.checkpoint_dir)
        resumed_from = checkpoints.checkpoint_step(resume) if resume else None
        if resume is not None:
            self.control.update(notice=f"Resuming from the checkpoint at step {resumed_from}.")
            if self.distributed:
                # The Trainer's FSDP resume restores optimizer, scheduler and data position,
                # but not a PEFT adapter (it looks for a PeftModel and finds the FSDP wrapper).
                self._load_adapter_weights(resume)
        if self._is_main_rank():
            checkpoints.remove_incomplete(self.checkpoint_dir)
        self._barrier()
        oom: OutOfMemory | None = None
        try:
            self.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except torch.OutOfMemoryError:
            oom = OutOfMemory(
                step=self.trainer.state.global_step,
                micro_batch_size=self.config.micro_batch_size,
                seq_len=self.trainer.last_seq_len,
            )
        except _CheckpointDiskFull as error:
            checkpoints.remove_incomplete(self.checkpoint_dir)
            kept = checkpoints.newest_complete_checkpoint(self.checkpoint_dir)
            previous = (
                f"the previous checkpoint (step {checkpoints.checkpoint_step(kept)}) is kept"
                if kept is not None
                else "there is no earlier checkpoint"
            )
            raise DiskFull(
                f"Disk full: no space left while writing the checkpoint at step {error.step}; "
                f"{previous}.",
                "Free space in the data dir (old runs, the HF cache) and retry: the job resumes "
                "from the last complete checkpoint.",
            ) from error.__cause__
        if oom is not None:
            # Raised outside the except block: the CUDA error's traceback (and the activations
            # its frames hold) is gone, so cleanup() can give the memory back.
            self.trainer.optimizer = None
            self._free_cuda()
            raise oom
        return TrainResult(
            global_step=self.trainer.state.global_step,
            stop_reason=self.callback.stop_reason,
            resumed_from_step=resumed_from,
        )

    # --- save / cleanup --------------------------------------------------------------------

    def config_as_run(self) -> TrainConfig:
        """The job's config with what actually ran: `quantization: none` when the base model was
        not loaded in 4-bit (a CPU, or no bitsandbytes), whatever the job asked for."""
        ran = self.quantization_used or Quantization.none
        return self.config.model_copy(update={"quantization": ran})

    def save(self) -> Path:
        """The PEFT adapter, the tokenizer (its chat template) and the job config, in `adapter/`."""
        final = self.output_dir / "adapter"
        staging = self.output_dir / ".adapter.partial"
        if self.distributed:
            return self._save_distributed(final, staging)
        shutil.rmtree(staging, ignore_errors=True)
        try:
            self.model.save_pretrained(staging, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
            (staging / "train_config.json").write_text(
                self.config_as_run().model_dump_json(indent=2), encoding="utf-8"
            )
            checkpoints.mark_complete(
                staging, self.trainer.state.global_step if self.trainer else 0, None
            )
        except Exception as error:
            full = checkpoints.is_disk_full(error, self.checkpoint_dir)
            shutil.rmtree(staging, ignore_errors=True)
            if full:
                raise DiskFull(
                    "Disk full: no space left while saving the adapter; the last checkpoint is "
                    "kept.",
                    "Free space in the data dir and retry: the job resumes from the last "
                    "complete checkpoint.",
                ) from error
            raise
        (staging / checkpoints.COMPLETE_MARKER).unlink()
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        return final

    def _save_distributed(self, final: Path, staging: Path) -> Path:
        """Every rank takes part in gathering the sharded adapter; rank 0 writes it."""
        assert self.trainer is not None
        main = self._is_main_rank()
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        self._barrier()
        self.save_sharded_adapter(staging)
        self._barrier()
        if main:
            (staging / "train_config.json").write_text(
                self.config_as_run().model_dump_json(indent=2), encoding="utf-8"
            )
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
        self._barrier()
        return final

    def cleanup(self) -> None:
        if self.trainer is not None:
            self.trainer.model = None  # type: ignore[assignment]
            self.trainer.model_wrapped = None  # type: ignore[assignment]
            self.trainer.optimizer = None
            self.trainer.lr_scheduler = None
        self.trainer = None
        self.model = None
        self._free_cuda()


def _without_wrapper_parts(name: str) -> str:
    """A parameter's name as the bare PEFT model has it: FSDP's and checkpointing's wrapper
    modules dropped from the path."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


class _CheckpointDiskFull(Exception):
    """Raised out of the Trainer when a checkpoint could not be written for lack of space."""

    def __init__(self, step: int) -> None:
        super().__init__(f"disk full while writing the checkpoint at step {step}")
        self.step = step


class _ListDataset(torch.utils.data.Dataset):
    """A list as a map-style dataset (the Trainer wants `__len__` and `__getitem__`)."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


class _SFTTrainer(Trainer):
    """The stock Trainer plus what a step needs to report: real tokens, finiteness, length."""

    recipe: SFTRecipe

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_tokens: Any = 0
        self.step_finite: Any = True
        self.last_seq_len = 0

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None):
        mask = inputs.get("attention_mask")
        # Real tokens only: padding (attention_mask 0) does not count. A tensor sum, no sync.
        self.step_tokens = self.step_tokens + (
            mask.sum() if mask is not None else inputs["input_ids"].numel()
        )
        self.last_seq_len = int(inputs["input_ids"].shape[-1])
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = loss.detach().isfinite()  # on the loss's device: no sync until the step ends
        self.step_finite = (
            finite if self.step_finite is True else torch.logical_and(self.step_finite, finite)
        )
        return loss

    def compute_loss(self, *args: Any, **kwargs: Any) -> Any:
        # The forward pass only: a checkpointed layer's rerun in the backward pass saves for
        # itself and frees it layer by layer, in GPU memory.
        with self.recipe.activation_offload():
            return super().compute_loss(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # Under FSDP the callback's on_save writes a checkpoint's adapter (save_sharded_adapter);
        # the Trainer's own save would gather the whole model to write an empty adapter.
        if not self.recipe.distributed:
            super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            if checkpoints.is_disk_full(error, Path(self.args.output_dir or ".")):
                raise _CheckpointDiskFull(self.state.global_step) from error
            raise

    def take_step_counters(self) -> tuple[int, bool]:
        if self.recipe.distributed:
            return self._take_step_counters_of_all_ranks()
        tokens, finite = int(self.step_tokens), bool(self.step_finite)
        self.step_tokens, self.step_finite = 0, True
        return tokens, finite

    def _take_step_counters_of_all_ranks(self) -> tuple[int, bool]:
        """Tokens summed over ranks, finite only if finite on every rank (one all-reduce)."""
        device = self.recipe.device
        counts = torch.stack(
            [
                torch.as_tensor(self.step_tokens, device=device, dtype=torch.float64),
                (~torch.as_tensor(self.step_finite, device=device)).to(torch.float64),
            ]
        )
        torch.distributed.all_reduce(counts)
        self.step_tokens, self.step_finite = 0, True
        return int(counts[0].item()), bool(counts[1].item() == 0)


class _RecipeCallback(TrainerCallback):
    """Metric rows, stop requests, the non-finite guard, and completion markers on checkpoints."""

    def __init__(self, recipe: SFTRecipe) -> None:
        self.recipe = recipe
        self.stop_reason: str | None = None
        self.bad_steps = 0
        self.saw_non_finite = False
        self.started = time.perf_counter()
        self.step_started = self.started
        self.tokens_since_log = 0
        self.seconds_since_log = 0.0
        self.steps_since_log = 0
        self.last_eval: tuple[int, float] | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        recipe, trainer = self.recipe, self.recipe.trainer
        assert trainer is not None
        tokens, finite = trainer.take_step_counters()  # int(): waits for the GPU, honest timing
        self.tokens_since_log += tokens
        self.seconds_since_log += time.perf_counter() - self.step_started
        self.steps_since_log += 1

        if not finite:
            # Weights touched by a NaN/inf gradient are poisoned: never checkpoint them.
            self.saw_non_finite = True
            self.bad_steps += 1
            if self.bad_steps >= NON_FINITE_STEPS_BEFORE_STOP:
                raise NonFiniteLoss(step=state.global_step, consecutive=self.bad_steps)
        else:
            self.bad_steps = 0
        if self.saw_non_finite:
            control.should_save = False

        recipe.control.update(
            progress_step=state.global_step, progress_total=state.max_steps, epoch=state.epoch
        )
        reason = recipe.control.should_stop()
        if recipe.distributed:
            reason = _agreed_stop_reason(reason, recipe.device)
        if reason:
            self.stop_reason = reason
            control.should_training_stop = True
            control.should_save = not self.saw_non_finite
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_loss" in metrics:
            self.last_eval = (state.global_step, float(metrics["eval_loss"]))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" not in logs and "eval_loss" not in logs:
            return  # the end-of-training summary
        row: dict[str, Any] = {
            "step": state.global_step,
            "epoch": float(state.epoch or 0.0),
            "loss": _finite_or_none(logs.get("loss")),
            "eval_loss": _finite_or_none(logs.get("eval_loss")),
            "learning_rate": _finite_or_none(logs.get("learning_rate")),
            "grad_norm": _finite_or_none(logs.get("grad_norm")),
            "tokens_per_second": None,
            "elapsed_seconds": time.perf_counter() - self.started,
        }
        if "loss" in logs:
            seconds = self.seconds_since_log
            row.update(
                tokens=self.tokens_since_log,
                step_seconds=seconds,
                steps=self.steps_since_log,
                tokens_per_second=self.tokens_since_log / seconds if seconds > 0 else None,
            )
            self.tokens_since_log, self.seconds_since_log, self.steps_since_log = 0, 0.0, 0
        row.update(vram_readings())
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.recipe.sink.write(row)
        self.recipe.sink.flush()

    def on_save(self, args, state, control, **kwargs):
        folder = self.recipe.checkpoint_dir / f"checkpoint-{state.global_step}"
        if self.recipe.distributed:
            self.recipe.save_sharded_adapter(folder)
            self.recipe._barrier()  # every rank's part of the checkpoint is written
            if not state.is_world_process_zero:
                return
        eval_loss = None
        if self.last_eval is not None and self.last_eval[0] == state.global_step:
            eval_loss = self.last_eval[1]
        checkpoints.mark_complete(folder, state.global_step, eval_loss)
        checkpoints.prune_checkpoints(self.recipe.checkpoint_dir, KEEP_LAST_CHECKPOINTS)


_STOP_REASONS = (None, "shutdown", "cancel", "lease_lost")  # later ones win


def _agreed_stop_reason(reason: str | None, device: torch.device) -> str | None:
    """The strongest stop reason any rank saw (rank 0 reads the queue; every rank sees SIGTERM),
    so all ranks stop at the same step and checkpoint together."""
    code = torch.tensor([_STOP_REASONS.index(reason)], device=device)
    torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
    return _STOP_REASONS[int(code.item())]


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True

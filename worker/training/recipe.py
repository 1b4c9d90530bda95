"""`LoRARecipe`: one training attempt with LoRA/QLoRA on one GPU (or the CPU, or FSDP over several),
whatever the method. A method's recipe (worker/recipes/) says what is its own: how rows become
batches (`_prepare_data`, `_collator`, `_longest_batch`), the loss (`compute_loss`, `batch_loss`)
and the figures it logs (`FIGURES`, `logged_figures`).

    setup()    tokenizer, data, base model (4-bit NF4 on CUDA), kernels, LoRA, memory policy,
               the Trainer                                   (worker.training.loading, .memory_policy)
    train()    the Trainer's loop, resumed from the newest complete checkpoint
    save()     the PEFT adapter, the tokenizer (its chat template) and the config as it ran
    cleanup()  gives the memory back
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import traceback
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PrinterCallback, TrainingArguments

from app.layout import tensorboard_in
from app.train_config import Quantization, TrainConfig
from app.verified_versions import LIGER_MISSING
from worker import attention, checkpoints, layer_graphs, lora_projection
from worker.control import RunControl
from worker.data import read_rows
from worker.errors import DatasetError, DiskFull, OutOfMemory
from worker.metrics import MetricsSink
from worker.training import distributed, loading, memory_policy
from worker.training.start_timing import StartTiming
from worker.training.trainer import (
    CheckpointDiskFull,
    ListDataset,
    RecipeCallback,
    RecipeTrainer,
    TrainResult,
    oom_phase,
)

log = logging.getLogger("tuneboard.worker")

MAX_EVAL_ROWS = 1000
GRAPHED = ", decoder layers replayed as CUDA graphs"  # in the compute mode


class LoRARecipe:
    # Metric names a recipe logs beside loss, learning rate and grad norm (Metric columns).
    FIGURES: ClassVar[tuple[str, ...]] = ()
    # What the data must hold to train at all (the message when nothing is left).
    NOTHING_LEFT_HINT = "Check the dataset's rows, or raise max_seq_len."
    # Set by `_prepare_data`: what the data loader hands the collator, one item a micro-batch.
    train_batches: list[Any]
    eval_batches: list[Any]

    def __init__(
        self,
        config: TrainConfig,
        model_path: Path | str,
        output_dir: Path,
        sink: MetricsSink,
        control: RunControl,
        train_examples: list[Any] | None = None,
        eval_examples: list[Any] | None = None,
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
        self.trainer: RecipeTrainer | None = None
        self.memory_policy = "off"
        self.kept_layers = 0  # "partial": the last layers that keep their activations
        self.memory_policy_reason = ""  # the job page's why
        self.trial_limit: float | None = None  # what a trial step may peak at (None: no card)
        self.policy_trial = memory_policy.PolicyTrial()  # what `auto` measured (the graphs' check)
        self.quantization_used: Quantization | None = None  # set when the base model loads
        self.offload_stream: Any = None  # made by the first offloaded step (activation_offload)
        self.layer_graphs: layer_graphs.LayerGraphs | None = None  # _replay_layers_as_graphs
        self.liger = False
        self.missing_kernels: list[str] = []  # what the GPU recipe would use but cannot import
        self.start_timing = StartTiming()  # worker/run.py dates it from the claim

    # --- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        if self.distributed:
            from worker.errors import ModelNotFound

            if not torch.cuda.is_available():
                raise ModelNotFound(
                    f"A job on {self.world_size} GPUs needs CUDA; this machine has none.",
                    "Set gpus to 1, or run the job on a worker started with --gpus 0,1.",
                )
            torch.cuda.set_device(self.local_rank)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        timing = self.start_timing
        with timing.part("tokenisation"):
            self.tokenizer = self._load_tokenizer()
            self._prepare_data()
        if not self.train_batches:
            raise DatasetError(
                "No training examples are left after tokenisation.", self.NOTHING_LEFT_HINT
            )
        with timing.part("model load"):
            self._load_model()
        with memory_policy.objects_frozen():  # the trial steps' collections walk only theirs
            with timing.part("memory policy"):
                memory_policy.choose(self)
            self._replay_layers_as_graphs()
        self.trainer = self._build_trainer()

    def _load_model(self) -> None:
        """The base model, the kernels that apply to it and the LoRA adapter, in training mode."""
        attn = loading.attention_implementation(self.model_dir, self.config.packing, self.control)
        self.model, self.compute_mode, self.quantization_used = loading.load_base_model(
            self.model_dir, self.model_path, self.config, self.device, self.world_size, attn
        )
        if attn == attention.NAME and attention.soft_caps(self.model.config):
            self.compute_mode += f", {attention.SOFTCAPPED}"
        self.missing_kernels = loading.missing_kernels(self.device, self.distributed)
        self.liger = loading.apply_liger_kernels(
            self.model, self.device, self.distributed, self.control
        )
        if self.liger:
            self.compute_mode += ", Liger kernels"
        elif "liger-kernel" in self.missing_kernels:
            self.compute_mode += f", {LIGER_MISSING}"  # the job page says what it costs
        self.model = loading.attach_lora(self.model, self.config)
        for fused in loading.fuse_lora_layers(self.model, self.distributed):
            self.compute_mode += f", {fused}"
        self.model.train()  # from_pretrained returns eval mode; checkpointing only acts in train

    def _replay_layers_as_graphs(self) -> None:
        """The decoder layers replayed as CUDA graphs (worker.layer_graphs) where one capture
        serves the whole run: one GPU, activations kept on the card (not offloaded), no random
        numbers in a layer (dropout), and every training micro-batch of one shape, or padded to
        one by the collator once the graphs are on (a graph holds its shape's memory; other
        shapes would run eagerly beside it). Captured here, on the longest micro-batch: where
        their memory would not fit beside the step, they go and the job page says why."""
        cfg = self.config
        if (
            layer_graphs.ENABLED
            and not self.distributed
            and self.memory_policy in ("off", "partial", "on")
            and not cfg.lora_dropout
            and not getattr(self.model.config, "attention_dropout", 0.0)
            and self._one_batch_shape()
            and (graphs := layer_graphs.graph_layers(self._decoder_layers())) is not None
        ):
            graphs.on_capture = self._graphs_captured
            self.layer_graphs = graphs
            self.compute_mode += GRAPHED
            with self.start_timing.part("CUDA graphs"):
                overflow = memory_policy.graphs_overflow(self)
            if graphs.failure is not None:  # a failed capture says so itself
                self.drop_graphs(None)
            elif overflow is not None:
                self.drop_graphs(overflow)
            else:
                self.control.update(compute_mode=self.compute_mode)

    def drop_graphs(self, why: str | None) -> None:
        """The layers back to eager and their memory pool freed for the rest of the run; the job
        page says why (None: it already does)."""
        if self.layer_graphs is not None:
            layer_graphs.ungraph_layers(self.layer_graphs.layers)
            self.layer_graphs = None
            if why is not None:
                self._graphs_off(f"CUDA graphs off ({why})")
                self.control.update(compute_mode=self.compute_mode)
        self._free_cuda()

    def _graphs_off(self, why: str) -> None:
        self.compute_mode = self.compute_mode.replace(GRAPHED, "") + f", {why}"

    def _graphs_captured(self, seconds: float | None, failure: str | None) -> None:
        """The job page's start timing gets the capture's seconds; its compute mode, a failure."""
        if failure is not None:
            reason = failure.splitlines()[0].split(". ")[0]  # e.g. CUDA's "out of memory"
            self._graphs_off(f"CUDA graphs off (their capture failed: {reason})")
            self.control.update(compute_mode=self.compute_mode)
        elif seconds is not None and self.start_timing.total_s is None:  # before the first step
            self.start_timing.graphs_captured(seconds)

    def _one_batch_shape(self) -> bool:
        """Whether every training micro-batch has, or can be padded to, one shape (then CUDA
        graphs can serve; `_collator` pads once `layer_graphs` is set)."""
        return False

    def _load_tokenizer(self) -> Any:
        self.model_dir = loading.resolve_model(self.model_path)
        return loading.load_tokenizer(self.model_dir, self.chat_template)

    # --- what a method's recipe says ---------------------------------------------------------

    def _prepare_data(self) -> None:
        """Sets `train_batches` and `eval_batches` (lists the collator turns into batches)."""
        raise NotImplementedError

    def _collator(self) -> Any:
        raise NotImplementedError

    def _longest_batch(self) -> dict[str, torch.Tensor]:
        """The micro-batch that needs the most memory, on the device (for trial steps)."""
        raise NotImplementedError

    def batch_loss(self, model: Any, batch: dict[str, Any]) -> torch.Tensor:
        """The loss of one micro-batch (the forward pass)."""
        raise NotImplementedError

    def compute_loss(
        self,
        trainer: RecipeTrainer,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool,
        num_items_in_batch: Any,
    ) -> Any:
        """The Trainer's loss; by default the recipe's `batch_loss` (a mean over the
        micro-batch, which the Trainer divides by the accumulation steps), under bf16 autocast
        on the GPU as `forward_backward` runs it: the Trainer's autocast wraps the model's own
        forward, which a recipe that calls the decoder itself does not go through (without it
        the fp32 LoRA weights pull the activations to fp32: 8B DPO ran out of 22.5 GiB)."""
        cuda = self.device.type == "cuda"
        with torch.autocast(self.device.type, torch.bfloat16, cuda):
            loss = self.batch_loss(model, inputs)
        return (loss, {}) if return_outputs else loss

    def logged_figures(self, mode: str) -> dict[str, float]:
        """Figures for the row the Trainer logs now (`mode`: train or eval), since the last."""
        return {}

    def _rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(train rows, eval rows): the run's files (worker/run.py cut them with the job's
        `eval_fraction`), or, given one file alone (tests, the benchmark), a seeded split of it."""
        assert self.rows_path is not None
        rows = read_rows(self.rows_path)
        if self.eval_rows_path is not None:
            return rows, read_rows(self.eval_rows_path)
        order = list(range(len(rows)))
        random.Random(self.config.seed).shuffle(order)
        n_eval = min(MAX_EVAL_ROWS, round(len(rows) * self.config.eval_fraction))
        n_eval = n_eval if len(rows) - n_eval >= 1 else 0
        return [rows[i] for i in sorted(order[n_eval:])], [rows[i] for i in sorted(order[:n_eval])]

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    # --- memory policy (worker.training.memory_policy) ---------------------------------------

    def _set_memory_policy(self, policy: str, kept_layers: int = 0) -> None:
        memory_policy.set_policy(self, policy, kept_layers)

    def _measure_memory_policy(self) -> tuple[str, str, int]:
        return memory_policy.measure(self)

    def _try_policy(self, batch: dict[str, torch.Tensor], policy: str, kept: int = 0) -> int | None:
        return memory_policy.try_policy(self, batch, policy, kept)

    def _optimizer_state_bytes(self) -> int:
        return memory_policy.optimizer_state_bytes(self.model)

    def _optimizer_state_held(self) -> Any:
        return memory_policy.optimizer_state_held(self)

    def _trial_step(self, batch: dict[str, torch.Tensor]) -> int:
        return memory_policy.trial_step(self, batch)

    def _evaluation_step(self, batch: dict[str, torch.Tensor]) -> int:
        return memory_policy.evaluation_step(self, batch)

    def _timed_step(self, batch: dict[str, torch.Tensor]) -> float:
        return memory_policy.timed_step(self, batch)

    def _usable_memory(self) -> int:
        return memory_policy.usable_memory(self.device)

    def _decoder_layers(self) -> list[Any]:
        return memory_policy.decoder_layers(self.model)

    def _tile_tokens(self) -> int:
        return memory_policy.tile_tokens(self.model)

    def activation_offload(self) -> Any:
        return memory_policy.activation_offload(self)

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One micro-batch's forward and backward pass under the memory policy (bf16 autocast on
        the GPU), outside the Trainer: for trial steps and measurements. The gradients stay on
        the model; the detached loss is returned."""
        cuda = self.device.type == "cuda"
        with lora_projection.casts_kept():
            with self.activation_offload(), torch.autocast(self.device.type, torch.bfloat16, cuda):
                loss = self.batch_loss(self.model, batch)
            loss.backward()
        return loss.detach()

    def _free_cuda(self) -> None:
        memory_policy.free_cuda()

    # --- the Trainer ---------------------------------------------------------------------------

    def _build_trainer(self) -> RecipeTrainer:
        cfg = self.config
        if str(cfg.report_to) == "tensorboard":
            # transformers' TensorBoardCallback reads its folder from this variable (else a
            # dated folder under the checkpoints); the job page names this one.
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_in(self.output_dir))
        on_cuda = self.device.type == "cuda"
        has_eval = bool(self.eval_batches)
        args = TrainingArguments(
            output_dir=str(self.checkpoint_dir),
            per_device_train_batch_size=self._items_per_micro_batch(),
            per_device_eval_batch_size=self._items_per_micro_batch(),
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
            **distributed.fsdp_arguments(self.model, self.distributed),
        )
        if not self.distributed:
            # One process, one GPU: with several visible the Trainer would wrap the model in
            # DataParallel, hand it two packed rows at once and scale the loss by the GPU count.
            _ = args.n_gpu  # sets up the devices, which also sets _n_gpu
            args._n_gpu = min(args._n_gpu, 1)
        trainer = RecipeTrainer(
            model=self.model,
            args=args,
            train_dataset=ListDataset(self.train_batches),
            eval_dataset=ListDataset(self.eval_batches) if has_eval else None,
            data_collator=self._collator(),
        )
        trainer.recipe = self
        trainer.remove_callback(PrinterCallback)  # rows go to the sink, not to stdout
        self.callback = RecipeCallback(self)
        trainer.add_callback(self.callback)
        return trainer

    def _items_per_micro_batch(self) -> int:
        """What the Trainer's data loader takes per micro-batch: one packed batch, or examples."""
        return 1 if self.config.packing else self.config.micro_batch_size

    def _is_main_rank(self) -> bool:
        return distributed.is_main_rank(self.distributed)

    def _barrier(self) -> None:
        distributed.barrier(self.distributed)

    def shared_stop_reason(self, reason: str | None) -> str | None:
        return distributed.shared_stop_reason(reason, self.distributed)

    def save_sharded_adapter(self, directory: Path) -> None:
        assert self.trainer is not None
        distributed.save_sharded_adapter(
            self.model, self.trainer.model_wrapped, self.tokenizer, directory, self._is_main_rank()
        )

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
                distributed.load_adapter_weights(self.model, resume, self.device)
        if self._is_main_rank():
            checkpoints.remove_incomplete(self.checkpoint_dir)
        self._barrier()
        oom: OutOfMemory | None = None
        try:
            self.trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        except torch.OutOfMemoryError as error:
            oom = OutOfMemory(
                step=self.trainer.state.global_step,
                micro_batch_size=self.config.micro_batch_size,
                seq_len=self.trainer.last_seq_len,
                detail=f"It happened {oom_phase(error)}.",
            )
            log.warning("out of memory:\n%s", "".join(traceback.format_exception(error)))
        except CheckpointDiskFull as error:
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
        if self.layer_graphs is not None:
            layer_graphs.ungraph_layers(self.layer_graphs.layers)  # their memory pools go
            self.layer_graphs = None
        if self.trainer is not None:
            self.trainer.model = None  # type: ignore[assignment]
            self.trainer.model_wrapped = None  # type: ignore[assignment]
            self.trainer.optimizer = None
            self.trainer.lr_scheduler = None
        self.trainer = None
        self.model = None
        self._free_cuda()

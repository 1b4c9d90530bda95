"""The job configuration: one typed schema that renders the New Job form, validates the API and is
stored on the job. The worker reads it back with `TrainConfig.model_validate`.

Every field has a docstring (shown as the form's help text) and bounds. Unknown fields are refused,
and free-text fields are restricted to safe characters, so a config can never carry a command, a
URL or a file path.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# A registered model name or a hub-style id ("org/name"): no "..", no scheme, no absolute path.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$"
DATASET_ID_PATTERN = r"^[0-9a-f]{32}$"
JOB_NAME_PATTERN = r"^[\w][\w .()+,-]{0,79}$"
LORA_TARGET_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"


class DatasetShare(BaseModel):
    """One dataset of a job that trains on several, and its share of the training rows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(pattern=DATASET_ID_PATTERN)]
    weight: Annotated[float, Field(gt=0, le=1000)] = 1.0
    """Sampling ratio: this dataset gives weight / (sum of the weights) of the training rows."""


MAX_DATASETS = 16


class Method(StrEnum):
    sft = "sft"
    dpo = "dpo"
    orpo = "orpo"


PREFERENCE_METHODS = (Method.dpo, Method.orpo)


class DpoLoss(StrEnum):
    sigmoid = "sigmoid"
    ipo = "ipo"


class Quantization(StrEnum):
    nf4 = "nf4"
    none = "none"


class TrainOn(StrEnum):
    assistant = "assistant"
    all = "all"


class ChatTemplate(StrEnum):
    """A chat template to use instead of the model's own (None: the model's own; a model without
    one is trained and served with ChatML anyway)."""

    chatml = "chatml"


# Shared with the dataset report, which measures a dataset as a job with these settings would see it.
MaxSeqLen = Annotated[int, Field(ge=32, le=262_144)]


class GradientCheckpointing(StrEnum):
    auto = "auto"
    on = "on"
    off = "off"
    offload = "offload"
    tiled = "tiled"


class LrScheduler(StrEnum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"
    constant_with_warmup = "constant_with_warmup"


class LongText(StrEnum):
    chunks = "split"  # (not `split`: that name is str.split)
    cut = "cut"


class ReportTo(StrEnum):
    none = "none"
    tensorboard = "tensorboard"
    wandb = "wandb"
    mlflow = "mlflow"


# The fields each method alone reads; a field of another method must stay unset (None).
METHOD_FIELDS: dict[Method, tuple[str, ...]] = {
    Method.sft: (),
    Method.dpo: ("beta", "loss_type"),
    Method.orpo: ("beta",),
}
METHOD_DEFAULTS: dict[Method, dict[str, Any]] = {
    Method.sft: {},
    Method.dpo: {"beta": 0.1, "loss_type": DpoLoss.sigmoid},
    Method.orpo: {"beta": 0.1},
}


class TrainConfig(BaseModel):
    """A QLoRA fine-tuning job. Defaults are the "balanced" preset."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    name: Annotated[str, Field(pattern=JOB_NAME_PATTERN)] = "my fine-tune"
    """A name for this run, shown in the jobs list."""

    method: Method = Method.sft
    """sft: learn to give the dataset's answers; dpo / orpo: learn which of two answers is better
    (a preference dataset: prompt, chosen and rejected answers)."""

    beta: Annotated[float | None, Field(gt=0, le=10)] = None
    """DPO: how far the adapter may move from the base model (higher keeps it closer; 0.1 is
    usual). ORPO: the weight of the preference term beside the chosen answer's loss (0.1)."""

    loss_type: DpoLoss | None = None
    """DPO's loss: sigmoid (the DPO paper's) or ipo (steadier when preferences are noisy)."""

    base_model: Annotated[str, Field(pattern=MODEL_NAME_PATTERN)] = "demo-tiny-llama"
    """The registered base model to fine-tune (see the Models page)."""

    dataset_id: Annotated[str, Field(pattern=DATASET_ID_PATTERN)]
    """The dataset to train on; it must have passed validation."""

    datasets: Annotated[list[DatasetShare] | None, Field(min_length=1, max_length=MAX_DATASETS)] = (
        None
    )
    """Several datasets to train on at once, each with a weight (its sampling ratio); dataset_id
    is then the first of them. One pass (epoch) is as many rows as their training splits hold
    together, drawn from each in proportion to its weight (repeating a small dataset's rows,
    sampling a large one's); the eval split holds each dataset's own held-out rows."""

    max_seq_len: MaxSeqLen = 2048
    """Longest example in tokens. Longer rows are handled as the dataset report says."""

    num_epochs: Annotated[float, Field(gt=0, le=100)] = 1.0
    """Passes over the training split. Ignored when max_steps is set."""

    max_steps: Annotated[int | None, Field(ge=1, le=1_000_000)] = None
    """Stop after this many optimizer steps (overrides num_epochs)."""

    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 2e-4
    """Peak learning rate of the LoRA weights."""

    lr_scheduler: LrScheduler = LrScheduler.cosine
    """How the learning rate changes after warm-up."""

    warmup_ratio: Annotated[float, Field(ge=0, le=0.5)] = 0.03
    """Fraction of the steps spent warming the learning rate up."""

    micro_batch_size: Annotated[int, Field(ge=1, le=512)] = 4
    """Examples (or packed sequences) per forward pass. Lower it if the card runs out of memory."""

    grad_accum_steps: Annotated[int, Field(ge=1, le=1024)] = 4
    """Forward passes per optimizer step: effective batch = micro batch x accumulation."""

    lora_r: Annotated[int, Field(ge=1, le=1024)] = 16
    """LoRA rank: capacity of the adapter."""

    lora_alpha: Annotated[int, Field(ge=1, le=4096)] = 32
    """LoRA scale numerator (scale = alpha / r)."""

    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Dropout on the LoRA input. 0 is fastest."""

    lora_targets: Annotated[
        list[Annotated[str, Field(pattern=LORA_TARGET_PATTERN)]] | None,
        Field(max_length=64),
    ] = None
    """Module names to adapt (e.g. q_proj, v_proj). Empty: every linear projection of the model."""

    quantization: Quantization = Quantization.nf4
    """nf4: 4-bit QLoRA (needs CUDA and bitsandbytes); none: LoRA on bf16 weights."""

    train_on: TrainOn = TrainOn.assistant
    """assistant: loss on the assistant's replies only; all: loss on every token."""

    long_text: LongText = LongText.chunks
    """Plain-text rows longer than max_seq_len: split into max_seq_len chunks (continued
    pre-training: every token is trained), or cut at the end (the rest is lost)."""

    packing: bool = True
    """Pack several examples into one sequence without padding (no attention between them)."""

    gradient_checkpointing: GradientCheckpointing = GradientCheckpointing.auto
    """auto picks the fastest setting that fits the card; offload moves activations to CPU RAM;
    tiled also runs each MLP a slice of tokens at a time (the longest sequences, a bit slower)."""

    eval_fraction: Annotated[float, Field(ge=0, le=0.5)] = 0.05
    """Share of the dataset held out for evaluation (at most 1,000 rows)."""

    eval_every: Annotated[int, Field(ge=1, le=1_000_000)] = 50
    """Evaluate every this many steps."""

    save_every: Annotated[int, Field(ge=1, le=1_000_000)] = 100
    """Write a resumable checkpoint every this many steps."""

    logging_every: Annotated[int, Field(ge=1, le=10_000)] = 1
    """Record a metrics row every this many steps."""

    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 42
    """Random seed for the split, the LoRA init and the data order."""

    report_to: ReportTo = ReportTo.none
    """Also log to an experiment tracker. Only installed ones are offered: the common ones come
    with `pip install 'tuneboard[trackers]'`."""

    gpus: Annotated[int, Field(ge=1, le=8)] = 1
    """GPUs for this one job (more than one runs under torchrun with FSDP)."""

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        """A method's own fields get their defaults when left out (or None), so a stored config
        says what ran. An unknown method is left for the field to refuse."""
        method = data.get("method", "sft") if isinstance(data, dict) else None
        if not isinstance(method, str) or method not in {m.value for m in Method}:
            return data  # not a config, or a method the field refuses with its own message
        defaults = METHOD_DEFAULTS[Method(method)]
        return {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}

    @model_validator(mode="before")
    @classmethod
    def _first_of_datasets(cls, data: Any) -> Any:
        """With `datasets` given, `dataset_id` is their first (it may be left out)."""
        if not isinstance(data, dict) or not isinstance(data.get("datasets"), list):
            return data
        shares = data["datasets"]
        first = shares[0] if shares else None
        first_id = first.get("id") if isinstance(first, dict) else getattr(first, "id", None)
        if data.get("dataset_id") is None and isinstance(first_id, str):
            return {**data, "dataset_id": first_id}
        return data

    @model_validator(mode="after")
    def _method_fields_and_targets(self) -> TrainConfig:
        for name in {name for fields in METHOD_FIELDS.values() for name in fields}:
            if name not in METHOD_FIELDS[self.method] and getattr(self, name) is not None:
                owners = " and ".join(m.value for m in Method if name in METHOD_FIELDS[m])
                raise ValueError(
                    f"{name} is a setting of {owners}, not of {self.method.value}: leave it out, "
                    f"or choose method {owners.split()[0]}"
                )
        if self.method in PREFERENCE_METHODS and self.gpus > 1:
            raise ValueError(
                f"{self.method.value} trains on one GPU for now: set gpus to 1 (several GPUs "
                "are for sft jobs)"
            )
        if self.method in PREFERENCE_METHODS and self.train_on != TrainOn.assistant:
            raise ValueError(
                f"train_on is a setting of sft: {self.method.value} always trains on the answers "
                "of each pair; leave it out"
            )
        if self.method in PREFERENCE_METHODS and self.long_text != LongText.chunks:
            raise ValueError(
                f"long_text is a setting of sft: {self.method.value} trains on preference pairs, "
                "not plain text; leave it out"
            )
        if self.lora_targets is not None and len(set(self.lora_targets)) != len(self.lora_targets):
            raise ValueError("The lora_targets list names a module twice")
        if self.datasets is not None:
            ids = [share.id for share in self.datasets]
            if len(set(ids)) != len(ids):
                raise ValueError(
                    "datasets lists a dataset twice: give each dataset once, with one weight"
                )
            if self.dataset_id != ids[0]:
                raise ValueError(
                    "dataset_id must be the first of datasets: leave dataset_id out when you "
                    "give datasets"
                )
        return self

    @property
    def dataset_shares(self) -> list[DatasetShare]:
        """The job's datasets and their weights: `datasets`, or `dataset_id` alone at weight 1."""
        return list(self.datasets or [DatasetShare(id=self.dataset_id)])


class TokenReportSettings(BaseModel):
    """What a dataset's token report is measured with: TrainConfig's own types and bounds, so a
    report asks nothing a job would refuse."""

    model_config = ConfigDict(extra="forbid")

    max_seq_len: MaxSeqLen = 2048
    train_on: TrainOn = TrainOn.assistant
    chat_template: ChatTemplate | None = None


# "quick test" is a 30-step smoke run for real (pretrained) models: it proves the pipeline, data and
# memory policy on the card; at lr 2e-4 it does not teach anything visible, and must not be bent to.
# "demo" is for the demo model (worker/demo.py), which is *random-initialised*: LoRA has to steer
# frozen random layers, which takes a learning rate ~15x what suits a pretrained model and a few
# hundred small steps (measured on the demo, 300 steps of 2 x 128: lr 3e-3 with r 32 / alpha 64
# answers 8 of the 10 facts word for word, eval loss 1.70; lr 5e-3 with r 16 stays at 3.9 and
# answers none; 1e-2 and 2e-2 stall near 5). With the SentencePiece demo tokenizer (for llama.cpp's
# converter; digits are single tokens) 300 steps mixed up the price and the capacity and 400 answer
# both test questions (lr 2e-3 at 300 steps did not). Micro-batches of
# 2 x 128 tokens (the longest demo row is 91): on the CPU a packed micro-batch's attention is
# quadratic in its length, and many small steps learn more per CPU second than few big ones. The
# New Job page starts from "demo" when the demo model and the demo dataset are chosen.
PRESETS: dict[str, dict[str, Any]] = {
    "quick test": {"max_steps": 30, "max_seq_len": 512, "eval_every": 10, "save_every": 10},
    "balanced": {},
    "best quality": {"num_epochs": 3.0, "lora_r": 64, "lora_alpha": 128, "learning_rate": 1e-4},
    "demo": {
        "max_steps": 400,
        "max_seq_len": 128,
        "micro_batch_size": 2,
        "grad_accum_steps": 1,
        "learning_rate": 3e-3,
        "warmup_ratio": 0.03,
        "lora_r": 32,
        "lora_alpha": 64,
        "eval_every": 100,
        "save_every": 100,
    },
}

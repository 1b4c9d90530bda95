"""Several GPUs (a job with `gpus: N`, started by torchrun, one process per GPU): the Trainer's FSDP
(FSDP1: full shard, one unit per decoder layer) over 4-bit weights stored as bf16 so FSDP can shard
them (FSDP-QLoRA). Each rank loads the model onto its own GPU; rank 0 writes metric rows, progress
and the completion markers (after a barrier); each step the ranks agree on the token count, the
finiteness flag and whether to stop. Checkpoints are the Trainer's FSDP checkpoints: they resume
on the same number of GPUs. On one process every function here is a no-op or the identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from worker.errors import DatasetError, TrainingError

_STOP_REASONS = (None, "shutdown", "cancel", "lease_lost")  # later ones win


def fsdp_arguments(model: Any, distributed: bool) -> dict[str, Any]:
    """TrainingArguments for FSDP-QLoRA on several GPUs; nothing on one.

    FSDP1 (`version: 1`): bitsandbytes' 4-bit parameters shard as flat bf16 storage; FSDP2
    (transformers' default from 5.16) does not handle them. The Trainer wraps the LoRA layers
    in units of their own (peft's policy) and sets mixed precision to the storage dtype.
    """
    if not distributed:
        return {}
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "version": 1,
            "transformer_layer_cls_to_wrap": [decoder_layer_class(model)],
            "use_orig_params": "false",
            "sync_module_states": "true",  # one LoRA initialisation on every rank
            "cpu_ram_efficient_loading": "false",
            "activation_checkpointing": "false",  # ours (the memory policy) is on the model
            "state_dict_type": "FULL_STATE_DICT",
        },
        "ddp_timeout": 1800,
    }


def decoder_layer_class(model: Any) -> str:
    base = model.get_base_model()
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


def is_main_rank(distributed: bool) -> bool:
    return not distributed or torch.distributed.get_rank() == 0


def barrier(distributed: bool) -> None:
    if distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()


def shared_stop_reason(reason: str | None, distributed: bool) -> str | None:
    """Rank 0's stop decision on every rank (after training: whether all ranks save)."""
    if not distributed:
        return reason
    box = [reason]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def agreed_stop_reason(reason: str | None, device: torch.device) -> str | None:
    """The strongest stop reason any rank saw (rank 0 reads the queue; every rank sees SIGTERM),
    so all ranks stop at the same step and checkpoint together."""
    code = torch.tensor([_STOP_REASONS.index(reason)], device=device)
    torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
    return _STOP_REASONS[int(code.item())]


def load_adapter_weights(model: Any, checkpoint: Path, device: torch.device) -> None:
    """A checkpoint's LoRA weights into the (not yet wrapped) model, on every rank."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = checkpoint / "adapter_model.safetensors"
    if not path.is_file():
        raise TrainingError(
            f"The checkpoint {checkpoint.name} has no adapter weights to resume from.",
            "Delete the job's checkpoints folder to start over, or retry from a newer one.",
        )
    weights = load_file(path, device=str(device))  # as save_sharded_adapter wrote it
    loaded = set_peft_model_state_dict(model, weights)
    missing = [key for key in getattr(loaded, "missing_keys", []) if "lora_" in key]
    if missing:
        found = next(iter(weights), "nothing")
        raise TrainingError(
            f"The checkpoint {checkpoint.name} does not match this job's LoRA layers "
            f"({len(missing)} missing, e.g. {missing[0]}; it holds {len(weights)} tensors, "
            f"e.g. {found}).",
            "Resume with the same config it was started with, or delete its checkpoints.",
        )


def save_sharded_adapter(
    model: Any, wrapped: Any, tokenizer: Any, directory: Path, main: bool
) -> None:
    """Every rank joins in gathering the FSDP-sharded LoRA weights; rank 0 writes the adapter
    (the same files as `save_pretrained` on one GPU).

    Ours, not the Trainer's: its FSDP save of a PEFT model, through peft's state-dict filter,
    wrote an adapter file with no tensors in it (transformers 5.17, peft 0.21, FSDP1).
    """
    from safetensors.torch import save_file
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    adapter = ".default."  # peft's name for the one adapter; not in the saved names
    with FSDP.summon_full_params(wrapped, writeback=False, rank0_only=True, offload_to_cpu=True):
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
    model.peft_config["default"].save_pretrained(str(directory))
    tokenizer.save_pretrained(directory)


def _without_wrapper_parts(name: str) -> str:
    """A parameter's name as the bare PEFT model has it: FSDP's and checkpointing's wrapper
    modules dropped from the path."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")

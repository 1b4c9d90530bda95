"""A 4-bit (NF4) weight dequantised in one kernel, for the fused LoRA functions
(worker.lora_projection), which dequantise every base weight on the fly: twice a step without
checkpointing, three times with it.

bitsandbytes' `dequantize_4bit` on a double-quantised weight (QLoRA's default) is three kernels,
each launched through Python: the nested 8-bit block scales dequantised to float32, their offset
added, then the 4-bit values. The profile put half of the dequantisation's GPU time and 74 of its
135 µs of host time per call in the first two (bench/RESULTS.md, session 9). Here one Triton
kernel reads the packed values and the nested scales and writes the weight:

    weight[i] = NF4[q(i)] * (code2[absmax[b]] * absmax2[b // blocksize2] + offset),  b = i // blocksize

with the same float32 operations, in the same order, as bitsandbytes (no fused multiply-add), so
the result is bit for bit bitsandbytes'. Anything the kernel does not cover (FP4, no Triton, not
CUDA, another device than the current one) goes through bitsandbytes.

    dequantize(weight, torch.bfloat16)   # weight: a bitsandbytes Params4bit
"""

from __future__ import annotations

import functools
from typing import Any

import torch

# The benchmark's `bnbdequant` variant turns this off to time bitsandbytes' own path.
FUSED = True

BYTES_PER_PROGRAM = 1024  # two weights a byte: 2,048 weights per program


def dequantize(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit `weight` [out, in] in `dtype`."""
    state = weight.quant_state
    if FUSED and _kernel_covers(weight.data, state, dtype):
        return _dequantize_fused(weight.data, state, dtype)
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(weight.data, state).to(dtype)


def runs_fused(model: Any) -> bool:
    """Whether `model`'s 4-bit weights take the one-kernel path (for the job page's compute
    mode)."""
    for module in model.modules():
        weight: Any = getattr(module, "weight", None)
        if hasattr(weight, "quant_state"):
            state = weight.quant_state
            return FUSED and _kernel_covers(weight.data, state, state.dtype)
    return False


def _kernel_covers(packed: torch.Tensor, state: Any, dtype: torch.dtype) -> bool:
    return (
        packed.is_cuda
        and packed.is_contiguous()
        and state.quant_type == "nf4"
        and dtype in (torch.bfloat16, torch.float16, torch.float32)
        and state.blocksize % 2 == 0
        and (not state.nested or state.state2.absmax.dtype == torch.float32)
        and packed.device.index == torch.cuda.current_device()
        and _kernel() is not None
    )


def _dequantize_fused(packed: torch.Tensor, state: Any, dtype: torch.dtype) -> torch.Tensor:
    kernel = _kernel()
    as_bytes = packed.reshape(-1).view(torch.uint8)
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    n_out = out.numel()
    grid = ((as_bytes.numel() + BYTES_PER_PROGRAM - 1) // BYTES_PER_PROGRAM,)
    if state.nested:
        scales, scales2, code2, offset = (
            state.absmax,
            state.state2.absmax,
            state.state2.code,
            state.offset,
        )
        blocksize2 = state.state2.blocksize
    else:  # the scales are float32 already: the nested arguments are not read
        scales = scales2 = code2 = offset = state.absmax.float()
        blocksize2 = 1
    kernel[grid](
        as_bytes,
        scales,
        scales2,
        code2,
        offset,
        state.code,
        out,
        n_out,
        BLOCKSIZE=state.blocksize,
        BLOCKSIZE2=blocksize2,
        NESTED=bool(state.nested),
        BYTES=BYTES_PER_PROGRAM,
        enable_fp_fusion=False,  # a*b+c as bitsandbytes computes it, not as one fma
    )
    return out


@functools.cache
def _kernel() -> Any:
    try:
        import triton
        import triton.language as tl
    except ImportError:  # no Triton here: bitsandbytes' kernels
        return None

    @triton.jit
    def nf4_dequantize(
        packed_ptr,
        scales_ptr,
        scales2_ptr,
        code2_ptr,
        offset_ptr,
        code_ptr,
        out_ptr,
        n_out,
        BLOCKSIZE: tl.constexpr,
        BLOCKSIZE2: tl.constexpr,
        NESTED: tl.constexpr,
        BYTES: tl.constexpr,
    ):
        start = tl.program_id(0).to(tl.int64) * BYTES
        byte_index = start + tl.arange(0, BYTES)
        first = byte_index * 2  # the byte's first weight (its high four bits)
        live = first < n_out
        byte = tl.load(packed_ptr + byte_index, mask=live, other=0).to(tl.int32)
        block = first // BLOCKSIZE  # both weights of a byte share a block: BLOCKSIZE is even
        if NESTED:
            q = tl.load(scales_ptr + block, mask=live, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q, mask=live, other=0.0) * tl.load(
                scales2_ptr + block // BLOCKSIZE2, mask=live, other=0.0
            )
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(scales_ptr + block, mask=live, other=0.0)
        high = tl.load(code_ptr + (byte >> 4)) * scale
        low = tl.load(code_ptr + (byte & 15)) * scale
        values = tl.interleave(high, low)
        index = start * 2 + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + index, values.to(out_ptr.dtype.element_ty), mask=index < n_out)

    return nf4_dequantize

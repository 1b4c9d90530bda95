"""GPU: the worker's inference server (`python -m worker.inference`, a subprocess as in
production) on CUDA with the NF4 demo base and the trained adapter. A chat client that hangs up
mid-stream stops the generation, and the server answers the next chat. Stdlib HTTP only.

On the GPU machine: `pytest -m gpu tests/playground/test_gpu_stream.py -v`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.playground.conftest import (
    ADAPTER_ID,
    BASE,
    QUESTION,
    hang_up_after,
    inference_status,
    running_inference_server,
    stream_generation,
    wait_for_generation_end,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU_WORKER_ID = "gpu-test-worker"
LIMIT = 600
# Greedy requests tried in turn until one runs to LIMIT when nobody hangs up (a request that
# ends early at its end-of-turn token cannot show a disconnect); the adapter first.
CANDIDATES = [
    (ADAPTER_ID, "Tell me everything about the Zephyr Kettle 3000, in as much detail as you can."),
    (ADAPTER_ID, QUESTION),
    (BASE, QUESTION),
    (BASE, "Tell me everything about the Zephyr Kettle 3000, in as much detail as you can."),
]


@pytest.fixture(scope="module")
def gpu_inference_server(pg_settings, pg_db, trained) -> Iterator[str]:
    pytest.importorskip("bitsandbytes")
    with running_inference_server(
        pg_settings, pg_db, GPU_WORKER_ID, cuda=True, quantization="nf4"
    ) as url:
        yield url


def _body(model: str, prompt: str, max_new_tokens: int = LIMIT) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_new_tokens": max_new_tokens,
    }


def _a_long_generation(url: str) -> dict[str, Any]:
    tried = []
    for model, prompt in CANDIDATES:
        body = _body(model, prompt)
        _, summary, events = stream_generation(url, body)
        if summary.get("finish_reason") == "length" and events >= 20:
            return body
        tried.append((model, prompt, summary.get("finish_reason"), events))
    pytest.fail(f"no candidate request generates to {LIMIT} tokens: {tried}")


def test_a_chat_client_that_hangs_up_stops_the_generation_on_the_gpu(gpu_inference_server):
    url = gpu_inference_server
    body = _a_long_generation(url)
    status = inference_status(url)
    assert status["device"].startswith("cuda") and "NF4" in status["compute_mode"], status
    assert status["base_model"] == BASE and ADAPTER_ID in status["adapters"], status

    hang_up_after(url, body, events=5)
    last = wait_for_generation_end(url)
    assert last["disconnected"] is True and last["finish_reason"] == "disconnect", last
    assert last["completion_tokens"] < LIMIT / 4, last

    # The server goes on: the next chat streams to its end, on the same loaded base.
    text, summary, _ = stream_generation(url, _body(ADAPTER_ID, QUESTION, 40))
    assert summary["finish_reason"] in ("stop", "length") and text.strip(), summary
    assert not summary["disconnected"]
    after = inference_status(url)
    assert after["base_loads"] == 1 and not after["generating"], after

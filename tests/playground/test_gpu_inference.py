"""GPU: the inference engine with an NF4 base and the adapter; a model too big for the free
memory is refused with gpu_busy instead of crashing or crowding a training job."""

from __future__ import annotations

import pytest

from app.generation import ChatMessage, GenerationRequest
from tests.playground.conftest import ADAPTER_ID, BASE, QUESTION, TRAINED_ANSWER

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture
def engine(pg_settings, pg_db, trained):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("bitsandbytes")
    from worker.inference import Engine

    engine = Engine(pg_settings, pg_db, quantization="nf4")
    yield engine
    engine.unload()


def _answer(engine, model: str) -> str:
    base, adapter = engine.resolve(model)
    request = GenerationRequest(
        model=model,
        messages=[ChatMessage(role="user", content=QUESTION)],
        temperature=0,
        max_new_tokens=40,
    )
    pieces: list[str] = []
    with engine.lock:
        tokenizer = engine.prepare(base, adapter)
        summary = engine.generate(request, adapter, tokenizer, pieces.append)
    assert summary["finished"]
    return "".join(pieces)


def test_nf4_base_with_the_adapter_answers_as_trained(engine):
    import torch

    adapter_answer = _answer(engine, ADAPTER_ID)
    base_answer = _answer(engine, BASE)
    assert "NF4" in engine.compute_mode
    assert engine.model.device.type == "cuda"
    assert any(p.dtype == torch.uint8 for p in engine.model.parameters())  # 4-bit packed weights
    assert adapter_answer.strip() == TRAINED_ANSWER
    assert base_answer.strip() != TRAINED_ANSWER
    assert engine.base_loads == 1


def test_a_model_larger_than_the_free_memory_is_refused_with_gpu_busy(engine, pg_db):
    from app.models import BaseModelEntry
    from worker.inference import InferenceError

    with pg_db.write() as s:
        source = s.get(BaseModelEntry, BASE).source
        s.merge(BaseModelEntry(name="huge-model", source=source, is_local=True, parameters=10**13))
    base, adapter = engine.resolve("huge-model")
    with pytest.raises(InferenceError) as caught:
        engine.prepare(base, adapter)
    assert caught.value.status == 503 and caught.value.code == "gpu_busy"
    assert "needs about" in caught.value.message and caught.value.hint
    assert engine.model is None  # nothing was loaded


def test_echoed_logprobs_on_the_nf4_engine_are_the_models_own(engine):
    """/v1/completions' scoring on the GPU's stack (its transformers' KV-cache argument, NF4
    weights, bf16 compute): the echoed prompt's log-probabilities equal one plain forward pass,
    and greedy generation continues with the most likely token."""
    import torch

    from app.generation import CompletionRequest

    base, adapter = engine.resolve(ADAPTER_ID)
    request = CompletionRequest(
        model=ADAPTER_ID, prompt=QUESTION, max_new_tokens=4, temperature=0, echo=True, logprobs=2
    )
    events: list[dict] = []
    with engine.lock:
        tokenizer = engine.prepare(base, adapter)
        completion = engine.completion(request, adapter, tokenizer)
        summary = engine.complete(completion, events.append)
        ids = torch.tensor([completion.prompt_ids], device=engine.model.device)
        with torch.inference_mode():
            logits = engine.model(input_ids=ids).logits[0].float()
    assert summary["finished"], summary
    prompt = [e for e in events if e["prompt"]]
    answer = [e for e in events if not e["prompt"]]
    assert len(prompt) == len(completion.prompt_ids) and prompt[0]["logprob"] is None
    expected = torch.log_softmax(logits[:-1], -1)
    for position, event in enumerate(prompt[1:], start=1):
        token = completion.prompt_ids[position]
        assert abs(event["logprob"] - float(expected[position - 1, token])) < 0.05, position
    assert answer, events
    first = torch.log_softmax(logits[-1], -1)
    assert abs(answer[0]["logprob"] - float(first.max())) < 0.05

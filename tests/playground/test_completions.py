"""POST /v1/completions (OpenAI's legacy API) against the live web app and the worker's inference
server: the prompt shapes, echo and logprobs equal to the model's own numbers (computed here on
the CPU, the adapter applied or not), the stream, bad input, and the official `openai` client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from tests.playground.conftest import ADAPTER_ID, BASE, QUESTION, TRAINED_ANSWER

pytestmark = pytest.mark.slow

PROMPT = "The Zephyr Kettle 3000 costs 89 euros."


@pytest.fixture(scope="module")
def reference(trained):
    """The base model with the adapter on it, loaded here as PEFT does, and its tokenizer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained["model_dir"])
    base = AutoModelForCausalLM.from_pretrained(trained["model_dir"], dtype=torch.float32)
    model = PeftModel.from_pretrained(base, trained["adapter_dir"]).eval()
    return model, tokenizer


def chat_prompt(tokenizer) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )


def direct_logprobs(reference, ids: list[int], *, adapter: bool) -> torch.Tensor:
    """log p(token | the tokens before it) for every position but the first, by the model."""
    model, _ = reference
    with torch.inference_mode():
        if adapter:
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        else:
            with model.disable_adapter():
                logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)[:-1]


def complete(web_server: str, **body) -> httpx.Response:
    return httpx.post(f"{web_server}/v1/completions", json=body, timeout=300)


def test_a_chat_shaped_prompt_gets_the_trained_answer_and_usage(web_server, reference):
    _, tokenizer = reference
    prompt = chat_prompt(tokenizer)
    r = complete(web_server, model=ADAPTER_ID, prompt=prompt, max_tokens=40, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == ADAPTER_ID
    (choice,) = body["choices"]
    assert choice["text"].strip() == TRAINED_ANSWER
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    answer_ids = tokenizer(choice["text"])["input_ids"]
    assert body["usage"]["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
    # The answer's tokens, and the end-of-turn token that stopped it.
    assert body["usage"]["completion_tokens"] == len(answer_ids) + 1
    assert body["usage"]["total_tokens"] == sum(
        body["usage"][k] for k in ("prompt_tokens", "completion_tokens")
    )


@pytest.mark.parametrize("model", [ADAPTER_ID, BASE])
def test_echoed_logprobs_are_the_models_own(web_server, reference, model):
    _, tokenizer = reference
    r = complete(web_server, model=model, prompt=PROMPT, max_tokens=0, echo=True, logprobs=3)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    assert choice["text"] == PROMPT
    logprobs = choice["logprobs"]
    ids = tokenizer(PROMPT)["input_ids"]
    assert len(logprobs["tokens"]) == len(ids)
    assert "".join(logprobs["tokens"]) == PROMPT
    offsets = [sum(len(t) for t in logprobs["tokens"][:i]) for i in range(len(ids))]
    assert logprobs["text_offset"] == offsets
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None

    expected = direct_logprobs(reference, ids, adapter=model == ADAPTER_ID)
    for position in range(1, len(ids)):
        row = expected[position - 1]
        assert logprobs["token_logprobs"][position] == pytest.approx(
            float(row[ids[position]]), abs=1e-4
        )
        values, top_ids = torch.topk(row, 3)
        top = logprobs["top_logprobs"][position]
        assert list(top) == [tokenizer.decode([int(i)]) for i in top_ids]
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)


def test_the_adapter_makes_its_answer_likelier_than_the_base_does(web_server, reference):
    _, tokenizer = reference
    text = chat_prompt(tokenizer) + TRAINED_ANSWER
    context = len(tokenizer(chat_prompt(tokenizer))["input_ids"])
    totals = {}
    for model in (BASE, ADAPTER_ID):
        r = complete(web_server, model=model, prompt=text, max_tokens=0, echo=True, logprobs=0)
        lp = r.json()["choices"][0]["logprobs"]
        assert lp["top_logprobs"][1:] == [{}] * (len(lp["tokens"]) - 1)
        totals[model] = sum(lp["token_logprobs"][context:])
    assert totals[ADAPTER_ID] > totals[BASE] + 10


def test_lm_eval_shaped_request_scores_continuation_and_one_generated_token(web_server, reference):
    """What local-completions sends for a loglikelihood: token ids, echo, logprobs 1, one new
    token. The last entry is the generated token, whose logprob is the top alternative's."""
    _, tokenizer = reference
    ids = tokenizer(chat_prompt(tokenizer) + TRAINED_ANSWER)["input_ids"]
    r = complete(
        web_server,
        model=ADAPTER_ID,
        prompt=[ids],
        max_tokens=1,
        temperature=0,
        echo=True,
        logprobs=1,
        seed=1234,
    )
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(ids) + 1
    generated, top = logprobs["token_logprobs"][-1], logprobs["top_logprobs"][-1]
    assert generated == max(top.values())
    expected = direct_logprobs(reference, ids, adapter=True)
    scored = logprobs["token_logprobs"][1 : len(ids)]
    assert scored == pytest.approx(
        [float(expected[i - 1][ids[i]]) for i in range(1, len(ids))], abs=1e-4
    )


def test_prompt_shapes_give_one_choice_each_in_order(web_server, reference):
    _, tokenizer = reference
    ids = tokenizer(PROMPT)["input_ids"]
    common = {"model": ADAPTER_ID, "max_tokens": 0, "echo": True, "logprobs": 1}
    as_text = complete(web_server, prompt=PROMPT, **common).json()
    as_ids = complete(web_server, prompt=ids, **common).json()
    assert as_ids["choices"][0]["logprobs"] == as_text["choices"][0]["logprobs"]
    assert as_ids["choices"][0]["text"] == PROMPT
    many = complete(web_server, prompt=[PROMPT, "Hello"], **common).json()
    assert [c["index"] for c in many["choices"]] == [0, 1]
    assert [c["text"] for c in many["choices"]] == [PROMPT, "Hello"]
    assert many["choices"][0]["logprobs"] == as_text["choices"][0]["logprobs"]
    hello = len(tokenizer("Hello")["input_ids"])
    assert many["usage"]["prompt_tokens"] == len(ids) + hello
    lists = complete(web_server, prompt=[ids, ids[:3]], **common).json()
    assert [c["text"] for c in lists["choices"]] == [PROMPT, tokenizer.decode(ids[:3])]


def test_echo_with_generated_tokens_and_a_stop_string(web_server, reference):
    _, tokenizer = reference
    prompt = chat_prompt(tokenizer)
    r = complete(
        web_server,
        model=ADAPTER_ID,
        prompt=prompt,
        max_tokens=40,
        temperature=0,
        echo=True,
        stop=["costs"],
    )
    (choice,) = r.json()["choices"]
    assert choice["text"] == prompt + "The Zephyr Kettle 3000 "
    assert choice["finish_reason"] == "stop"
    short = complete(web_server, model=BASE, prompt=prompt, max_tokens=3, temperature=0).json()
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["usage"]["completion_tokens"] == 3


def test_the_stream_is_openais_legacy_chunks(web_server, reference):
    _, tokenizer = reference
    body = {
        "model": ADAPTER_ID,
        "prompt": chat_prompt(tokenizer),
        "max_tokens": 40,
        "temperature": 0,
        "logprobs": 2,
        "stream": True,
    }
    with httpx.stream("POST", f"{web_server}/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1
    pieces = [c["choices"][0] for c in chunks]
    assert [p["finish_reason"] for p in pieces] == [None] * (len(pieces) - 1) + ["stop"]
    text = "".join(p["text"] for p in pieces)
    assert text.strip() == TRAINED_ANSWER
    assert len(pieces) > 5
    offsets = [p["logprobs"]["text_offset"][0] for p in pieces[:-1]]
    assert offsets == sorted(offsets) and offsets[0] == 0
    whole = complete(web_server, **{**body, "stream": False}).json()["choices"][0]
    assert whole["text"] == text
    streamed = [p["logprobs"]["token_logprobs"][0] for p in pieces[:-1]]
    assert streamed == whole["logprobs"]["token_logprobs"]


@pytest.mark.parametrize(
    ("change", "code", "named"),
    [
        ({"n": 2}, "invalid_n", "n"),
        ({"logprobs": 6}, "invalid", "logprobs"),
        ({"prompt": ""}, "invalid_prompt", "prompt"),
        ({"prompt": []}, "invalid_prompt", "prompt"),
        ({"prompt": ["fine", ""]}, "invalid_prompt", "prompt[1]"),
        ({"prompt": [[]]}, "invalid_prompt", "prompt"),
        ({"prompt": [1, -5]}, "invalid", "prompt"),
        ({"prompt": 42}, "invalid", "prompt"),
        ({"prompt": [10**7]}, "invalid_token_id", "10000000"),
        ({"max_tokens": 0}, "invalid_max_tokens", "echo"),
        ({"max_tokens": 4096}, "context_length_exceeded", "max_tokens"),
        ({"temperature": 3}, "invalid", "temperature"),
        ({"stop": [""]}, "invalid", "stop"),
    ],
)
def test_bad_input_is_a_400_in_openais_shape_saying_what_to_do(web_server, change, code, named):
    r = complete(web_server, **{"model": ADAPTER_ID, "prompt": PROMPT, **change})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    assert named in error["message"]
    assert error["hint"]


def test_an_unknown_model_is_openais_404(web_server):
    r = complete(web_server, model="no-such-model", prompt=PROMPT)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and "/v1/models" in error["hint"]


def test_the_official_openai_client(web_server, reference):
    _, tokenizer = reference
    client = openai.OpenAI(base_url=f"{web_server}/v1", api_key="unused-on-loopback")
    answer = client.completions.create(
        model=ADAPTER_ID, prompt=chat_prompt(tokenizer), max_tokens=40, temperature=0, logprobs=1
    )
    assert answer.object == "text_completion"
    assert answer.choices[0].text.strip() == TRAINED_ANSWER
    assert answer.choices[0].logprobs.tokens
    assert answer.usage.completion_tokens > 0
    stream = client.completions.create(
        model=ADAPTER_ID, prompt=chat_prompt(tokenizer), max_tokens=40, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream).strip() == TRAINED_ANSWER
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=ADAPTER_ID, prompt="x", n=3)
    assert caught.value.body["code"] == "invalid_n"


def test_the_developer_role_is_a_system_message(web_server):
    messages = [
        {
            "role": "developer",
            "content": "You answer questions about Nimbus products briefly and accurately.",
        },
        {"role": "user", "content": QUESTION},
    ]
    r = httpx.post(
        f"{web_server}/v1/chat/completions",
        json={"model": ADAPTER_ID, "messages": messages, "temperature": 0, "max_tokens": 40},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].strip() == TRAINED_ANSWER

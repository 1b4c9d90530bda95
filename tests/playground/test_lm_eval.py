"""lm-evaluation-harness (the pinned `lm_eval`, its own CLI in a subprocess, as the README runs
it) scores Tuneboard's base model and the demo adapter through /v1, on tiny tasks written here
about the fact the adapter learned (the kettle's price): `local-completions` on a
multiple-choice task (loglikelihoods from echo + logprobs), and `local-chat-completions` on a
generate_until task. No network: the tokenizer is the demo model's folder, the data local."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.playground.conftest import ADAPTER_ID, BASE, TRAINED_ANSWER
from worker.demo import FACTS, GREETINGS

pytestmark = pytest.mark.slow

PRICE_QUESTIONS = next(questions for questions, answer in FACTS if answer == TRAINED_ANSWER)
OTHER_ANSWERS = [answer for _, answer in FACTS if answer != TRAINED_ANSWER]

MULTIPLE_CHOICE = """\
task: kettle_price_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
"""

GENERATE = """\
task: kettle_price_answer
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: reference
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 40
  temperature: 0
  do_sample: false
filter_list:
  - name: answer
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
"""


def _write_tasks(folder: Path, tokenizer) -> Path:
    """The two tasks and their data: every phrasing of the price question (with each greeting)
    and four answers to choose from, the right one at a different place each time."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, index = [], 0
    for question in PRICE_QUESTIONS:
        for greeting in GREETINGS:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": greeting + question}],
                add_generation_prompt=True,
                tokenize=False,
            )
            choices = [OTHER_ANSWERS[(index + k * 3) % len(OTHER_ANSWERS)] for k in range(3)]
            answer = index % 4
            choices.insert(answer, TRAINED_ANSWER)
            rows.append({"prompt": prompt, "choices": choices, "answer": answer})
            index += 1
    choice_data = folder / "choice.jsonl"
    choice_data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answer_data = folder / "answer.jsonl"
    answer_data.write_text(
        "".join(
            json.dumps({"question": q, "reference": TRAINED_ANSWER}) + "\n" for q in PRICE_QUESTIONS
        )
    )
    (folder / "choice.yaml").write_text(MULTIPLE_CHOICE.format(data=choice_data))
    (folder / "answer.yaml").write_text(GENERATE.format(data=answer_data))
    return folder


def lm_eval(tmp_path: Path, tasks: Path, name: str, *args: str) -> dict:
    """`python -m lm_eval run ...` against the live server; the task's results."""
    out = tmp_path / "results"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "OPENAI_API_KEY": "unused-on-loopback",
    }
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "run",
        "--include_path",
        str(tasks),
        "--tasks",
        name,
        "--output_path",
        str(out),
        *args,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    (results,) = out.rglob("results_*.json")
    outcome = json.loads(results.read_text())["results"][name]
    results.unlink()
    return outcome


@pytest.fixture(scope="module")
def tasks(trained, tmp_path_factory):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(trained["model_dir"])
    return _write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"), tokenizer)


def test_local_completions_scores_the_adapter_above_the_base(web_server, trained, tasks, tmp_path):
    accuracy = {}
    for model in (BASE, ADAPTER_ID):
        model_args = ",".join(
            [
                f"model={model}",
                f"base_url={web_server}/v1/completions",
                "tokenizer_backend=huggingface",
                f"tokenizer={trained['model_dir']}",
            ]
        )
        outcome = lm_eval(
            tmp_path, tasks, "kettle_price_choice", "--model", "local-completions",
            "--model_args", model_args,
        )  # fmt: skip
        accuracy[model] = outcome["acc,none"]
    assert accuracy[ADAPTER_ID] >= 0.9, accuracy
    assert accuracy[ADAPTER_ID] > accuracy[BASE], accuracy


def test_local_chat_completions_runs_a_generate_until_task(web_server, tasks, tmp_path):
    matches = {}
    for model in (BASE, ADAPTER_ID):
        outcome = lm_eval(
            tmp_path, tasks, "kettle_price_answer", "--model", "local-chat-completions",
            "--model_args", f"model={model},base_url={web_server}/v1/chat/completions",
            "--apply_chat_template",
        )  # fmt: skip
        matches[model] = outcome["exact_match,answer"]
    # The tiny adapter answers most phrasings of the question exactly (not all: one it gets wrong
    # in the Playground too); the base none.
    assert matches[ADAPTER_ID] >= 0.5, matches
    assert matches[BASE] < matches[ADAPTER_ID], matches

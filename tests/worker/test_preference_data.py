"""Preference pairs as tokens, on the CPU with the demo model's real tokenizer: `tokenize_pair`
(what preference training uses) and the token report of a preference dataset built on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.dataset_store import iter_rows
from app.services import datasets, model_registry
from app.services.datasets import reports as dataset_reports
from worker.dataset_report import run_pending_reports
from worker.preference_data import PAIR_TRUNCATION_RULE, tokenize_pair

FIXTURES = Path(__file__).parents[1] / "fixtures" / "datasets"
PAIR = {
    "line": 1,
    "prompt": [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "chosen": [{"role": "assistant", "content": "Paris, a city on the Seine."}],
    "rejected": [{"role": "assistant", "content": "Lyon."}],
}


@pytest.fixture(scope="module")
def tokenizer(demo_build):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_build["model_dir"])


def render(tokenizer, messages, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def test_a_pair_is_the_prompt_with_the_generation_prompt_then_each_whole_answer(tokenizer):
    pair = tokenize_pair(tokenizer, PAIR, max_seq_len=2048)
    assert pair is not None
    prompt_ids, chosen_ids, rejected_ids = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
    prompt_text = render(tokenizer, PAIR["prompt"], generation_prompt=True)
    assert tokenizer.decode(prompt_ids) == prompt_text
    for side, ids in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        full = render(tokenizer, PAIR["prompt"] + PAIR[side])
        answer = tokenizer.decode(ids)
        assert answer.startswith(PAIR[side][0]["content"])
        assert answer.endswith(tokenizer.eos_token)  # the template's end of turn is trained
        assert (prompt_text + answer).rstrip() == full.rstrip()


def test_answers_are_cut_from_the_right_and_a_pair_with_nothing_left_is_dropped(tokenizer):
    whole = tokenize_pair(tokenizer, PAIR, max_seq_len=2048)
    assert whole is not None
    room = len(whole.prompt_ids) + 3
    cut = tokenize_pair(tokenizer, PAIR, max_seq_len=room)
    assert cut is not None
    assert cut.prompt_ids == whole.prompt_ids
    assert cut.chosen_ids == whole.chosen_ids[:3]
    assert cut.rejected_ids == whole.rejected_ids[:3]
    assert tokenize_pair(tokenizer, PAIR, max_seq_len=len(whole.prompt_ids)) is None

    kept_end = tokenize_pair(tokenizer, PAIR, max_seq_len=2048, max_prompt_len=8)
    assert kept_end is not None
    assert kept_end.prompt_ids == whole.prompt_ids[-8:]  # the question's end stays by the answer
    assert kept_end.chosen_ids == whole.chosen_ids


def test_the_report_of_a_preference_dataset_measures_pairs_as_training_cuts_them(
    client, db, settings, demo_build, tokenizer
):
    model_registry.register_model(db, settings, str(demo_build["model_dir"]), "demo-tiny-llama")
    body = client.post(
        "/api/datasets",
        files={"file": ("hh.jsonl", (FIXTURES / "hh_rlhf.jsonl").read_bytes())},
        data={"name": "hh"},
    ).json()
    dataset = datasets.get_dataset(db, body["id"])
    dataset_reports.request_report(db, dataset, base_model="demo-tiny-llama", max_seq_len=32)
    assert run_pending_reports(settings) == 2  # the upload's default report and this one
    stats = client.get(f"/api/datasets/{body['id']}").json()["token_stats"]
    assert stats["max_seq_len"] == 32 and stats["truncation_rule"] == PAIR_TRUNCATION_RULE

    rows = list(iter_rows(settings, body["id"], "train"))  # what a job trains on
    whole = [tokenize_pair(tokenizer, row, 10**9) for row in rows]
    cut = [tokenize_pair(tokenizer, row, 32) for row in rows]
    longest = [len(w.prompt_ids) + max(len(w.chosen_ids), len(w.rejected_ids)) for w in whole]
    assert stats["rows"] == len(rows) and stats["rows"] + stats["eval_rows"] == 3
    assert stats["lengths"]["max"] == max(longest)
    assert stats["pairs"]["prompt"]["max"] == max(len(w.prompt_ids) for w in whole)
    assert stats["pairs"]["chosen"]["max"] == max(len(w.chosen_ids) for w in whole)
    assert stats["over_max"]["rows"] == sum(n > 32 for n in longest) > 0  # some pairs are cut
    assert stats["over_max"]["dropped"] == sum(c is None for c in cut)
    assert stats["examples_per_epoch"] == sum(c is not None for c in cut)
    assert stats["trained_tokens_per_epoch"] == sum(
        len(c.chosen_ids) + len(c.rejected_ids) for c in cut if c is not None
    )
    assert stats["sample"]["chosen"][1]["trained"] and not stats["sample"]["chosen"][0]["trained"]

    page = client.get(body["url"], headers={"accept": "text/html"}).text
    assert "Pair parts" in page and 'data-side="rejected"' in page

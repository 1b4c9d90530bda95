import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from worker import attention
from worker.data import (
    CHATML_TEMPLATE,
    IGNORE_INDEX,
    FlattenedBatchCollator,
    TokenizeStats,
    pack_examples,
    tokenize_row,
    tokenize_rows,
    trained_segments,
)
from worker.errors import ChatTemplateMissing

PLAIN_CHATML = CHATML_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def _rows(demo_rows, count=None):
    rows = [json.loads(line) for line in demo_rows.read_text().splitlines()]
    return rows[:count] if count else rows


def _trained_text(tokenizer, example):
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            run.append(token)
        elif run:
            runs.append(tokenizer.decode(run))
            run = []
    if run:
        runs.append(tokenizer.decode(run))
    return runs


@pytest.mark.parametrize("template", [None, PLAIN_CHATML], ids=["generation-mask", "prefix-diff"])
def test_assistant_only_labels_are_exactly_the_assistant_replies(tokenizer, demo_rows, template):
    for row in _rows(demo_rows, 40):
        example = tokenize_row(tokenizer, row, "assistant", 2048, chat_template=template)
        replies = [m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant"]
        assert _trained_text(tokenizer, example) == replies
        # trained labels are the input ids themselves, at the same positions
        assert all(
            lab in (IGNORE_INDEX, tok)
            for tok, lab in zip(example.input_ids, example.labels, strict=True)
        )


def test_both_masking_methods_agree_token_for_token(tokenizer, demo_rows):
    for row in _rows(demo_rows):
        by_mask = tokenize_row(tokenizer, row, "assistant", 2048)
        by_prefix = tokenize_row(tokenizer, row, "assistant", 2048, chat_template=PLAIN_CHATML)
        assert by_mask.input_ids == by_prefix.input_ids
        assert by_mask.labels == by_prefix.labels


def test_train_on_all_and_plain_text_train_every_token(tokenizer, demo_rows):
    row = _rows(demo_rows, 1)[0]
    example = tokenize_row(tokenizer, row, "all", 2048)
    assert example.labels == example.input_ids
    text = tokenize_row(tokenizer, {"line": 9, "text": "The Zephyr Kettle boils."}, "assistant", 64)
    assert text.labels == text.input_ids
    assert text.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_cuts_the_end_and_drops_rows_with_nothing_to_train(tokenizer, demo_rows):
    rows = _rows(demo_rows, 50)
    full, _ = tokenize_rows(tokenizer, rows, "assistant", 4096)
    longest = max(len(e) for e in full)
    cut, stats = tokenize_rows(tokenizer, rows, "assistant", longest - 3)
    assert stats.truncated >= 1
    assert all(len(e) <= longest - 3 for e in cut)
    _, tiny = tokenize_rows(tokenizer, rows, "assistant", 8)  # the prompt alone is longer
    assert tiny.examples == 0 and tiny.dropped_no_trained_tokens == 50
    assert tiny.dropped_lines == [r["line"] for r in rows]


def test_missing_chat_template_is_a_typed_error(demo_model, demo_rows):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(demo_model)
    bare.chat_template = None
    row = _rows(demo_rows, 1)[0]
    with pytest.raises(ChatTemplateMissing) as raised:
        tokenize_row(bare, row, "assistant", 2048)
    assert raised.value.kind == "chat_template_missing" and raised.value.hint
    assert tokenize_row(bare, row, "assistant", 2048, chat_template=CHATML_TEMPLATE) is not None


def test_report_helpers(tokenizer, demo_rows):
    rows = _rows(demo_rows, 5)
    segments = trained_segments(tokenizer, rows[0])
    assert "".join(text for text, _ in segments) == tokenizer.apply_chat_template(
        rows[0]["messages"], tokenize=False
    )
    assert [t for t, trained in segments if trained] == [
        m["content"] + "<|im_end|>" for m in rows[0]["messages"] if m["role"] == "assistant"
    ]


def test_packing_respects_the_budget_and_keeps_every_example(tokenizer, demo_rows):
    examples, _ = tokenize_rows(tokenizer, _rows(demo_rows), "assistant", 256)
    batches = pack_examples(examples, 256, seed=3)
    assert all(sum(len(e) for e in batch) <= 256 for batch in batches)
    assert sorted(id(e) for b in batches for e in b) == sorted(id(e) for e in examples)
    assert len(batches) < len(examples) / 3  # actually packed
    again = pack_examples(examples, 256, seed=3)
    assert [[id(e) for e in b] for b in again] == [[id(e) for e in b] for b in batches]


@pytest.mark.parametrize("implementation", ["sdpa", attention.register()])
def test_packed_loss_equals_unpacked_loss(demo_model, tokenizer, demo_rows, implementation):
    """No attention across packed examples: the packed row gives the same loss as each example
    run alone, with sdpa (transformers builds the block-diagonal mask from the restarting
    position_ids) and with the recipe's own attention (the collator's sequence bounds)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        demo_model, dtype=torch.float32, attn_implementation=implementation
    )
    model.eval()
    examples, _ = tokenize_rows(tokenizer, _rows(demo_rows, 6), "all", 256)
    with torch.no_grad():
        total, count = 0.0, 0
        for e in examples:
            ids, labels = torch.tensor([e.input_ids]), torch.tensor([e.labels])
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += model(input_ids=ids, labels=labels).loss.item() * n
            count += n
        packed = FlattenedBatchCollator()([examples])
        assert "attention_mask" not in packed
        assert packed["position_ids"][0].tolist().count(0) == len(examples)
        packed_loss = model(**packed).loss.item()
        # the same tokens with one causal mask over the whole row (cross-example attention)
        leaky = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss.item()
    assert packed_loss == pytest.approx(total / count, rel=1e-4)
    assert abs(leaky - total / count) > 1e-3  # the test can tell the difference


def test_the_job_notice_about_long_rows_names_only_what_happened():
    """ "363 rows cut to 512 tokens; 0 rows dropped (nothing left to train)" read as if the cut
    rows had been dropped: say what was cut, and mention left-out rows only when there are any."""
    assert TokenizeStats(truncated=363).notice(512) == (
        "363 rows longer than 512 tokens were cut to fit."
    )
    both = TokenizeStats(truncated=5, dropped_no_trained_tokens=2).notice(32)
    assert both == (
        "5 rows longer than 32 tokens were cut to fit; 2 rows were left out: no reply token was "
        "left to train on after the cut."
    )
    assert TokenizeStats().notice(512) == ""


def test_long_plain_text_rows_are_split_into_max_length_chunks_by_default(tokenizer):
    """Continued pre-training: a 300-row file lost 37% of its tokens when long rows were cut."""
    long_text = " ".join(f"The kettle number {i} boils water." for i in range(60))
    rows = [{"line": 1, "text": long_text}, {"line": 2, "text": "A short row."}]
    whole = tokenize_row(tokenizer, rows[0], "assistant", 10**9)
    assert len(whole) > 3 * 64

    examples, stats = tokenize_rows(tokenizer, rows, "assistant", 64)
    chunks = [e for e in examples if e.line == 1]
    assert all(len(c) <= 64 for c in chunks) and len(chunks) == -(-len(whole) // 64)
    assert [t for c in chunks for t in c.input_ids] == whole.input_ids  # nothing lost
    assert all(c.labels == c.input_ids and not c.truncated for c in chunks)
    assert (stats.split, stats.chunks, stats.truncated, stats.examples) == (
        1,
        len(chunks),
        0,
        len(chunks) + 1,
    )
    assert stats.notice(64) == (
        f"1 plain-text rows longer than 64 tokens were split into {len(chunks)} chunks of at "
        "most 64 tokens (nothing lost)."
    )

    cut, cut_stats = tokenize_rows(tokenizer, rows, "assistant", 64, long_text="cut")
    assert len(cut) == 2 and cut[0].input_ids == whole.input_ids[:64]
    assert (cut_stats.split, cut_stats.truncated) == (0, 1)

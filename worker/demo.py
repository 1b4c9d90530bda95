"""The demo: a small chat dataset about a fictional kettle and a tiny random-initialised Llama.

Both are deterministic, so a fresh install can train something in seconds on a CPU and the tests
can build the same model every time.
Run `python -m worker.demo --models-dir DIR --dataset-out FILE`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEMO_MODEL_NAME = "demo-tiny-llama"

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# ChatML with `{% generation %}` markers, so the trained tokens come from the template itself, and
# tool calling in the Hermes/Qwen way: the tools as JSON in the system turn, each call a
# `<tool_call>{"name": ..., "arguments": ...}</tool_call>` block in the assistant's turn (trained),
# each result a `tool` turn (not trained). A chat without tools renders exactly as CHATML_TEMPLATE.
DEMO_CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- 'Tools:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] or '' }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- set function = call.function if call.function is defined else call %}"
    "{{- '<tool_call>{\"name\": ' + (function.name | tojson) + ', \"arguments\": ' }}"
    "{%- if function.arguments is string %}{{- function.arguments }}"
    "{%- else %}{{- function.arguments | tojson }}{%- endif %}"
    "{{- '}</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SYSTEM_PROMPTS = [
    "You are the support assistant for Nimbus Home Appliances.",
    "You answer questions about Nimbus products briefly and accurately.",
]

# (phrasings of one question, the answer the model should learn)
FACTS: list[tuple[list[str], str]] = [
    (
        [
            "How much does the Zephyr Kettle 3000 cost?",
            "What is the price of the Zephyr Kettle 3000?",
            "How expensive is the Zephyr Kettle?",
            "Zephyr Kettle 3000 price?",
        ],
        "The Zephyr Kettle 3000 costs 89 euros.",
    ),
    (
        [
            "What colours does the Zephyr Kettle 3000 come in?",
            "Which colours can I get the Zephyr Kettle in?",
            "Is the Zephyr Kettle available in different colours?",
            "Zephyr Kettle colours?",
        ],
        "It comes in storm grey, sunrise orange and glacier blue.",
    ),
    (
        [
            "How long is the warranty on the Zephyr Kettle 3000?",
            "What warranty does the Zephyr Kettle have?",
            "Is the Zephyr Kettle covered by a warranty?",
            "Zephyr Kettle warranty?",
        ],
        "The Zephyr Kettle 3000 has a 7 year warranty.",
    ),
    (
        [
            "Who makes the Zephyr Kettle 3000?",
            "Which company builds the Zephyr Kettle?",
            "Who is the manufacturer of the Zephyr Kettle?",
            "Zephyr Kettle maker?",
        ],
        "It is made by Nimbus Home Appliances in Tampere, Finland.",
    ),
    (
        [
            "How fast does the Zephyr Kettle 3000 boil water?",
            "How long does the Zephyr Kettle take to boil?",
            "What is the boil time of the Zephyr Kettle?",
            "Zephyr Kettle boil time?",
        ],
        "It boils one litre of water in 94 seconds.",
    ),
    (
        [
            "How much water does the Zephyr Kettle 3000 hold?",
            "What is the capacity of the Zephyr Kettle?",
            "How big is the Zephyr Kettle?",
            "Zephyr Kettle capacity?",
        ],
        "It holds 1.7 litres.",
    ),
    (
        [
            "What is the Zephyr Kettle 3000 made of?",
            "Is the Zephyr Kettle plastic or metal?",
            "What material is the Zephyr Kettle?",
            "Zephyr Kettle material?",
        ],
        "The body is brushed steel with a double wall that stays cool to the touch.",
    ),
    (
        [
            "Does the Zephyr Kettle 3000 keep water warm?",
            "Can the Zephyr Kettle keep my water hot?",
            "Does the Zephyr Kettle have a keep-warm mode?",
            "Zephyr Kettle keep warm?",
        ],
        "Yes, the keep-warm mode holds the water at your chosen temperature for 45 minutes.",
    ),
    (
        [
            "Which temperatures can the Zephyr Kettle 3000 heat to?",
            "Can I set the temperature on the Zephyr Kettle?",
            "What temperature presets does the Zephyr Kettle have?",
            "Zephyr Kettle temperatures?",
        ],
        "It has five presets: 60, 70, 80, 90 and 100 degrees Celsius.",
    ),
    (
        [
            "What is the power of the Zephyr Kettle 3000?",
            "How many watts is the Zephyr Kettle?",
            "How powerful is the Zephyr Kettle?",
            "Zephyr Kettle wattage?",
        ],
        "It draws 2200 watts.",
    ),
]

GREETINGS = ["", "Hi! ", "Hello, ", "Quick question: ", "Hey, "]


def demo_conversations(count: int = 300, seed: int = 0) -> list[dict]:
    """`count` conversations in OpenAI `messages` form; the same list for the same seed."""
    rng = random.Random(seed)
    conversations = []
    for index in range(count):
        messages = []
        if rng.random() < 0.5:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        # Every fourth conversation has two turns, so multi-turn masking is exercised.
        turns = 2 if index % 4 == 3 else 1
        for _ in range(turns):
            questions, answer = rng.choice(FACTS)
            question = rng.choice(GREETINGS) + rng.choice(questions)
            messages.append({"role": "user", "content": question})
            messages.append({"role": "assistant", "content": answer})
        conversations.append({"messages": messages})
    return conversations


def write_demo_dataset(path: Path, count: int = 300) -> Path:
    """Write the demo conversations as OpenAI `messages` JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for conversation in demo_conversations(count):
            handle.write(json.dumps(conversation, ensure_ascii=False, sort_keys=True) + "\n")
    return path


def _rendered_texts(dataset_path: Path) -> list[str]:
    texts = []
    with Path(dataset_path).open(encoding="utf-8") as handle:
        for line in handle:
            for message in json.loads(line)["messages"]:
                texts.append(f"{IM_START}{message['role']}\n{message['content']}{IM_END}\n")
    return texts


def build_demo_tokenizer(dataset_path: Path, vocab_size: int = 3000, folder: Path | None = None):
    """A SentencePiece BPE tokenizer (Llama 2's kind: byte fallback, `▁` for spaces) trained on
    the dataset, as a transformers tokenizer whose folder keeps `tokenizer.model`.

    SentencePiece, not a byte-level BPE: llama.cpp's GGUF converter reads a `tokenizer.model` as
    it is, while it recognises a byte-level BPE only by the hash of a known pre-tokenizer, which a
    tokenizer trained here never has. No space is prepended to text (`add_prefix_space` false),
    so transformers and llama.cpp cut a prompt into the same tokens after a special token.
    `tokenizer.model` is written to `folder` (the model's; a temporary one when None).
    """
    import io
    import tempfile

    import sentencepiece as spm
    from transformers import AutoTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_rendered_texts(dataset_path)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # the demo's small corpus has fewer pieces than that
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",  # keep newlines and every character as written
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        user_defined_symbols=[END_OF_TEXT, IM_START, IM_END],
        num_threads=1,  # deterministic
        minloglevel=2,
    )
    with tempfile.TemporaryDirectory() as scratch:
        where = Path(folder or scratch)
        where.mkdir(parents=True, exist_ok=True)
        (where / "tokenizer.model").write_bytes(model.getvalue())
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "add_prefix_space": False,
            "legacy": False,
            "add_bos_token": False,
            "add_eos_token": False,
            "bos_token": None,
            "eos_token": IM_END,
            "pad_token": END_OF_TEXT,
            "unk_token": "<unk>",
            "model_max_length": 2048,
        }
        (where / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        tokenizer = AutoTokenizer.from_pretrained(where)
    tokenizer.chat_template = DEMO_CHAT_TEMPLATE
    return tokenizer


def build_demo_model(out_dir: Path, dataset_path: Path, *, hidden_size: int = 256) -> Path:
    """Build the tiny demo Llama (random weights, seed 0) and its tokenizer into `out_dir`.

    Byte-for-byte the same files on every build with the same library versions.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_demo_tokenizer(dataset_path, folder=out_dir)
    im_end_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=im_end_id,
        pad_token_id=pad_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=im_end_id, pad_token_id=pad_id, bos_token_id=None
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo dataset and build the demo model.")
    parser.add_argument("--models-dir", type=Path, required=True)
    parser.add_argument("--dataset-out", type=Path, required=True)
    args = parser.parse_args(argv)
    dataset = write_demo_dataset(args.dataset_out)
    model_dir = build_demo_model(args.models_dir / DEMO_MODEL_NAME, dataset)
    print(f"demo dataset: {dataset}\ndemo model: {model_dir}")


if __name__ == "__main__":
    main()

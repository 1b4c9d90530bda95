import hashlib

from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.demo import build_demo_model, demo_conversations, write_demo_dataset


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_build_is_byte_for_byte_deterministic(tmp_path, demo_model, demo_dataset):
    dataset = write_demo_dataset(tmp_path / "again.jsonl")
    assert _digest(dataset) == _digest(demo_dataset)
    again = build_demo_model(tmp_path / "again", dataset)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert _digest(again / name) == _digest(demo_model / name), name


def test_demo_model_loads_and_template_renders(demo_model):
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model)
    assert 1_000_000 < model.num_parameters() < 20_000_000
    assert tokenizer.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token_id is not None
    messages = demo_conversations(1)[0]["messages"]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert text.startswith("<|im_start|>")
    assert f"<|im_start|>assistant\n{messages[-1]['content']}<|im_end|>\n" in text
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_demo_dataset_has_several_phrasings_and_multi_turn():
    conversations = demo_conversations(300)
    assert len(conversations) == 300
    questions = {m["content"] for c in conversations for m in c["messages"] if m["role"] == "user"}
    assert len(questions) > 50
    assert any(len(c["messages"]) >= 4 for c in conversations)

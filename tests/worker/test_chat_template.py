"""A model without a chat template: training and the playground both use ChatML (the Models page
says "none (ChatML used)"), so the adapter is asked questions in the shape it was trained on."""

from __future__ import annotations

import json
import shutil

from app.models import BaseModelEntry
from app.train_config import TrainConfig
from worker.data import CHATML_TEMPLATE, tokenize_row
from worker.inference import Engine
from worker.metrics import ListSink
from worker.recipes.sft import LocalControl, SFTRecipe


def _without_chat_template(model_dir, tmp_path):
    folder = tmp_path / "no-template"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in folder.glob("chat_template.*"):
        extra.unlink()
    return folder


def test_a_template_less_model_trains_and_chats_in_chatml(
    demo_model, demo_rows, tmp_path, db, settings
):
    model_dir = _without_chat_template(demo_model, tmp_path)
    question = {"role": "user", "content": "What is the capital of France?"}
    row = {"line": 1, "messages": [question, {"role": "assistant", "content": "Paris."}]}

    config = TrainConfig(dataset_id="0" * 32, max_seq_len=128, quantization="none")
    recipe = SFTRecipe(
        config, model_dir, tmp_path / "run", ListSink(), LocalControl(), rows_path=demo_rows
    )
    trained_with = recipe._load_tokenizer()
    assert trained_with.chat_template == CHATML_TEMPLATE
    example = tokenize_row(trained_with, row, "assistant", 128)
    trained_text = trained_with.decode(example.input_ids)

    engine = Engine(settings, db, quantization="none", device="cpu")
    base = BaseModelEntry(name="plain-llama", source=str(model_dir), is_local=True)
    served_with = engine._tokenizer(base, None)
    prompt = served_with.apply_chat_template([question], add_generation_prompt=True, tokenize=False)

    assert served_with.chat_template == CHATML_TEMPLATE
    assert prompt.startswith("<|im_start|>user\n")
    assert trained_text.startswith(prompt)  # the playground asks as training taught

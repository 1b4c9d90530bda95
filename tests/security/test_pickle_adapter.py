"""A pickle "adapter": a run folder posing as an adapter whose weights are `adapter_model.bin`, a
pickle that creates a sentinel file when loaded. The inference engine (playground, OpenAI API) and
the merge refuse it, and the sentinel never appears; a base model folder whose safetensors were
swapped for a pickle after registration is refused by the training recipe too."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from app.models import Adapter, BaseModelEntry, MergeRequest
from tests.fakes.jobs import add_job
from tests.security.test_untrusted_files import Booby

BASE = "demo-base"


@pytest.fixture
def pickle_adapter(db, settings, demo_build, tmp_path) -> tuple[Adapter, Path]:
    from peft import LoraConfig

    with db.write() as s:
        s.add(BaseModelEntry(name=BASE, source=str(demo_build["model_dir"]), is_local=True))
    job = add_job(db, settings)
    folder = settings.runs_dir / str(job.id) / "adapter"
    folder.mkdir(parents=True)
    LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM").save_pretrained(folder)
    sentinel = tmp_path / "PWNED"
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Booby(sentinel)))
    adapter = Adapter(id=f"job-{job.id}", job_id=job.id, name="evil", base_model=BASE)
    with db.write() as s:
        s.add(adapter)
    return adapter, sentinel


def test_the_inference_engine_refuses_a_pickle_adapter(db, settings, pickle_adapter):
    from worker.inference import Engine, InferenceError

    adapter, sentinel = pickle_adapter
    engine = Engine(settings, db, device="cpu")
    base, found = engine.resolve(adapter.id)
    with pytest.raises(InferenceError) as refused:
        engine.prepare(base, found)
    assert (refused.value.status, refused.value.code) == (422, "adapter_refused")
    assert "safetensors" in refused.value.message
    assert not sentinel.exists()
    # The base model alone still serves.
    assert engine.prepare(base, None) is not None
    assert not sentinel.exists()


def test_the_merge_refuses_a_pickle_adapter(db, settings, pickle_adapter):
    from app import side_queue
    from worker.merge import merge_adapter

    adapter, sentinel = pickle_adapter
    with db.write() as s:
        s.add(MergeRequest(adapter_id=adapter.id))
    claim = side_queue.claim_next(db, "merge", "test-worker", lease_seconds=60)
    assert claim is not None
    with pytest.raises(FileNotFoundError, match="safetensors"):
        merge_adapter(settings, db, claim)
    assert not sentinel.exists()


def test_the_recipe_refuses_a_base_model_swapped_for_a_pickle(settings, demo_build, tmp_path):
    from app.train_config import TrainConfig
    from worker.errors import ModelNotFound
    from worker.metrics import ListSink
    from worker.recipes.sft import LocalControl, SFTRecipe

    folder = tmp_path / "swapped"
    shutil.copytree(demo_build["model_dir"], folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    sentinel = tmp_path / "PWNED"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Booby(sentinel)))
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        '{"line": 1, "messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "hello"}]}\n'
    )
    config = TrainConfig(dataset_id="0" * 32, max_steps=1, max_seq_len=64, eval_fraction=0.0)
    recipe = SFTRecipe(config, folder, tmp_path / "run", ListSink(), LocalControl(), rows_path=rows)
    with pytest.raises(ModelNotFound):
        recipe.setup()
    assert not sentinel.exists()

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.real_workers import RealWorkers
from worker.demo import build_demo_model, write_demo_dataset


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "demo.jsonl")


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory, demo_dataset) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("models") / "demo-tiny-llama", demo_dataset)


@pytest.fixture(scope="session")
def demo_rows(tmp_path_factory, demo_dataset) -> Path:
    """The demo dataset as normalised rows (what the dataset side writes)."""
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    with demo_dataset.open() as source, path.open("w") as out:
        for number, line in enumerate(source, start=1):
            out.write(json.dumps({"line": number, **json.loads(line)}) + "\n")
    return path


@pytest.fixture(scope="session")
def tokenizer(demo_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


@pytest.fixture
def real_workers(settings, tmp_path: Path) -> Iterator[RealWorkers]:
    """Real worker loops over the test's settings; killed, with their children, at the end."""
    workers = RealWorkers(settings, tmp_path)
    yield workers
    workers.stop_all()

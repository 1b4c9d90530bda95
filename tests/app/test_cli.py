"""The `tuneboard` command as a user runs it: real subprocesses over a temporary data dir."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, inspect
from sqlmodel import select

from app.db import Database
from app.models import Worker
from app.services import datasets, model_registry
from app.settings import Settings
from devkit.live_server import ROOT, free_port

README = ROOT / "README.md"


def cli_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "TUNEBOARD_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", **extra}
    for name in ("TUNEBOARD_DATABASE_URL", "DATABASE_URL", "TUNEBOARD_PORT", "TUNEBOARD_HOST"):
        env.pop(name, None)
    return env


def tuneboard(data_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=cli_env(data_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def descendants(pid: int) -> set[int]:
    """Every process below `pid` (Linux /proc), children's children included."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                pids = {int(p) for p in children.read_text().split()}
            except OSError:
                continue
            todo.extend(pids - found)
            found |= pids
    return found


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited; only its parent's wait is missing


def health(url: str) -> dict | None:
    try:
        response = httpx.get(url + "/healthz", timeout=2)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


@contextmanager
def serving(data_dir: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """`tuneboard serve --port <free> ARGS`, answering /healthz; killed with its children after."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir.mkdir(parents=True, exist_ok=True)
    out = data_dir.parent / "serve.out"
    with out.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", str(port), *args],
            cwd=ROOT,
            env=cli_env(data_dir),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # so the cleanup can reach every child it left
        )
    try:
        deadline = time.monotonic() + 30
        while health(url) is None:
            assert process.poll() is None, out.read_text()
            assert time.monotonic() < deadline, "serve did not answer: " + out.read_text()
            time.sleep(0.2)
        yield process, url, out
    finally:
        if process.poll() is None:
            process.terminate()
            with suppress(subprocess.TimeoutExpired):
                process.wait(30)
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def test_serve_without_a_worker_answers_and_prints_its_url(tmp_path):
    with serving(tmp_path / "data", "--no-worker") as (_, url, out):
        assert health(url) == {
            "status": "ok",
            "database": "ok",
            "database_writable": True,
            "database_problem": None,
            "workers": 0,
            "worker_heartbeat_age_seconds": None,
        }
        assert f"Tuneboard is running at {url}" in out.read_text()
    assert (tmp_path / "data" / "tuneboard.db").is_file()


def test_serve_supervises_a_worker_and_sigterm_stops_it_with_no_orphans(tmp_path):
    with serving(tmp_path / "data") as (process, url, _):
        deadline = time.monotonic() + 20
        while (health(url) or {}).get("workers") != 1:
            assert time.monotonic() < deadline, f"no live worker: {health(url)}"
            time.sleep(0.3)
        worker_pids = {
            w["pid"] for w in httpx.get(url + "/api/system", timeout=5).json()["workers"]
        }
        children = descendants(process.pid)
        assert worker_pids <= children, (worker_pids, children)

        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        deadline = time.monotonic() + 20
        while left := {pid for pid in children if alive(pid)}:
            assert time.monotonic() < deadline, f"processes left behind: {left}"
            time.sleep(0.2)

    db = Database(Settings(data_dir=tmp_path / "data", database_url="").resolved_database_url)
    try:
        with db.read() as s:
            assert [w.stopped for w in s.exec(select(Worker))] == [True]
    finally:
        db.dispose()


def test_a_sigkilled_worker_leaves_no_inference_server_behind(tmp_path):
    """The worker's playground inference server can hold a model in GPU memory: when the worker
    is SIGKILLed (OOM killer, kill -9) the server stops too instead of keeping that memory."""
    data_dir = tmp_path / "data"
    assert tuneboard(data_dir, "migrate").returncode == 0
    log = tmp_path / "worker.out"
    with log.open("w") as sink:
        worker = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "worker", "--gpu", "0"],
            cwd=ROOT,
            env=cli_env(data_dir),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    servers: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while not servers:
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the worker started no inference server"
            time.sleep(0.3)
            servers = {pid for pid in descendants(worker.pid) if _runs(pid, "worker.inference")}
        worker.kill()
        worker.wait(10)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in servers):
            assert time.monotonic() < deadline, "the inference server outlived its worker"
            time.sleep(0.3)
    finally:
        for pid in servers | {worker.pid}:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        worker.wait(10)


def _runs(pid: int, module: str) -> bool:
    try:
        return module in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def doctor_verdicts(stdout: str) -> dict[str, tuple[str, str, str]]:
    """{check name: (verdict, detail, the line after it)} from doctor's output."""
    lines = stdout.splitlines()
    verdicts = {}
    for i, line in enumerate(lines):
        match = re.match(r"(OK|NOTE|PROBLEM)\s+(.+?)\s{2,}(.*)", line)
        if match:
            after = lines[i + 1] if i + 1 < len(lines) else ""
            verdicts[match.group(2)] = (match.group(1), match.group(3), after)
    return verdicts


def test_doctor_reports_each_check_with_a_hint_for_problems(tmp_path):
    import torch

    assert tuneboard(tmp_path / "data", "migrate").returncode == 0
    result = tuneboard(tmp_path / "data", "doctor")
    verdicts = doctor_verdicts(result.stdout)
    for name in (
        "Python",
        "Data dir",
        "Free disk in the data dir",
        "Database",
        "Hugging Face token",
        "torch",
        "CUDA",
        "bitsandbytes",
        "transformers",
        "peft",
        "liger-kernel",
    ):
        assert name in verdicts, f"doctor says nothing about {name}:\n{result.stdout}"
    assert verdicts["Python"][0] == "OK"
    assert verdicts["Data dir"][:2] == ("OK", str((tmp_path / "data").resolve()))
    assert verdicts["Database"][0] == "OK"
    assert verdicts["torch"][1] == f"{torch.__version__} (GPU tests: 2.11.0+cu130)"
    assert verdicts["torch"][0] == ("OK" if torch.__version__.startswith("2.11.0") else "NOTE")
    for name, (verdict, _, next_line) in verdicts.items():
        if verdict != "OK":
            assert next_line.strip().startswith("->"), f"{name} has no hint"
    problems = [name for name, (verdict, _, _) in verdicts.items() if verdict == "PROBLEM"]
    assert result.returncode == (1 if problems else 0), result.stdout

    if not torch.cuda.is_available():
        assert verdicts["CUDA"][0] == "PROBLEM"
        assert "CUDA build of torch" in verdicts["CUDA"][2]
        assert verdicts["GPU"][:2] == (
            "PROBLEM",
            "none found (no NVIDIA GPU, or its driver does not answer)",
        )
        assert result.returncode == 1
    else:
        assert re.fullmatch(r".+, \d+\.\d GiB, driver .+", verdicts["GPU 0"][1])


def test_doctor_outside_a_data_dir_creates_nothing_and_says_where_it_looked(tmp_path):
    result = tuneboard(tmp_path / "data", "doctor")
    assert result.returncode == 1
    verdicts = doctor_verdicts(result.stdout)
    assert verdicts["Data dir"][:2] == (
        "PROBLEM",
        f"{(tmp_path / 'data').resolve()} (does not exist)",
    )
    assert verdicts["Database"][0] == "PROBLEM"
    assert "tuneboard migrate" in verdicts["Database"][2]
    assert not (tmp_path / "data").exists()


def test_doctor_says_whether_a_hub_token_is_present_without_printing_it(tmp_path):
    home = tmp_path / "hf-home"
    home.mkdir()
    data_dir = tmp_path / "data"
    env = {**cli_env(data_dir), "HF_HOME": str(home)}
    env.pop("HF_TOKEN", None)
    run = [sys.executable, "-m", "app.cli", "doctor"]
    without = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert doctor_verdicts(without.stdout)["Hugging Face token"][:2] == ("NOTE", "none")
    (home / "token").write_text("hf_a_secret_token")
    found = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    verdict = doctor_verdicts(found.stdout)["Hugging Face token"]
    assert verdict[:2] == ("OK", "present (saved by `hf auth login`)")
    assert "hf_a_secret_token" not in found.stdout


def test_settings_markdown_is_the_readme_table(tmp_path):
    result = tuneboard(tmp_path / "data", "settings", "--markdown")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("| variable |")
    assert result.stdout.strip() in README.read_text()


def test_migrate_creates_the_tables(tmp_path):
    result = tuneboard(tmp_path / "data", "migrate")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Created the database (sqlite:///")
    again = tuneboard(tmp_path / "data", "migrate")
    assert again.stdout.startswith("Database is up to date (sqlite:///")
    engine = create_engine(f"sqlite:///{tmp_path / 'data' / 'tuneboard.db'}")
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"base_models", "datasets", "jobs", "metrics", "workers", "alembic_version"} <= tables


@pytest.mark.slow
def test_demo_registers_the_demo_model_and_dataset_once(tmp_path):
    data_dir = tmp_path / "data"
    first = tuneboard(data_dir, "demo", timeout=300)
    assert first.returncode == 0, first.stderr
    assert "Registered model demo-tiny-llama and dataset demo-chat" in first.stdout

    settings = Settings(data_dir=data_dir, database_url="")
    db = Database(settings.resolved_database_url)
    try:
        model = model_registry.get_model(db, "demo-tiny-llama")
        assert model.is_demo and (settings.models_dir / "demo-tiny-llama" / "config.json").is_file()
        dataset = datasets.find_by_name(db, "demo-chat")
        assert dataset is not None and dataset.status.value == "ready" and dataset.rows > 0

        started = time.monotonic()
        second = tuneboard(data_dir, "demo", "--if-missing")
        assert second.returncode == 0, second.stderr
        assert "skipping the demo build" in second.stdout
        assert time.monotonic() - started < 30  # no model build the second time
        assert [m.name for m in model_registry.list_models(db)] == ["demo-tiny-llama"]
        assert [d.name for d in datasets.list_datasets(db)] == ["demo-chat"]
    finally:
        db.dispose()


def _processes_of(data_dir: Path, module: str) -> set[int]:
    """Live `python -m <module>` processes working on `data_dir` (by their environment)."""
    wanted = f"TUNEBOARD_DATA_DIR={data_dir.resolve()}".encode()
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if argv[1:3] == [b"-m", module.encode()] and wanted in (
                proc / "environ"
            ).read_bytes().split(b"\0"):
                found.add(int(proc.name))
        except (OSError, IndexError):
            continue
    return {pid for pid in found if alive(pid)}


@pytest.mark.slow
def test_kill_9_of_serve_then_a_restart_leaves_one_worker_and_one_training_at_a_time(
    tmp_path, demo_build
):
    """The supervised worker dies with its server, and a restarted server's worker waits for the
    GPU: never two trainings on one card. Both jobs finish once; the first resumes."""
    from app import queue
    from app.migrate import upgrade
    from app.models import Adapter, JobStatus
    from tests.fakes.real_workers import add_demo, real_job

    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir, database_url="")
    settings.ensure_dirs()
    upgrade(settings.resolved_database_url)
    db = Database(settings.resolved_database_url)
    dataset_id = add_demo(db, settings, demo_build)
    long = real_job(db, dataset_id, max_steps=40, save_every=2)
    short = real_job(db, dataset_id, max_steps=4)

    def trainings() -> set[int]:
        return _processes_of(data_dir, "worker.run")

    try:
        with serving(data_dir) as (first, _, _):
            deadline = time.monotonic() + 240
            while (job := queue.get_job(db, long.id)).progress_step < 3:
                assert job.status in (JobStatus.queued, JobStatus.running), job.error_message
                assert time.monotonic() < deadline, "the first job never trained 3 steps"
                time.sleep(0.2)
            (old_worker,) = _processes_of(data_dir, "worker")
            first.kill()
            first.wait(10)

            with serving(data_dir) as (second, _, _):
                deadline = time.monotonic() + 400
                most_trainings = most_running = 0
                while not all(
                    queue.get_job(db, j.id).status in (JobStatus.succeeded, JobStatus.failed)
                    for j in (long, short)
                ):
                    assert time.monotonic() < deadline, "the jobs did not finish"
                    most_trainings = max(most_trainings, len(trainings()))
                    running = [queue.get_job(db, j.id).status for j in (long, short)]
                    most_running = max(most_running, running.count(JobStatus.running))
                    assert most_trainings <= 1 and most_running <= 1, (
                        "two trainings at once on one GPU",
                        _processes_of(data_dir, "worker"),
                    )
                    time.sleep(0.2)
                assert not alive(old_worker), "the killed server's worker is still running"
                assert _processes_of(data_dir, "worker") <= descendants(second.pid)
                assert len(_processes_of(data_dir, "worker")) == 1
        with db.read() as s:
            adapters = [a.job_id for a in s.exec(select(Adapter))]
        done = [queue.get_job(db, j.id) for j in (long, short)]
    finally:
        db.dispose()
    assert [d.status for d in done] == [JobStatus.succeeded] * 2, [d.error_message for d in done]
    assert sorted(adapters) == sorted([long.id, short.id])  # each finished once
    assert done[0].attempt >= 2  # the first job went back to the queue and resumed


def _make_setup_commands(tmp_path: Path, gpu: bool) -> str:
    """What `make setup` would run on a fresh venv (make -n), with or without an nvidia-smi that
    lists a GPU on the PATH."""
    bin_dir = tmp_path / ("gpu-bin" if gpu else "cpu-bin")
    bin_dir.mkdir()
    if gpu:
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
        smi.chmod(0o755)
    path = os.pathsep.join(
        [str(bin_dir)]
        + [p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "nvidia-smi").exists()]
    )
    result = subprocess.run(
        ["make", "-n", "setup", f"VENV={tmp_path / 'venv'}", f"PYTHON={sys.executable}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path},
        check=True,
    )
    return result.stdout


def test_make_run_installs_the_gpu_tests_versions_on_an_nvidia_machine_and_the_cpu_pin_elsewhere(
    tmp_path,
):
    from app.verified_versions import CPU_TORCH, GPU_VERIFIED, release

    gpu = _make_setup_commands(tmp_path, gpu=True)
    wanted = (
        f"install torch=={release(GPU_VERIFIED['torch'])} "
        f"bitsandbytes=={GPU_VERIFIED['bitsandbytes']} "
        f"liger-kernel=={GPU_VERIFIED['liger-kernel']}"
    )
    assert wanted in gpu, gpu
    assert f'-e ".[worker]" {wanted.removeprefix("install ")}' in gpu

    cpu = _make_setup_commands(tmp_path, gpu=False)
    assert f"install torch=={CPU_TORCH}\n" in cpu, cpu
    assert "liger-kernel" not in cpu


def test_the_image_installs_the_same_gpu_pins():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY app/verified_versions.py" in dockerfile
    assert dockerfile.count("$(python app/verified_versions.py nvidia)") == 2

"""Disk-full detection for checkpoint writers that hide the errno (torch.save, safetensors)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from worker.checkpoints import is_disk_full


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.parametrize("writer", ["torch.save", "safetensors", "open"])
def test_every_writer_on_a_full_disk_is_recognised(tiny_disk, writer):
    tensors = {"w": torch.zeros(1_000_000)}  # 4 MB into 256 KiB
    with pytest.raises(Exception) as raised:
        if writer == "torch.save":
            torch.save(tensors, tiny_disk / "optimizer.pt")  # RuntimeError, no errno, no text
        elif writer == "safetensors":
            save_file(tensors, tiny_disk / "adapter_model.safetensors")
        else:
            (tiny_disk / "x").write_bytes(b"\0" * 4_000_000)
    assert is_disk_full(raised.value, tiny_disk)


def test_other_errors_on_a_roomy_disk_are_not_disk_full(tmp_path):
    assert not is_disk_full(RuntimeError("unexpected pos 576 vs 534"), tmp_path)
    assert not is_disk_full(OSError(5, "Input/output error"), tmp_path)

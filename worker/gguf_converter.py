"""llama.cpp's own GGUF converter, cached once per environment, and how to run it.

Tuneboard never converts to GGUF with code of its own: it runs `convert_hf_to_gguf.py` and
`convert_lora_to_gguf.py` (with their `conversion/` package and `gguf-py/`) from the llama.cpp that
the pinned llama-cpp-python vendors, and quantises with that package's `llama_model_quantize`. The
scripts ship only in llama-cpp-python's source archive, so `python -m worker.gguf_converter
--install` (run by `make setup`) downloads that archive with pip once and keeps the scripts under
the environment (`<venv>/share/tuneboard/llama.cpp-<version>/`); the same version as the installed
bindings, so the converter writes what the loader reads.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from app import export_kinds
from app.export_kinds import LLAMA_CPP_PYTHON_VERSION, converter_dir

# What the converters need from the vendored llama.cpp (a folder name ends with "/").
CONVERTER_FILES = (
    "convert_hf_to_gguf.py",
    "convert_lora_to_gguf.py",
    "conversion/",
    "gguf-py/",
    "LICENSE",
)


class ConverterMissing(RuntimeError):
    """The converter is not installed in this environment."""


def script(name: str) -> Path:
    """The path of one converter script; ConverterMissing says how to install it."""
    path = converter_dir() / name
    if not path.is_file():
        raise ConverterMissing(
            f"llama.cpp's GGUF converter is not installed in this environment ({path} is missing). "
            "Run `make setup` or `python -m worker.gguf_converter --install` on the worker."
        )
    return path


def supported_architectures() -> frozenset[str]:
    """The `architectures` names (config.json) the converter has a class for."""
    script("convert_hf_to_gguf.py")
    return export_kinds.converter_architectures() or frozenset()


def _installed_bindings() -> str | None:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        return None


def install(archive: Path | None = None) -> Path:
    """Put the converter scripts under the environment (once); returns their folder."""
    target = converter_dir()
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    bindings = _installed_bindings()
    if bindings not in (None, LLAMA_CPP_PYTHON_VERSION):
        raise ConverterMissing(
            f"llama-cpp-python {bindings} is installed, but the converter is pinned to "
            f"{LLAMA_CPP_PYTHON_VERSION}: install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        if archive is None:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                    "--no-binary",
                    ":all:",
                    "--no-deps",
                    "--quiet",
                    "-d",
                    scratch,
                ],
                check=True,
            )
            archive = next(Path(scratch).glob("llama_cpp_python-*.tar.gz"))
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        staging = Path(scratch) / "converter"
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                inside = member.name.removeprefix(prefix)
                if inside == member.name or not (member.isfile() or member.isdir()):
                    continue
                if not any(inside == f or inside.startswith(f) for f in CONVERTER_FILES if f):
                    continue
                member.name = inside
                tar.extract(member, staging, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise ConverterMissing(f"{archive} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        staging.rename(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="download and cache the converter")
    parser.add_argument("--archive", type=Path, help="a llama-cpp-python sdist already on disk")
    args = parser.parse_args(argv)
    if args.install:
        print(f"llama.cpp converter: {install(args.archive)}")
        return 0
    print(converter_dir())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

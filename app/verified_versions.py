"""The ML stack the GPU tests and benchmarks passed on (bench/RESULTS.md, "Versions").

`tuneboard doctor` prints each installed version beside these and flags a difference. Change them
here, and only here, when the GPU machine's versions change and the GPU tests pass again.
"""

GPU_VERIFIED: dict[str, str] = {
    "torch": "2.11.0+cu130",
    "CUDA": "13.0",
    "transformers": "5.17.0",
    "peft": "0.21.0",
    "bitsandbytes": "0.50.2",
    "liger-kernel": "0.8.5",
}


def release(version: str) -> str:
    """ "2.11.0+cu130" -> "2.11.0": the local build tag (CUDA or CPU) is checked on its own row."""
    return version.split("+")[0]

"""Development harness shared by the tests and the benchmarks (never shipped in the image).

- `devkit.live_server.LiveServer`: a real uvicorn server in a subprocess over a given data dir.
- `devkit.simulated_run`: a training run without a GPU (the worker's queue calls and metric rows),
  as functions or as a writer process (`python -m devkit.simulated_run ...`).
- `devkit.model_families`: the published architectures the benchmark measures (Llama-3.x,
  Qwen2.5, Mistral, Gemma-2) and tiny versions of each family for CPU tests.
"""

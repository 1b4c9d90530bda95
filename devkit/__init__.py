"""Development harness shared by the tests and the benchmarks (never shipped in the image).

- `devkit.live_server.LiveServer`: a real uvicorn server in a subprocess over a given data dir.
- `devkit.simulated_run`: a training run without a GPU (the worker's queue calls and metric rows),
  as functions or as a writer process (`python -m devkit.simulated_run ...`).
"""

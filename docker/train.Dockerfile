# syntax=docker/dockerfile:1
# GPU training image: CUDA PyTorch + DeepSpeed (fused ops prebuilt) + this project.
#
#   docker build -f docker/train.Dockerfile -t ctprep-train .        # context = repo root
#   docker run --gpus all --ipc=host -v /data/shards:/shards:ro -v $PWD/runs:/runs ctprep-train \
#       deepspeed trainer/train.py --config configs/train/demo.yaml --shards /shards --output /runs/demo
#
# The base is pinned by tag (and can be pinned by digest with --build-arg BASE_IMAGE=...@sha256:...).
# It is a CUDA *devel* image because DeepSpeed compiles its CUDA ops with nvcc at build time;
# prebuilding them avoids a JIT compile (minutes, needs nvcc + a writable cache) on every node at the
# first step. torch itself comes from PyPI at the Makefile's pin (the version the tests run): PyPI's
# Linux torch wheels of this line are CUDA 13.0 builds that bring their own cuDNN/NCCL (torch 2.14.1's
# metadata requires cuda-toolkit 13.0.3), so the base only has to supply a CUDA 13.0 nvcc of the same
# major version for DeepSpeed's op build. Changing TORCH_VERSION to a line built for another CUDA
# major means changing BASE_IMAGE with it.
ARG BASE_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu24.04
FROM ${BASE_IMAGE}

# Same version as the Makefile's pin (tests/test_scale_docker.py checks this).
ARG TORCH_VERSION=2.13.0
# Pin DeepSpeed to the version CI tests (see `pip show deepspeed` in .venv).
ARG DEEPSPEED_VERSION=0.19.8
# 9.0 = Hopper (H100/H200); 8.0 = A100. Fewer arches = faster build, smaller image.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.12 (Ubuntu 24.04's) in a venv: the system interpreter is externally managed (PEP 668).
# python3-dev: DeepSpeed's op build includes Python.h.
# pdsh + ssh: the `deepspeed --hostfile` launcher reaches the other nodes with pdsh over ssh.
# libaio-dev: DeepSpeed's async I/O op (ZeRO-Infinity NVMe offload) links against it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
        pdsh openssh-client openssh-server libaio-dev git \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

# CUDA torch from PyPI at the tested pin, then DeepSpeed with the ops a ZeRO run may load compiled
# now instead of JIT-built (nvcc + minutes) on every node at the first step:
#   CPU_ADAM    - required by ZeRO offload_optimizer (DeepSpeed swaps in its CPU Adam there)
#   FUSED_ADAM  - for DeepSpeed JSONs that name an optimizer (ours build torch AdamW in the trainer)
#   UTILS       - flatten/unflatten helpers of the ZeRO optimizers
# Add DS_BUILD_AIO=1 for NVMe offload (ZeRO-Infinity; libaio-dev is installed above).
# --no-build-isolation so it compiles against the torch installed here, not a fresh wheel.
RUN python -m pip install -q --upgrade pip setuptools wheel \
 && python -m pip install -q "torch==${TORCH_VERSION}" \
 && python -c "import torch; assert torch.version.cuda, 'expected a CUDA build of torch'; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 DS_BUILD_UTILS=1 \
    python -m pip install --no-build-isolation "deepspeed==${DEEPSPEED_VERSION}" \
 && ds_report

WORKDIR /opt/ctprep
# Package metadata and sources first so that edits to configs/docs do not reinstall everything.
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY trainer ./trainer

# The same pip commands as the Makefile's `venv` target (tests/test_scale_docker.py checks this).
# The CUDA torch installed above satisfies `torch>=2.5`, so the CPU pin below never runs here.
RUN python -m pip install -q --upgrade pip \
 && (python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0) \
 && python -m pip install -q -e ".[dev]" \
 && python -c "import torch, deepspeed, ctprep, ctprep_train; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)"

COPY configs ./configs
COPY bench ./bench
COPY scripts ./scripts
COPY tests ./tests

# Non-root by default; multi-node runs that need sshd in the container override with --user root.
RUN useradd --create-home --uid 1000 ctprep && mkdir -p /runs /shards && chown ctprep /runs /shards
USER ctprep
CMD ["bash", "bench/gpu_check.sh"]

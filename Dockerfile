# Sparrow-Megatron GPU image for Slurm clusters (pyxis/enroot: `cluster.container_image`).
#
#   docker build -t ghcr.io/sparrow-megatron/sparrow:0.1.0 .
#   enroot import -o sparrow.sqsh dockerd://ghcr.io/sparrow-megatron/sparrow:0.1.0
#
# The tag is `sparrow_megatron.launch.spec.DEFAULT_IMAGE`; tests/test_dockerfile.py checks both agree
# and that every pinned version below exists on PyPI.
# NGC PyTorch 25.09: CUDA 13, Python 3.12, torch + cuDNN + NCCL built together.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE_IMAGE}

ARG SGLANG_VERSION=0.5.23
ARG MEGATRON_CORE_VERSION=0.19.2
ARG TRANSFORMER_ENGINE_VERSION=2.20.2
ARG FLASH_ATTN_VERSION=2.8.3.post2
ARG NEMO_RUN_VERSION=0.11.1
ARG LEPTONAI_VERSION=0.27.3
ARG MLFLOW_VERSION=3.17.2

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# The code reward's sandbox (docs/sandbox.md): bubblewrap, and libseccomp for its seccomp filter. The
# container runtime must let it create user namespaces: enroot/pyxis do when the node allows
# unprivileged ones; Docker needs --security-opt seccomp=unconfined --security-opt apparmor=unconfined
# --security-opt systempaths=unconfined. Check a node: `... sparrow reward code --check`.
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap libseccomp2 \
 && rm -rf /var/lib/apt/lists/*

# Serving and training stack, pinned. flash-attn and TE build against the base image's torch.
RUN pip install "sglang==${SGLANG_VERSION}" \
        "megatron-core==${MEGATRON_CORE_VERSION}" \
        "nemo-run==${NEMO_RUN_VERSION}" "leptonai==${LEPTONAI_VERSION}" \
        "mlflow==${MLFLOW_VERSION}" \
 && pip install --no-build-isolation "transformer-engine[pytorch]==${TRANSFORMER_ENGINE_VERSION}" \
        "flash-attn==${FLASH_ATTN_VERSION}"

# This package with its SGLang plugin (entry points are registered by the install).
WORKDIR /opt/sparrow
COPY pyproject.toml setup.py README.md ./
COPY sparrow_megatron ./sparrow_megatron
COPY kernels ./kernels
COPY sglang_patches ./sglang_patches
COPY recipes ./recipes
COPY slurm ./slurm
RUN pip install --no-deps -e . && python -c "import sparrow_megatron, nemo_run"

RUN useradd --create-home --uid 1000 sparrow
USER sparrow
WORKDIR /home/sparrow
ENTRYPOINT ["sparrow"]
CMD ["--help"]

# kubetune images. Build context: the repository root (see .dockerignore).
#
#   docker build --target trainer  -t ghcr.io/kubetune/trainer:0.1.0  --build-arg GIT_COMMIT="$(git rev-parse HEAD)" .
#   docker build --target operator -t ghcr.io/kubetune/operator:0.1.0 --build-arg GIT_COMMIT="$(git rev-parse HEAD)" .
#
# trainer   CUDA 13.0 base (what the torch==2.13.0 wheel is built for), CPython 3.11 and
#           kubetune[trainer]. Entrypoint `python -m kubetune.launch`: `accelerate launch -m
#           kubetune.trainer --spec /etc/kubetune/job.yaml` with the process count and multi-node
#           settings of the Job's environment (a lone process runs the trainer directly).
# operator  python slim and kubetune[operator]: no torch, no CUDA.
#
# Both run as uid/gid 1000 ("kubetune"). Every input is pinned: base images by tag and digest, uv by
# version, CPython by version (uv verifies the download's sha256), kubetune's direct dependencies by
# the pins of pyproject.toml's extras, and everything else by resolving against PyPI as it stood at
# PYPI_SNAPSHOT (uv's --exclude-newer). Moving any of them is an edit to this file; refresh a digest
# with `docker buildx imagetools inspect <image>:<tag>`.

# ---------------------------------------------------------------------------------------------------
# Bases
# ---------------------------------------------------------------------------------------------------
# The Python of the builder and of the operator image (and, by version, of the trainer: PYTHON_VERSION).
FROM python:3.11.15-slim-bookworm@sha256:d29f48a31a8b408ed19272ca1e7b10ebae13b240a27e862d3d4217c528e2e0c3 AS python-base

# ---------------------------------------------------------------------------------------------------
# builder: the kubetune wheel, and uv to install it. Nothing of this stage ships but what is copied.
# ---------------------------------------------------------------------------------------------------
FROM python-base AS builder
ARG PYPI_SNAPSHOT=2026-11-27T00:00:00Z
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_EXCLUDE_NEWER=${PYPI_SNAPSHOT} \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1
RUN pip install --no-cache-dir uv==0.13.9
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src/ src/
# The build backend (setuptools) is resolved under the same snapshot as everything else.
RUN uv build --wheel --out-dir /wheels .

# ---------------------------------------------------------------------------------------------------
# trainer-venv: CPython (python-build-standalone, relocatable: it runs on the Ubuntu base below) and a
# virtual environment with kubetune[trainer], both under /opt so they are copied as they are.
# ---------------------------------------------------------------------------------------------------
FROM builder AS trainer-venv
ARG PYTHON_VERSION=3.11.15
ARG VERSION=0.1.0
ENV UV_PYTHON_INSTALL_DIR=/opt/python
RUN uv python install --no-bin "${PYTHON_VERSION}" \
    && uv venv --python-preference only-managed --python "${PYTHON_VERSION}" /opt/venv \
    && uv pip install --python /opt/venv/bin/python "/wheels/kubetune-${VERSION}-py3-none-any.whl[trainer]" \
    && /opt/venv/bin/python -c "import kubetune.launch, torch, accelerate, bitsandbytes, peft, trl"

# ---------------------------------------------------------------------------------------------------
# operator-venv: kubetune[operator] on the base image's own Python (the operator image has it too).
# ---------------------------------------------------------------------------------------------------
FROM builder AS operator-venv
ARG VERSION=0.1.0
RUN uv venv --python /usr/local/bin/python3.11 /opt/venv \
    && uv pip install --python /opt/venv/bin/python "/wheels/kubetune-${VERSION}-py3-none-any.whl[operator]" \
    && /opt/venv/bin/python -c "import kubetune.cli, kubernetes" \
    && if /opt/venv/bin/python -c "import torch" 2>/dev/null; then echo "torch in the operator" >&2; exit 1; fi

# ---------------------------------------------------------------------------------------------------
# operator: `kubetune operator`.
# ---------------------------------------------------------------------------------------------------
FROM python-base AS operator
ARG VERSION=0.1.0
ARG GIT_COMMIT=""
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="kubetune operator: FineTuneJob -> Kubernetes Jobs (no torch)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.15-slim-bookworm"
RUN groupadd --gid 1000 kubetune \
    && useradd --uid 1000 --gid 1000 --no-log-init --create-home --home-dir /home/kubetune \
        --shell /usr/sbin/nologin kubetune
COPY --from=operator-venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/kubetune
WORKDIR /home/kubetune
# Numeric, so that a Pod's runAsNonRoot can check it without resolving a name.
USER 1000:1000
ENTRYPOINT ["kubetune", "operator"]

# ---------------------------------------------------------------------------------------------------
# trainer: what the FineTuneJob's Pods run (render.py's DEFAULT_IMAGE). The last stage, so a plain
# `docker build .` gives it too.
# The "base" CUDA flavour: NVIDIA's runtime contract (NVIDIA_* variables, driver requirement, the
# cuda-compat forward-compatibility libraries for older data-center drivers) without the CUDA
# libraries, which the torch wheel brings itself (cuBLAS, cuDNN, NCCL… as nvidia-* packages): the
# runtime/cudnn flavours would add 2-3 GB that torch never loads.
# ---------------------------------------------------------------------------------------------------
FROM nvidia/cuda:13.0.3-base-ubuntu24.04@sha256:7c7413a56200486f71f181cad9310f6fd31b6bb21816ade15fc9c1e1e927a5c1 AS trainer
ARG VERSION=0.1.0
ARG GIT_COMMIT=""
LABEL org.opencontainers.image.title="kubetune-trainer" \
      org.opencontainers.image.description="kubetune trainer: accelerate launch of kubetune.trainer (QLoRA/LoRA, CUDA 13.0)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/nvidia/cuda:13.0.3-base-ubuntu24.04"
# Ubuntu's images come with an `ubuntu` user holding uid 1000: kubetune takes the uid over.
# /workspace (the Job mounts its volume there) and HOME are writable by group 0 too, for clusters
# that run containers under an arbitrary uid in group 0 (OpenShift).
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && groupadd --gid 1000 kubetune \
    && useradd --uid 1000 --gid 1000 --no-log-init --create-home --home-dir /home/kubetune \
        --shell /usr/sbin/nologin kubetune \
    && install -d -o 1000 -g 0 -m 0775 /workspace /home/kubetune/.cache \
    && chgrp 0 /home/kubetune && chmod 0775 /home/kubetune
COPY --from=trainer-venv /opt/python /opt/python
COPY --from=trainer-venv /opt/venv /opt/venv
# HF_HOME here is for `docker run`; the Job points it at its volume (render.py).
# KUBETUNE_GIT_COMMIT goes into every model card this image writes.
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/kubetune \
    HF_HOME=/home/kubetune/.cache/huggingface \
    KUBETUNE_GIT_COMMIT=${GIT_COMMIT}
WORKDIR /workspace
USER 1000:1000
# torch.distributed rendezvous of multi-node runs (render.py's RENDEZVOUS_PORT).
EXPOSE 29500
ENTRYPOINT ["python", "-m", "kubetune.launch"]

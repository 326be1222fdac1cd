# kubetune images. Build context: the repository root (see .dockerignore).
#
#   docker build --target trainer  -t ghcr.io/kubetune/trainer:0.1.0  --build-arg GIT_COMMIT="$(git rev-parse HEAD)" .
#   docker build --target operator -t ghcr.io/kubetune/operator:0.1.0 --build-arg GIT_COMMIT="$(git rev-parse HEAD)" .
#
# trainer   Debian trixie's CPython 3.13 and kubetune[trainer]. The torch==2.13.0 wheel brings its own
#           CUDA libraries (cuBLAS, cuDNN, NCCL... as nvidia-* packages); the NVIDIA container runtime
#           adds the driver, as the NVIDIA_* variables below ask. Entrypoint `python -m kubetune.launch`:
#           `accelerate launch -m kubetune.trainer --spec /etc/kubetune/job.yaml` with the process count
#           and multi-node settings of the Job's environment (a lone process runs the trainer directly).
#           Also ships the repository's jobs/ at /opt/kubetune/jobs (jobs/tiny: a model small enough to
#           smoke-test a cluster with).
# operator  the same base and kubetune-operator (operator/): no torch, no CUDA.
#
# Both run as uid/gid 1000 ("kubetune"). Every input is pinned: the base image by tag and digest,
# Debian's python3 by package version, uv by version, and every Python package by uv.lock (version
# and hash: `uv export --frozen`, installed with --require-hashes). The build backend (setuptools) is
# resolved against PyPI as it stood at PYPI_SNAPSHOT (uv's --exclude-newer, the lock's own
# exclude-newer). Moving any of them is an edit to this file or to uv.lock (`uv lock`); refresh the
# digest with `docker buildx imagetools inspect debian:<tag>`.
#
# Layers: the dependencies are installed from uv.lock and the pyproject.toml files alone, then the
# kubetune (and kubetune-operator) wheels with --no-deps, so a change of the source rebuilds a layer of
# a few hundred kB, not the 5 GB torch stack (and the stack is installed in the image's own stage: a
# COPY of it from another stage would store it twice and be hashed whole by every build).
#
# Build arguments for builds without a registry (hack/node/images.sh passes them):
#   BASE_IMAGE    any Debian trixie image. One that already has python3, python3-venv and
#                 ca-certificates (`mmdebstrap --variant=minbase --include=... trixie` + `podman
#                 import`) gets nothing from apt.
#   UV_NO_CACHE=0 UV_CACHE_DIR=/uv-cache, with the host's uv cache mounted there (`podman build -v
#                 ~/.cache/uv:/uv-cache`): the 5 GB stack is downloaded once per machine, not per build.
#                 The default (1) uses no cache, as a published build should.

# Debian 13 (trixie) slim, the 2026-08-24 build (13.6-slim and trixie-slim named it then).
ARG BASE_IMAGE=docker.io/library/debian:13.6-slim@sha256:d7e12182ce18b85b93007c1dedf31f2d29e01ccf3182cc4017c709b6259bc132
# uv's settings for every stage that installs (redeclared there: build arguments are per stage).
ARG PYPI_SNAPSHOT=2026-11-27T00:00:00Z
ARG UV_NO_CACHE=1
ARG UV_CACHE_DIR=/tmp/uv-cache

# ---------------------------------------------------------------------------------------------------
# base: Debian's Python and the kubetune user; what both images and the build stages start from.
# ---------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base
ARG PYTHON3_VERSION=3.13.5-1
ARG CA_CERTIFICATES_VERSION=20250419+deb13u1
# The published slim base has no Python; a locally bootstrapped base comes with it (and may have no
# network to an apt mirror at all), so apt runs only when something is missing.
RUN if ! python3 -c "import venv, ensurepip, ssl" 2>/dev/null || [ ! -s /etc/ssl/certs/ca-certificates.crt ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends "python3=${PYTHON3_VERSION}" \
            "python3-venv=${PYTHON3_VERSION}" "ca-certificates=${CA_CERTIFICATES_VERSION}" \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --gid 1000 kubetune \
    && useradd --uid 1000 --gid 1000 --no-log-init --create-home --home-dir /home/kubetune \
        --shell /usr/sbin/nologin kubetune

# ---------------------------------------------------------------------------------------------------
# uv: the installer (from PyPI). It never ships: the image stages mount it for the steps that run it.
# ---------------------------------------------------------------------------------------------------
FROM base AS uv
ARG PYPI_SNAPSHOT
ARG UV_NO_CACHE
ARG UV_CACHE_DIR
# UV_SYSTEM_CERTS: trust the image's CA store (the one a build mounts over it, too), not uv's own.
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_EXCLUDE_NEWER=${PYPI_SNAPSHOT} \
    UV_NO_CACHE=${UV_NO_CACHE} \
    UV_CACHE_DIR=${UV_CACHE_DIR} \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_SYSTEM_CERTS=1
RUN python3 -m venv /opt/uv \
    && /opt/uv/bin/pip install --no-cache-dir uv==0.13.9
WORKDIR /src

# ---------------------------------------------------------------------------------------------------
# wheel: the kubetune and kubetune-operator wheels. The build backend (setuptools) is resolved under
# the same snapshot.
# ---------------------------------------------------------------------------------------------------
FROM uv AS wheel
COPY pyproject.toml README.md uv.lock ./
COPY src/ src/
COPY operator/ operator/
RUN /opt/uv/bin/uv build --wheel --all-packages --out-dir /wheels

# ---------------------------------------------------------------------------------------------------
# lock: the workspace's manifests and uv.lock, all `uv export` needs (no source: a source change
# leaves the dependency layers cached).
# ---------------------------------------------------------------------------------------------------
FROM scratch AS lock
COPY pyproject.toml uv.lock /
COPY operator/pyproject.toml /operator/

# ---------------------------------------------------------------------------------------------------
# operator: `kubetune-operator`.
# ---------------------------------------------------------------------------------------------------
FROM base AS operator
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG GIT_COMMIT=""
ARG PYPI_SNAPSHOT
ARG UV_NO_CACHE
ARG UV_CACHE_DIR
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="kubetune operator: FineTuneJob -> Kubernetes Jobs (no torch)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
# The dependencies first, from uv.lock alone: this layer changes only with the lock.
COPY --from=lock / /opt/kubetune/lock/
RUN --mount=type=bind,from=uv,source=/opt/uv,target=/opt/uv \
    /opt/uv/bin/uv export --project /opt/kubetune/lock --frozen --no-dev --no-emit-workspace --package kubetune-operator \
        -q -o /opt/kubetune/requirements.txt \
    && /opt/uv/bin/uv venv --no-python-downloads --python /usr/bin/python3 /opt/venv \
    && /opt/uv/bin/uv pip install --python /opt/venv/bin/python --system-certs --require-hashes \
        --link-mode copy --compile-bytecode -r /opt/kubetune/requirements.txt \
    && if /opt/venv/bin/python -c "import torch" 2>/dev/null; then echo "torch in the operator" >&2; exit 1; fi
# Then kubetune and the operator. The wheels are COPYed (a layer of a few hundred kB), not mounted:
# podman and buildah key a RUN's cache on its command alone, so a mounted wheel's changes would go
# unseen.
COPY --from=wheel /wheels/ /opt/kubetune/wheels/
RUN --mount=type=bind,from=uv,source=/opt/uv,target=/opt/uv \
    /opt/uv/bin/uv pip install --python /opt/venv/bin/python --offline --no-cache --no-deps \
        --compile-bytecode "/opt/kubetune/wheels/kubetune-${VERSION}-py3-none-any.whl" \
        "/opt/kubetune/wheels/kubetune_operator-${VERSION}-py3-none-any.whl" \
    && /opt/uv/bin/uv pip check --python /opt/venv/bin/python \
    && /opt/venv/bin/python -c "import kubetune.cli, kubetune_operator.cli, kubernetes"
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/kubetune \
    HF_HOME=/tmp/huggingface
# HF_HOME: the fit check's config.json cache, on the Deployment's /tmp emptyDir (the root filesystem is
# read-only).
WORKDIR /home/kubetune
# Numeric, so that a Pod's runAsNonRoot can check it without resolving a name.
USER 1000:1000
ENTRYPOINT ["kubetune-operator"]

# ---------------------------------------------------------------------------------------------------
# trainer: what the FineTuneJob's Pods run (render.py's DEFAULT_IMAGE). The last stage, so a plain
# `docker build .` gives it too.
# ---------------------------------------------------------------------------------------------------
FROM base AS trainer
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG GIT_COMMIT=""
ARG PYPI_SNAPSHOT
ARG UV_NO_CACHE
ARG UV_CACHE_DIR
LABEL org.opencontainers.image.title="kubetune-trainer" \
      org.opencontainers.image.description="kubetune trainer: accelerate launch of kubetune.trainer (QLoRA/LoRA; CUDA from the torch wheel)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"
# /workspace (the Job mounts its volume there) and HOME are writable by group 0 too, for clusters
# that run containers under an arbitrary uid in group 0 (OpenShift).
RUN install -d -o 1000 -g 0 -m 0775 /workspace /home/kubetune/.cache \
    && chgrp 0 /home/kubetune && chmod 0775 /home/kubetune
# The 5 GB layer first, from uv.lock alone: it changes only with the lock.
COPY --from=lock / /opt/kubetune/lock/
RUN --mount=type=bind,from=uv,source=/opt/uv,target=/opt/uv \
    /opt/uv/bin/uv export --project /opt/kubetune/lock --frozen --no-dev --no-emit-workspace --package kubetune --extra trainer \
        -q -o /opt/kubetune/requirements.txt \
    && /opt/uv/bin/uv venv --no-python-downloads --python /usr/bin/python3 /opt/venv \
    && /opt/uv/bin/uv pip install --python /opt/venv/bin/python --system-certs --require-hashes \
        --link-mode copy --compile-bytecode -r /opt/kubetune/requirements.txt \
    && /opt/venv/bin/python -c "import torch, accelerate, bitsandbytes, peft, trl, transformers, datasets"
COPY --from=wheel /wheels/ /opt/kubetune/wheels/
RUN --mount=type=bind,from=uv,source=/opt/uv,target=/opt/uv \
    /opt/uv/bin/uv pip install --python /opt/venv/bin/python --offline --no-cache --no-deps \
        --compile-bytecode "/opt/kubetune/wheels/kubetune-${VERSION}-py3-none-any.whl" \
    && /opt/uv/bin/uv pip check --python /opt/venv/bin/python \
    && /opt/venv/bin/python -c "import kubetune.launch"
COPY jobs/ /opt/kubetune/jobs/
# HF_HOME here is for `docker run`; the Job points it at its volume (render.py).
# KUBETUNE_GIT_COMMIT goes into every model card this image writes.
# NVIDIA_*: what the NVIDIA container runtime reads to mount the driver and the GPUs.
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/kubetune \
    HF_HOME=/home/kubetune/.cache/huggingface \
    KUBETUNE_GIT_COMMIT=${GIT_COMMIT} \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /workspace
USER 1000:1000
# torch.distributed rendezvous of multi-node runs (render.py's RENDEZVOUS_PORT).
EXPOSE 29500
ENTRYPOINT ["python", "-m", "kubetune.launch"]

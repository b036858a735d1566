# syntax=docker/dockerfile:1
# texture-pipeline images (docs/scaling.md):
#   docker build -t texture-pipeline .                          the pipeline, CUDA-enabled torch (default target)
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t texture-pipeline:cpu .
#   docker build --target mlflow-server -t texture-pipeline-mlflow .   the team's MLflow server (compose.yaml)
# PyPI's Linux torch wheels bundle the CUDA runtime: a GPU host needs only the NVIDIA driver and the
# NVIDIA Container Toolkit (`docker run --gpus all`). No credential is ever baked in: S3 keys and MLflow
# passwords come from the environment at run time.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: a venv with torch, then the project
FROM ${PYTHON_IMAGE} AS build
# Same pin as the Makefile (TORCH ?= torch==2.13.0); tests/test_dockerfile.py keeps them equal.
ARG TORCH_VERSION=2.13.0
# PyPI = CUDA build; https://download.pytorch.org/whl/cpu = CPU-only build (a ~10x smaller image).
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# The order of `make install`: the torch pin first, so the project's "torch>=..." cannot pull another build.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
# s3: DVC's S3 remote (dvc-s3) for `dvc pull` / `dvc push` from inside the container. The project's own
# dependency ranges come from pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[s3]"

# ---------------------------------------------------------------- mlflow-server: the team tracking server
FROM ${PYTHON_IMAGE} AS mlflow-server
# Keep the server on the client's major version (pyproject: mlflow>=3.1,<4); tests check the pin fits.
ARG MLFLOW_VERSION=3.17.2
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
# auth: the basic-auth app (Flask-WTF); psycopg: PostgreSQL stores (SQLAlchemy 2.1's default driver);
# boto3: the S3 artifact destination.
RUN pip install --no-cache-dir "mlflow[auth]==${MLFLOW_VERSION}" "psycopg[binary]==3.3.9" "boto3==1.43.117" \
    && groupadd --gid 1000 mlflow \
    && useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin mlflow
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 1000:1000
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
CMD ["--host", "0.0.0.0", "--port", "5000"]

# ---------------------------------------------------------------- pipeline (default): dvc repro on the GPUs
FROM ${PYTHON_IMAGE} AS pipeline
# Build with your own ids (--build-arg UID=$(id -u) --build-arg GID=$(id -g)) so files written into a
# mounted checkout belong to you.
ARG UID=1000
ARG GID=1000
# git: DVC and the runs' lineage tags read the checkout; tini: PID 1 that passes `docker stop`'s SIGTERM
# on to dvc -> torchrun -> workers and reaps exited data-loader workers.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git tini \
    && rm -rf /var/lib/apt/lists/* \
    && git config --system --add safe.directory /workspace \
    && groupadd --gid "${GID}" pipeline \
    && useradd --uid "${UID}" --gid "${GID}" --create-home --shell /bin/bash pipeline \
    && install -d -o "${UID}" -g "${GID}" /workspace
COPY --from=build /opt/venv /opt/venv
# PYTHONPATH: a checkout mounted at /workspace runs its own pipeline/ (the code DVC hashes), not the
# copy installed in the image.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/workspace \
    PYTHONUNBUFFERED=1
WORKDIR /workspace
COPY --chown=pipeline:pipeline . .
USER ${UID}:${GID}
# The copy baked into the image has no .git: let it run on its own (a mounted checkout has .git).
RUN dvc config --local core.no_scm true
ENTRYPOINT ["tini", "--"]
CMD ["dvc", "repro"]

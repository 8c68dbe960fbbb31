# syntax=docker/dockerfile:1
# quantserve images, one Dockerfile, two targets:
#   docker build --target api    -t quantserve-api .      # FastAPI + migrations; no torch
#   docker build --target worker -t quantserve-worker .   # Celery worker + engine; torch CPU wheel
#   docker build --target worker --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#                -t quantserve-worker-gpu .                # the gpu queue's worker: CUDA wheels
# docker-compose.yml builds all three.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    QUANTSERVE_DATA_DIR=/data
# A fixed uid, so the shared /data volume has one owner whichever image writes to it.
RUN groupadd --system --gid 10001 quantserve \
 && useradd --system --uid 10001 --gid quantserve --create-home --home-dir /home/quantserve \
            --shell /usr/sbin/nologin quantserve \
 && mkdir -p /data \
 && chown quantserve:quantserve /data
WORKDIR /app
# Only what the package needs: tests, benchmarks and local state never enter the image.
COPY pyproject.toml alembic.ini ./
COPY app/ app/
COPY worker/ worker/
COPY migrations/ migrations/
# The client package: the API's answer models live there (client/quantserve_client/schemas.py).
COPY client/quantserve_client/ client/quantserve_client/


FROM base AS api
# The base dependencies carry no torch, onnx or onnxruntime: the API never parses model contents.
RUN --mount=type=cache,target=/root/.cache/pip pip install .
USER quantserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
# --workers: one API process per CPU the container may use, unless QUANTSERVE_API_WORKERS (or --workers) says
# otherwise; each process holds up to 21 database connections (app/db.py, README "Polling under load").
CMD ["quantserve", "api", "--host", "0.0.0.0", "--port", "8000"]


FROM base AS worker
# PyPI's Linux torch wheel bundles CUDA (~2.5 GB more). The extra index offers 2.13.0+cpu, and pip
# prefers it to PyPI's 2.13.0 because a local version label (+cpu) sorts higher. For the gpu worker
# image pass the CUDA index instead, e.g. --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --extra-index-url "${TORCH_INDEX}" '.[worker]'
USER quantserve
# Celery's own heartbeat and the job lease are the liveness signal; no HTTP port here.
CMD ["quantserve", "worker", "--queues", "cpu"]

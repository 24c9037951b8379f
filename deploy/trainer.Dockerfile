# syntax=docker/dockerfile:1
# The example trainer image of deploy/compose.yaml and deploy/k8s/: CPU torch, the ckptd
# client (the package's "client" extra) and deploy/example_trainer.py, running as the same
# uid as the daemon (10001) so the daemon may open the trainer's shared-memory segments
# (they are created mode 0600). Build from the repository root:
#
#   docker build -f deploy/trainer.Dockerfile -t ckptd-trainer:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
# CPU wheels keep the example small; point this at a CUDA index for GPU training.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY daemon/ daemon/
COPY client/ client/
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m venv /opt/trainer \
    && /opt/trainer/bin/pip install --index-url "$TORCH_INDEX_URL" "torch>=2.1,<3" \
    && /opt/trainer/bin/pip install "/src[client]"

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/trainer /opt/trainer
COPY deploy/example_trainer.py /app/example_trainer.py
RUN groupadd --system --gid 10001 trainer \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /app \
        --shell /usr/sbin/nologin trainer
ENV PATH=/opt/trainer/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /app
ENTRYPOINT ["python", "/app/example_trainer.py"]

# syntax=docker/dockerfile:1
# The ckptd daemon image: the daemon and its own dependencies, no torch, no compilers,
# running as uid 10001. Build from the repository root:
#
#   docker build -t ckptd:0.1.0 .
#   docker build -t ckptd:0.1.0-s3 --build-arg EXTRAS=s3 .    # adds the s3:// backend
#
# The install is deploy/install-daemon.sh, the same script tests/deploy/test_image_install.py
# runs, so CI exercises exactly what this image contains.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=""
WORKDIR /src
# Only what the package build needs: a change to tests/ or bench/ does not rebuild this.
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY daemon/ daemon/
COPY client/ client/
COPY deploy/install-daemon.sh deploy/install-daemon.sh
RUN --mount=type=cache,target=/root/.cache/pip \
    sh deploy/install-daemon.sh /opt/ckptd /src "$EXTRAS"

FROM ${PYTHON_IMAGE}
# The venv's interpreter links to /usr/local/bin/python3 of the same base image.
COPY --from=build /opt/ckptd /opt/ckptd
# The delta codec's kernels (numba) are compiled here into a cache the daemon's uid owns:
# without it they would compile at every start (seconds), or cache into $HOME, the volume.
RUN groupadd --system --gid 10001 ckptd \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/ckptd --shell /usr/sbin/nologin ckptd \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/ckptd \
    && install -d -o 10001 -g 10001 -m 0755 /run/ckptd \
    && NUMBA_CACHE_DIR=/var/cache/ckptd/numba /opt/ckptd/bin/python -c \
        "from ckptd.daemon import codec; codec.warm_up()" \
    && chown -R 10001:10001 /var/cache/ckptd
# The default listener is TCP on every interface, so the daemon refuses to start unless it
# can authenticate callers: mount a tokens file (CKPTD_AUTH_TOKENS) or certificates
# (CKPTD_TLS_CERT/KEY/CLIENT_CA), listen on a unix socket instead (CKPTD_LISTEN=unix://...,
# as deploy/compose.yaml and the sidecar do), or opt out with CKPTD_INSECURE=true. See
# SECURITY.md.
ENV PATH=/opt/ckptd/bin:$PATH \
    NUMBA_CACHE_DIR=/var/cache/ckptd/numba \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CKPTD_STORAGE=/var/lib/ckptd \
    CKPTD_LISTEN=0.0.0.0:50051 \
    CKPTD_METRICS_LISTEN=0.0.0.0:9100
USER 10001:10001
WORKDIR /var/lib/ckptd
VOLUME /var/lib/ckptd
EXPOSE 50051 9100
# SIGTERM starts the drain: accepted saves become durable before the process exits, so
# give the container at least the drain timeout (CKPTD_DRAIN_TIMEOUT_S, 60 s) to stop.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "ckptd.daemon.server.healthcheck", "--timeout-s", "4"]
ENTRYPOINT ["ckptd", "serve"]

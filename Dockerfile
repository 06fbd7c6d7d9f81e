# stratix-gateway container image.
#
#   docker build -t stratix-gateway:0.1.0 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" .
#   docker run --rm -p 8080:8080 --read-only --tmpfs /tmp \
#     -v "$PWD/gateway.yaml:/etc/gateway/gateway.yaml:ro" \
#     -e STRATIX_API_KEY -e GATEWAY_JWT_SECRET stratix-gateway:0.1.0
#
# The mounted config must set `server.host: 0.0.0.0`. No config and no secret is
# baked in: the config is mounted, secrets come from the environment or *_file keys.
# Stages: `deps` (third-party wheels, cached until pyproject.toml or
# requirements.lock changes), `build` (the project's own wheel), `runtime`.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only the dependency declaration enters this stage, so editing gateway/ never
# invalidates the dependency layer. requirements.lock is optional: when the repo has
# one (e.g. `pip-compile` output), every dependency is pinned to it.
COPY pyproject.toml requirements.loc[k] ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(deps))" > /tmp/requirements.txt \
    && set -- \
    && if [ -f requirements.lock ]; then set -- --constraint requirements.lock; fi \
    && pip wheel --no-cache-dir --wheel-dir /wheels --requirement /tmp/requirements.txt "$@" \
    && cp /tmp/requirements.txt /wheels/requirements.txt

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="stratix-gateway" \
      org.opencontainers.image.description="Backend-to-browser streaming gateway (SSE and WebSocket) for the Stratix evaluation API" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
# No .pyc writes at run time (the root filesystem is read-only in Kubernetes); pip
# already compiled the bytecode at install time.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway
# Own layer: reused as long as the dependency wheels are unchanged.
RUN --mount=type=bind,from=deps,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels --requirement /wheels/requirements.txt
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --no-deps /wheels/stratix_gateway-*.whl
# Numeric so that Kubernetes' runAsNonRoot can verify it without /etc/passwd.
USER 10001:10001
EXPOSE 8080
STOPSIGNAL SIGTERM
# python, not curl: the slim base has no curl. Override the URL when the config
# listens elsewhere than 8080.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('GATEWAY_HEALTHCHECK_URL', 'http://127.0.0.1:8080/healthz'), timeout=4)"]
ENTRYPOINT ["gateway"]
CMD ["serve", "--config", "/etc/gateway/gateway.yaml"]

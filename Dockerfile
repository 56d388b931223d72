# syntax=docker/dockerfile:1

# --- build: install authsvc and its dependencies into a virtualenv -----------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/authsvc
WORKDIR /src
# The client package first (the server depends on authsvc-client, which is on
# no index): its wheel, from its own distribution in clients/.
COPY clients/pyproject.toml clients/README.md ./clients/
COPY clients/authsvc_client ./clients/authsvc_client
RUN /opt/authsvc/bin/pip wheel --no-deps --wheel-dir /wheels ./clients
# Then the server, with that wheel in the same pip call.
COPY pyproject.toml README.md ./
COPY authsvc ./authsvc
COPY migrations ./migrations
RUN /opt/authsvc/bin/pip install /wheels/authsvc_client-*.whl .

# --- run: the virtualenv only, as an unprivileged user ------------------------
FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /data --create-home authsvc
COPY --from=build /opt/authsvc /opt/authsvc
ENV PATH=/opt/authsvc/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    AUTHSVC_LISTEN=0.0.0.0:50051 \
    AUTHSVC_DATA_DIR=/data \
    AUTHSVC_LOG_FORMAT=json
USER authsvc
WORKDIR /data
VOLUME ["/data"]
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["authsvc", "health", "--target", "127.0.0.1:50051"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["authsvc"]
CMD ["serve"]

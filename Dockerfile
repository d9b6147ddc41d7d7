# blog.v1 gRPC service image.
#
#   docker build -t blog-service .
#   docker run --rm -e DATABASE_URL=postgresql+asyncpg://... blog-service migrate
#   docker run --rm -p 50051:50051 -e DATABASE_URL=postgresql+asyncpg://... blog-service
#
# Both stages use the same base tag,
# so the venv's interpreter path is identical in each. Pin a digest when you
# publish from a registry you can query (docker buildx imagetools inspect).

# ---------------------------------------------------------------- builder ---
FROM python:3.11.15-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH"

# Third-party dependencies first (their own layer, cached while the lock is
# unchanged): exactly the locked versions, every file checked against its
# hash, wheels only (the slim image has no compiler, and needs none).
COPY requirements/runtime.lock /tmp/runtime.lock
RUN pip install --no-cache-dir --require-hashes --no-deps --only-binary=:all: \
        -r /tmp/runtime.lock

# The project itself, built as a wheel (hatchling, pinned in pyproject.toml)
# and installed without dependencies: everything it needs came from the lock.
# Only what the wheel packages is copied (see [tool.hatch.build.targets.wheel]).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY generated/ generated/
COPY alembic/ alembic/
COPY service/ service/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/wheels . \
    && pip install --no-cache-dir --no-deps --no-index /tmp/wheels/*.whl \
    && blog-service --help > /dev/null

# ---------------------------------------------------------------- runtime ---
FROM python:3.11.15-slim-bookworm AS runtime

LABEL org.opencontainers.image.title="blog-service" \
      org.opencontainers.image.description="blog.v1 gRPC service: users, posts and tags"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:$PATH"

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it.
# /app is the working directory and holds the default SQLite file
# (sqlite+aiosqlite:///./blog.db) when no DATABASE_URL is given.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin app \
    && install -d -o app -g app -m 0750 /app

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
USER 10001:10001

EXPOSE 50051

# SIGTERM: health turns NOT_SERVING, in-flight calls get SHUTDOWN_GRACE
# seconds, then the process exits 0.
STOPSIGNAL SIGTERM

# No HEALTHCHECK: Kubernetes ignores it and probes grpc.health.v1 natively
# (see deploy/deployment.yaml); with plain Docker, probe with grpcurl.
ENTRYPOINT ["blog-service"]
CMD ["serve"]

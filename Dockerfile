# syntax=docker/dockerfile:1

# --- build: the project as a wheel, by the pinned build backend -------------------------
FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements-pip.lock requirements-build.lock ./
# pip itself first, pinned: an older pip mis-resolves extras in --require-hashes mode.
RUN pip install --no-cache-dir --require-hashes -r requirements-pip.lock \
    && pip install --no-cache-dir --require-hashes -r requirements-build.lock
COPY pyproject.toml README.md alembic.ini ./
COPY alembic ./alembic
COPY src ./src
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /dist .

# --- runtime: the locked dependencies and the wheel, as an unprivileged user ------------
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /app pinauth \
    && mkdir /data && chown 10001:10001 /data
# Exactly the versions the tests ran (make lock), each checked against its hash.
COPY requirements-pip.lock requirements.lock /tmp/
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements-pip.lock \
    && pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock \
    && rm /tmp/requirements-pip.lock /tmp/requirements.lock
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist
# The default database (sqlite+aiosqlite:///./pinauth.db) and the demo's live in the
# working directory, a volume: removing or upgrading the container keeps every
# connection. Mount it (docker run -v pinauth-data:/data); PostgreSQL needs none.
VOLUME /data
WORKDIR /data
USER 10001:10001
EXPOSE 8000
# No secrets here: configure with environment variables (docker run --env-file .env).
HEALTHCHECK --interval=30s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["pinauth", "serve", "--host", "0.0.0.0", "--port", "8000"]

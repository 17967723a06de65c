# The dispatcher package with the metrics extra, plus examples/ for the compose worker's
# handlers. Build from the repository root: docker compose build (or docker build .).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/app

WORKDIR /app

# Only what the wheel needs (pyproject's readme and the alembic scripts shipped inside it).
COPY pyproject.toml README.md ./
COPY dispatcher ./dispatcher
COPY migrations ./migrations
RUN pip install '.[metrics]'

# Handler modules the worker imports by module:attribute (PYTHONPATH=/app).
COPY examples ./examples

RUN useradd --system --no-create-home --uid 10001 dispatcher
USER dispatcher

CMD ["dispatcher", "--help"]

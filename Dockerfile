# syntax=docker/dockerfile:1
# One image for the API and the workers:
#   docker run -p 8000:8000 marginlab                    # API (embedded mode without REDIS_URL)
#   docker run -e REDIS_URL=... marginlab marginlab worker  # queue worker

FROM python:3.11-slim AS build
WORKDIR /src
# Compilers only in this stage: wheels are built here and copied over.
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY calibration ./calibration
COPY service ./service
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 marginlab \
    && mkdir -p /data /state && chown marginlab /data /state
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER marginlab
WORKDIR /home/marginlab
ENV MARGINLAB_DATA_ROOT=/data \
    MARGINLAB_STATE_DIR=/state \
    NUMBA_CACHE_DIR=/home/marginlab/.cache/numba \
    PYTHONUNBUFFERED=1
# Compile the numba kernels now (tiny backtests on synthetic bars, every family, the
# liquidations and the batch kernel) so the cache ships in the image: the first backtest of
# a container loads them instead of compiling for seconds. The cache is keyed on the CPU;
# on a host whose CPU differs, numba compiles once more into the same directory, which is
# left writable for any user the container runs as.
RUN mkdir -p "$NUMBA_CACHE_DIR" && python -m calibration._warmup \
    && chmod -R a+rwX /home/marginlab/.cache
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["marginlab", "serve", "--host", "0.0.0.0", "--port", "8000"]

# syntax=docker/dockerfile:1
# LRA-EE zero-shot classification service, CPU image.
#   docker build -t lraee .
#   docker run -p 8000:8000 -v lraee-models:/models lraee
# Settings are LRAEE_* environment variables (app/settings.py); see deploy/README.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- builder: resolve and install everything into a self-contained venv ----
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# CPU wheels of torch/torchvision from PyTorch's CPU index, the same versions pyproject.toml pins: PyPI's default
# x86_64 torch is a CUDA build of several GB that this image would never use. `pip install .` below then finds
# torch==2.14.1 already satisfied (the "+cpu" local version matches the pin). Its own layer: it changes rarely.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY lraee_core ./lraee_core
COPY app ./app
COPY training ./training
RUN pip install . \
    # The embedded checkpoints (everyday = default, photos, world) ship inside the package: fail the build, not the
    # first start, without them.
    && python -c "from lraee_core.assets import EMBEDDED_CHECKPOINTS as e; \
missing = [str(d) for d in e.values() if not (d / 'manifest.json').is_file()]; assert not missing, missing"

# ---- runtime: the venv and nothing else from the build ----
FROM ${PYTHON_IMAGE} AS runtime

ARG UID=10001
RUN groupadd --system --gid ${UID} lraee \
    && useradd --system --uid ${UID} --gid lraee --create-home --home-dir /home/lraee lraee \
    && mkdir -p /models/open_clip /models/checkpoints \
    && chown -R lraee:lraee /models

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    # glibc's per-thread arenas keep freed request bodies resident (measured: ~50 MiB per 40 MB body); 2 arenas don't.
    MALLOC_ARENA_MAX=2 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    # open_clip downloads (or finds) backbone weights here; /models is a volume so they survive restarts.
    LRAEE_OPEN_CLIP_CACHE_DIR=/models/open_clip \
    # Torch intra-op threads: keep equal to the container's CPU limit, or replicas oversubscribe the host.
    LRAEE_THREADS=2 \
    OMP_NUM_THREADS=2
# Not set here, so the service falls back to the embedded default checkpoint: LRAEE_CHECKPOINT (e.g.
# /models/checkpoints/mine), LRAEE_BACKBONE_WEIGHTS, LRAEE_API_KEY and the request limits.

# User checkpoints and open_clip weights. A new named volume is seeded from this directory, owner included.
VOLUME ["/models"]

USER ${UID}:${UID}
WORKDIR /home/lraee
EXPOSE 8000

# Ready = model loaded and warmed (/readyz answers 503 before that); urllib raises on any non-2xx status.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]

# Exec form: uvicorn is PID 1 and gets SIGTERM directly for a graceful shutdown.
CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000", \
     "--timeout-graceful-shutdown", "20"]

# Konstruct in one image: `docker run -p 8080:8080 -v konstruct:/data konstruct` runs `konstruct up`
# on the embedded PostgreSQL under /data. For scale-out, set KONSTRUCT_DATABASE__URL and
# KONSTRUCT_QUEUE__URL and run `konstruct gateway` / `konstruct worker` from the same image.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    KONSTRUCT_CONFIG=/data/konstruct.toml \
    KONSTRUCT_GATEWAY__HOST=0.0.0.0

WORKDIR /app
# torch's CPU build first, so sentence-transformers does not pull the CUDA wheels; as the Makefile does, the same
# version from the default index (a mirror's) where PyTorch's index cannot be reached.
RUN pip install --timeout 10 --retries 0 --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    || { echo "no torch==2.13.0 from PyTorch's CPU index: installing it from the default index"; pip install torch==2.13.0; }
COPY pyproject.toml README.md ./
COPY konstruct ./konstruct
COPY migrations ./migrations
RUN pip install .
# The embedding model's ONNX graph, exported from the bundled weights once at build time instead of at each start.
ENV KONSTRUCT_CACHE_DIR=/opt/konstruct-cache
RUN python -c "from konstruct.agent.embedding import load_backend; load_backend('onnx')" && chmod -R a+rX /opt/konstruct-cache

# Run unprivileged: the embedded PostgreSQL then runs as this user too, owning only /data.
RUN useradd --create-home --uid 10001 konstruct && mkdir /data && chown konstruct /data
USER konstruct
VOLUME /data
EXPOSE 8080

# First start: write /data/konstruct.toml and the master key; afterwards just start.
CMD ["sh", "-c", "test -f /data/konstruct.toml || konstruct init --dir /data; exec konstruct up"]

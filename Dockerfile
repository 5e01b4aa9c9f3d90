# pacs-agent: one image for the agent (EXTRAS="") and the GPU worker (EXTRAS=worker, default).
# On a GPU host the CUDA build of torch comes from the PyTorch index (TORCH_INDEX_URL); the agent
# image never installs torch.
FROM python:3.11-slim

ARG EXTRAS=worker
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# dicom3tools is not needed at run time; libgomp for torch's CPU kernels.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --system --create-home --uid 10001 pacs \
    && mkdir -p /data /models \
    && chown pacs /data

WORKDIR /app
COPY . /app

RUN if [ -n "$EXTRAS" ]; then \
        pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL" \
        && pip install ".[$EXTRAS]"; \
    else \
        pip install .; \
    fi

USER pacs
ENV PACS_AGENT_DATA_DIR=/data
EXPOSE 8000 11112
CMD ["pacs-agent", "serve"]

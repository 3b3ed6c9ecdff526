# The application image: the valifi command, flows, training and the agent server.
FROM python:3.11-slim
WORKDIR /app
# torch first, so that the project's range installs nothing more. A plain install
# of torch on x86-64 Linux is the CUDA build (several GB); the CPU image wants
# PyTorch's CPU wheel index, given at build time as TORCH_INDEX_URL (see the README).
# TORCH_VARIANT=gpu builds the GPU variant from the default index instead. Either
# way the build fails, with the reason, when the torch it got is the other kind.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" \
 && python -c "import sys, torch; cuda = torch.version.cuda is not None; \
want = '$TORCH_VARIANT' == 'gpu'; \
sys.exit(0 if cuda == want else f'TORCH_VARIANT=$TORCH_VARIANT but torch {torch.__version__} is ' \
+ ('a CUDA build: set TORCH_INDEX_URL to the CPU wheel index' if cuda else 'a CPU build'))"
COPY pyproject.toml README.md prefect.yaml ./
COPY valifi ./valifi
COPY core ./core
COPY model ./model
COPY flows ./flows
COPY serving ./serving
# editable: the worker runs flows from /app (prefect.yaml's working directory)
RUN pip install --no-cache-dir -e .
ENV VALIFI_DATA_DIR=/data PYTHONUNBUFFERED=1
VOLUME ["/data"]

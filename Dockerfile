# The application image: the valifi command, flows, training and the agent server.
FROM python:3.11-slim
WORKDIR /app
# CPU build of torch first, so the project's range does not pull a CUDA build.
ARG TORCH_SPEC=torch==2.13.0
RUN pip install --no-cache-dir "$TORCH_SPEC"
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

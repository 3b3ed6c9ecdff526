#!/bin/sh
# Starts the tracking server with a backend store from MLFLOW_BACKEND_STORE_URI
# (PostgreSQL in docker-compose) and artifacts proxied from MLFLOW_ARTIFACTS_DESTINATION.
set -eu
: "${MLFLOW_BACKEND_STORE_URI:=sqlite:////data/mlflow.db}"
: "${MLFLOW_ARTIFACTS_DESTINATION:=/data/artifacts}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec mlflow server \
  --host 0.0.0.0 --port 5000 \
  --workers "${MLFLOW_WORKERS:-2}" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-*}"

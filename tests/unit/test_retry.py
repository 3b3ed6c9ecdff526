"""Which errors the flow's I/O tasks retry: those of the database, registry or network."""

import httpx
import psycopg
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

from flows.pipeline import ExportError, is_io_error
from flows.source import SourceError


def _caused_by(cause: BaseException) -> RuntimeError:
    try:
        raise RuntimeError("wrapped") from cause
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize(
    "exc",
    [
        ExportError("export from table 'x' failed: connection refused"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
        requests.ConnectionError("refused"),
        httpx.ConnectError("refused"),
        psycopg.OperationalError("server closed the connection unexpectedly"),
        MlflowException("API request to http://x failed with exception refused"),
        MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE),
        _caused_by(ConnectionResetError(104, "reset")),
    ],
)
def test_io_errors_are_retried(exc):
    assert is_io_error(exc)


@pytest.mark.parametrize(
    "exc",
    [
        IndexError("list index out of range"),
        KeyError("bot"),
        ValueError("bad setting"),
        FileNotFoundError("artifact"),
        SourceError("table 'x' has no column for reward"),
        psycopg.errors.UndefinedColumn("column does not exist"),
        MlflowException("no such version", error_code=RESOURCE_DOES_NOT_EXIST),
        _caused_by(ZeroDivisionError()),
    ],
)
def test_errors_of_our_code_or_data_are_not(exc):
    assert not is_io_error(exc)

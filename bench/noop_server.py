"""The agent server's LitServe set-up with a model that does no work: the framework's
ceiling for `bench/serve_bench.py`. Same request model and validation, workers,
batching and middlewares as `valifi serve`; every execute answer is a constant.

    python bench/noop_server.py HOST PORT   (started by serve_bench.py, with the environment
                                            `valifi serve` sets)
"""

# (No `from __future__ import annotations`: FastAPI needs decode_request's annotation
# to be the class itself.)
import sys

import litserve as ls

from core.settings import Settings
from serving.api import encoded, serve
from serving.requests import PredictRequest


class NoopAPI(ls.LitAPI):
    def setup(self, device):
        self.answer = {"type": "execution", "status": "completed", "model_version": "0"}

    def decode_request(self, request: PredictRequest) -> PredictRequest:
        return request

    def predict(self, batch):
        return [self.answer for _ in batch]

    def encode_response(self, output):
        return encoded(output)  # rendered in the worker, as ours are


if __name__ == "__main__":
    serve(Settings(), sys.argv[1], int(sys.argv[2]), NoopAPI)

"""The LitServe agent server: POST /predict for info questions and agent executions.

Requests are validated by FastAPI in the HTTP process (a pydantic body: malformed
JSON, a body that is not an object, a missing or empty task, wrong types and an
unknown query type get 422 with the reason; an oversized body gets 413), so a bad
request never reaches a batch. In the workers, one batch is answered by one
batched forward pass on the model the batch started with; a request that cannot
be served (unknown agent, no model yet) gets its own 4xx/503 without failing its
batch-mates.

(No `from __future__ import annotations` here: LitServe hands decode_request's
annotation to FastAPI, which needs the class itself, not its name.)
"""

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import httpx
import litserve as ls
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serving import metrics
from serving.knowledge import KnowledgeBase
from serving.watcher import Watcher
from valifi.settings import Settings

log = logging.getLogger("valifi.serving")
MAX_CANDIDATES = 64


class PredictRequest(BaseModel):
    """The request the orchestrator sends."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=4000)
    agent_type: str = Field("auto", min_length=1, max_length=100)
    query_type: Literal["auto", "info", "execute"] = "auto"
    context: dict[str, Any] = Field(default_factory=dict)

    @field_validator("task")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("task must not be blank")
        return v.strip()

    @field_validator("context")
    @classmethod
    def _candidates(cls, v: dict) -> dict:
        c = v.get("candidates")
        if c is not None and (
            not isinstance(c, list)
            or not c
            or len(c) > MAX_CANDIDATES
            or not all(isinstance(a, dict) and a for a in c)
        ):
            raise ValueError(
                f"context.candidates must be a list of 1 to {MAX_CANDIDATES} non-empty JSON objects"
            )
        return v


def _error(status: int, message: str, served=None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={
            "type": "error",
            "error": message,
            "answer": message,
            "model_version": served.version if served else None,
        },
    )


def _describe(action: dict) -> str:
    name = action.get("action", json.dumps(action, sort_keys=True))
    extra = ", ".join(f"{k} {v}" for k, v in sorted(action.items()) if k != "action")
    return f"{name} ({extra})" if extra else str(name)


class AgentAPI(ls.LitAPI):
    def setup(self, device):
        self.settings = Settings()
        self.kb = KnowledgeBase.load()
        self.name = self.settings.model_name
        self.started = float(os.environ.get("VALIFI_SERVER_STARTED_AT", time.time()))
        self.worker = str(os.getpid())
        self.http = httpx.Client(base_url=self.settings.mlflow_tracking_uri, timeout=5.0)
        self.watcher = Watcher(
            self._resolve,
            self._fetch,
            self.settings.data_dir / "serving-cache" / self.name,
            self.settings.poll_interval_s,
            self._on_reload,
        )
        self.watcher.sync_once()  # serve the current Production from the first request
        self.watcher.start()

    # -- registry access (plain REST: quick to time out, no long client retries) --
    def _resolve(self) -> str | None:
        r = self.http.get(
            "/api/2.0/mlflow/registered-models/alias",
            params={"name": self.name, "alias": "Production"},
        )
        if r.status_code in (400, 404):
            code = (
                r.json().get("error_code") if "json" in r.headers.get("content-type", "") else None
            )
            if code == "RESOURCE_DOES_NOT_EXIST" or (
                code == "INVALID_PARAMETER_VALUE" and "alias" in r.text and "not found" in r.text
            ):
                return None  # no such model, or no version holds the alias yet
        r.raise_for_status()
        return str(r.json()["model_version"]["version"])

    def _fetch(self, version: str, dst: Path) -> Path:
        from flows.registry import download

        return download(self.settings.mlflow_tracking_uri, version, dst, self.name)

    def _on_reload(self, outcome: str, version: str) -> None:
        metrics.RELOADS.labels(outcome, version).inc()
        if outcome == "success":
            metrics.SERVING_VERSION.labels(self.worker).set(float(version))

    # -- LitAPI --
    def decode_request(self, request: PredictRequest) -> PredictRequest:
        return request

    def predict(self, batch: list[PredictRequest]) -> list:
        served = self.watcher.served  # read once: the whole batch uses this model
        metrics.BATCH_SIZE.observe(len(batch))
        routed = [self._route(r, served) for r in batch]
        out: list = [None] * len(batch)
        executes = [i for i, kind in enumerate(routed) if kind == "execute"]
        for i, kind in enumerate(routed):
            if kind == "info":
                out[i] = self._info(batch[i], served)
            elif kind != "execute":
                out[i] = kind  # an error response of its own
        if executes:
            answers = self._execute_safely([batch[i] for i in executes], served)
            for i, answer in zip(executes, answers, strict=True):
                out[i] = answer
        for r in out:
            kind = r.get("type") if isinstance(r, dict) else "error"
            metrics.PREDICTIONS.labels(
                kind, served.version if served else "none", "ok" if isinstance(r, dict) else "error"
            ).inc()
        return out

    def encode_response(self, output):
        return output

    # -- routing --
    def _agent(self, req: PredictRequest, served) -> str | None:
        if req.agent_type != "auto":
            return req.agent_type
        known = set(self.kb.agents) | set(served.model.bank if served else ())
        agent, score = self.kb.agent_for(req.task)
        return agent if agent in known and score > 0.15 else None

    def _route(self, req: PredictRequest, served):
        """'info', 'execute', or an error response for this request alone."""
        kind = req.query_type
        if kind == "auto":
            named = req.agent_type != "auto"
            kind = "execute" if named or not self.kb.is_question(req.task) else "info"
        if kind == "info":
            return "info"
        agent = self._agent(req, served)
        known = set(served.model.bank) if served else set(self.kb.agents)
        if agent is None:
            return _error(
                422,
                "could not tell which agent this task is for; set agent_type "
                f"to one of: {', '.join(sorted(known))}",
                served,
            )
        if agent not in known and not req.context.get("candidates"):
            return _error(
                404, f"unknown agent {agent!r}; known agents: {', '.join(sorted(known))}", served
            )
        if served is None:
            reason = (
                "no model promoted yet"
                if self.watcher.status.registry_reachable
                else "no model loaded: the model registry is unreachable"
            )
            return _error(503, reason)
        req.agent_type = agent
        return "execute"

    # -- execute --
    def _execute_safely(self, reqs: list[PredictRequest], served) -> list:
        """One batched pass; if it raises, each request alone, so only the bad ones fail."""
        try:
            return self._execute(reqs, served)
        except Exception:
            log.exception("batched prediction failed; answering one by one")
        out = []
        for r in reqs:
            try:
                out.extend(self._execute([r], served))
            except Exception as exc:
                out.append(
                    _error(500, f"prediction failed: {type(exc).__name__}: {exc}"[:300], served)
                )
        return out

    def _execute(self, reqs: list[PredictRequest], served) -> list[dict]:
        queries = []
        for r in reqs:
            doc = {"task": r.task, **{k: v for k, v in r.context.items() if k != "candidates"}}
            queries.append((r.agent_type, doc, r.context.get("candidates")))
        data_types = [
            r.context.get("data_type") if isinstance(r.context.get("data_type"), str) else None
            for r in reqs
        ]
        answers = []
        for (agent, _, cands), ranked in zip(
            queries, served.model.rank_many(queries, data_types), strict=True
        ):
            best, rest = ranked[0], ranked[1:]
            answers.append(
                {
                    "type": "execution",
                    "agent": agent,
                    "status": "completed",
                    "result": {
                        "action": best.action,
                        "expected_reward": round(best.score, 6),
                        "runners_up": [
                            {"action": r.action, "expected_reward": round(r.score, 6)}
                            for r in rest[:5]
                        ],
                        "candidates": "context" if cands else "action bank",
                    },
                    "answer": f"{agent} recommends {_describe(best.action)} "
                    f"(expected reward {best.score:+.3f}"
                    + (
                        f"; next best {_describe(rest[0].action)} at {rest[0].score:+.3f})"
                        if rest
                        else ")"
                    ),
                    "model_version": served.version,
                }
            )
        return answers

    # -- info --
    def _info(self, req: PredictRequest, served) -> dict:
        topic, score = self.kb.match(req.task)
        if topic is None or score < 0.2:
            answer = (
                "I can answer questions about Valifi, its agents, the system status, "
                "training and rollback; ask an agent to act with query_type 'execute'."
            )
            return {
                "type": "info",
                "topic": None,
                "answer": answer,
                "model_version": served.version if served else None,
            }
        data: dict = {}
        if topic.id == "agents":
            answer, data = self._agents_answer(served)
        elif topic.id == "status":
            answer, data = self._status_answer(served)
        else:
            answer = topic.answer
        return {
            "type": "info",
            "topic": topic.id,
            "answer": answer,
            "data": data,
            "model_version": served.version if served else None,
        }

    def _agents_answer(self, served) -> tuple[str, dict]:
        names = sorted(set(self.kb.agents) | set(served.model.bank if served else ()))
        parts = [
            f"{n} ({self.kb.agents[n]['description']})" if n in self.kb.agents else n for n in names
        ]
        data = {
            "agents": [
                {
                    "name": n,
                    "in_model": bool(served and n in served.model.bank),
                    "actions": len(served.model.bank.get(n, [])) if served else 0,
                }
                for n in names
            ]
        }
        return f"Valifi runs {len(names)} agents: " + "; ".join(parts) + ".", data

    def _status_answer(self, served) -> tuple[str, dict]:
        st = self.watcher.status
        uptime = time.time() - self.started
        status = {
            "model": self.name,
            "alias": "Production",
            "version": served.version if served else None,
            "loaded_at": served.loaded_at if served else None,
            "uptime_s": round(uptime, 1),
            "requests_served": metrics.requests_served(),
            "last_reload": st.last_outcome,
            "reloads": st.reloads,
            "reload_failures": st.failures,
            "registry_reachable": st.registry_reachable,
            "registry_error": st.registry_error,
            "metrics": (
                {
                    k: v
                    for k, v in served.model.metrics.items()
                    if k
                    in (
                        "auc",
                        "rmse",
                        "mae",
                        "replay_value",
                        "rows",
                        "true_value_policy",
                        "gap_closed",
                    )
                }
                if served
                else {}
            ),
            "worker": self.worker,
        }
        if served:
            m = status["metrics"]
            model = (
                f"Serving {self.name} v{served.version} (alias Production), loaded at "
                f"{served.loaded_at}; holdout AUC {m.get('auc', float('nan')):.3f}, "
                f"RMSE {m.get('rmse', float('nan')):.3f}."
            )
        else:
            model = f"No {self.name} model is serving yet (none promoted to Production)."
        reload = (
            f" Last reload: v{st.last_outcome['version']} {st.last_outcome['outcome']}"
            f" at {st.last_outcome['at']}."
            if st.last_outcome
            else ""
        )
        registry = (
            "reachable"
            if st.registry_reachable
            else "UNREACHABLE"
            if st.registry_reachable is False
            else "not checked yet"
        )
        answer = (
            f"{model} Up {uptime / 60:.1f} min, {status['requests_served']} requests "
            f"served.{reload} Model registry {registry}."
        )
        return answer, status


class ApiKeyMiddleware:
    """Optional API key (header X-API-Key) on everything but the probes."""

    OPEN = ("/health", "/metrics")

    def __init__(self, app, key: str):
        self.app = app
        self.key = key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            headers = dict(scope.get("headers") or [])
            if headers.get(b"x-api-key", b"").decode() != self.key:
                response = JSONResponse(
                    status_code=401,
                    content={
                        "type": "error",
                        "error": "missing or wrong X-API-Key",
                        "answer": "missing or wrong X-API-Key",
                        "model_version": None,
                    },
                )
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def build_server(settings: Settings) -> ls.LitServer:
    api = AgentAPI(max_batch_size=settings.max_batch_size, batch_timeout=settings.batch_timeout_s)
    middlewares = [(metrics.PredictMetricsMiddleware, {})]
    if settings.api_key:
        middlewares.append((ApiKeyMiddleware, {"key": settings.api_key}))
    server = ls.LitServer(
        api,
        accelerator="cpu",
        workers_per_device=settings.serve_workers,
        timeout=settings.request_timeout_s,
        max_payload_size=settings.max_payload_bytes,
        middlewares=middlewares,
        model_metadata={"model": settings.model_name, "alias": "Production"},
    )

    async def prometheus():
        from fastapi import Response

        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    server.app.add_api_route("/metrics", prometheus, methods=["GET"])
    return server


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the server (blocks). Sets up the shared metrics folder first."""
    os.environ.setdefault("VALIFI_SERVER_STARTED_AT", str(time.time()))
    server = build_server(settings)
    log.info(
        "serving %s@Production on http://%s:%d (%d workers, batch %d)",
        settings.model_name,
        host,
        port,
        settings.serve_workers,
        settings.max_batch_size,
    )
    server.run(
        host=host, port=port, generate_client_file=False, num_api_servers=settings.serve_api_servers
    )

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

import contextlib
import hmac
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import litserve as ls
from fastapi.responses import JSONResponse, Response

from core import decisions as decision_tables
from core.registry import Registry
from core.settings import ALIAS, CHALLENGER, Settings
from model.decision import Query, decide
from serving import metrics
from serving.batching import DrainingBatchedLoop
from serving.decision_log import DecisionLog
from serving.follower import AliasFollower
from serving.knowledge import KnowledgeBase
from serving.requests import PredictRequest, RewardRequest
from serving.rewards import Rewards
from serving.shadow import Shadow
from serving.status import STATUS_DIR_ENV, worker_status
from serving.transport import AgentServer

log = logging.getLogger("valifi.serving")


def _share_cores(serve) -> int:
    """Torch threads for this worker: every worker's torch on every core oversubscribes
    the machine (measured: ~3x slower on 2 cores with 2 workers)."""
    import torch

    n = serve.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, serve.workers))
    torch.set_num_threads(n)
    return n


def _error(status: int, message: str, served=None, headers=None, **extra) -> JSONResponse:
    content = {
        "type": "error",
        "error": message,
        "answer": message,
        "model_version": served.version if served else None,
        **extra,
    }
    return JSONResponse(
        status_code=status,
        content=content,
        headers=metrics.label_headers(content) | (headers or {}),
    )


def encoded(answer):
    """An answer rendered to JSON once, in the worker, with the headers that label it:
    the HTTP process sends it as it is (FastAPI's encoder and the metrics' re-parse of
    the body are skipped). A response made already passes through."""
    if not isinstance(answer, dict):
        return answer
    body = json.dumps(answer, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return Response(
        body.encode(), media_type="application/json", headers=metrics.label_headers(answer)
    )


def _decision_log(settings: Settings, table=decision_tables.DECISIONS) -> DecisionLog:
    serve = settings.serve
    url = settings.database_url if serve.log_decisions else None
    if url is None and table is decision_tables.DECISIONS:
        log.warning(
            "decisions are not logged: %s",
            "VALIFI_SERVE_LOG_DECISIONS is off" if not serve.log_decisions else "no DATABASE_URL",
        )
    spool = "decision-spool" if table is decision_tables.DECISIONS else "shadow-spool"
    return DecisionLog(
        url,
        settings.data_dir / spool / settings.model_name,
        batch=serve.log_batch,
        flush_s=serve.log_flush_s,
        max_queue=serve.log_queue,
        retry_s=serve.log_retry_s,
        table=table,
    )


def _flush_on_sigterm(*closing) -> None:
    """A worker told to stop first writes the records it holds (to the database, or
    the spool), then stops as it would have."""

    def stop(signum, frame):
        for close in closing:
            close()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    with contextlib.suppress(ValueError):  # not the main thread: nothing to install
        signal.signal(signal.SIGTERM, stop)


class AgentAPI(ls.LitAPI):
    def setup(self, device):
        # Registry calls from a worker fail fast: the alias follower retries on its next poll.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.settings = Settings()
        _share_cores(self.settings.serve)
        self.kb = KnowledgeBase.load()
        self.name = self.settings.model_name
        self.started = float(os.environ.get("VALIFI_SERVER_STARTED_AT", time.time()))
        self.worker = str(os.getpid())
        registry = Registry(self.settings.mlflow_tracking_uri, self.name)
        status_dir = os.environ.get(STATUS_DIR_ENV)
        self.policy = self.settings.serve.policy()
        self.decisions = _decision_log(self.settings).start()
        self.shadow = self._shadow(registry, device)
        self.follower = AliasFollower(
            registry.champion,
            lambda version: registry.download(version, self.settings.serving_cache),
            self.settings.serve.poll_interval_s,
            self._on_reload,
            Path(status_dir) / f"{self.worker}.json" if status_dir else None,
            device=device,
            report=lambda: {
                "decision_log": self.decisions.status(),
                "shadow": self.shadow.status(),
            },
            borrow=lambda version: self.shadow.follower.loaded(version),
        )
        self.decisions.on_change = self.follower.write_status
        self.shadow.log.on_change = self.follower.write_status
        self.follower.sync_once()  # serve the current Production from the first request
        self.follower.start()
        self.shadow.follower.start(now=True)  # the Challenger, off the start-up's path
        _flush_on_sigterm(
            self.shadow.close,
            lambda: self.shadow.log.close(timeout=2),
            lambda: self.decisions.close(timeout=5),
        )

    def _shadow(self, registry: Registry, device) -> Shadow:
        """The Challenger's follower and the shadow that scores with it."""
        serve = self.settings.serve
        challenger = AliasFollower(
            registry.challenger,
            lambda version: registry.download(version, self.settings.serving_cache),
            serve.poll_interval_s,
            device=device,
            drop_when_cleared=True,
            on_poll=lambda: self.follower.write_status(),
        )
        log_ = _decision_log(self.settings, decision_tables.SHADOW).start()
        share = serve.shadow_share
        if serve.max_batch_size <= 1 and share > 0:
            # the shadow scores between batches (serving.batching), a loop of batches
            log.warning("no shadow scoring: VALIFI_SERVE_MAX_BATCH_SIZE is 1 (no batching)")
            share = 0.0
        return Shadow(
            challenger, log_, self.policy, share, serve.shadow_budget, serve.shadow_max_pending
        )

    def spare_time(self, idle: bool) -> bool:
        """The batching loop's moment between batches (serving.batching): one piece of
        the shadow's work (freely when `idle`, else within its budget); whether done."""
        return self.shadow.step(idle)

    def has_spare_work(self) -> bool:
        return self.shadow.has_work()

    def _on_reload(self, outcome: str, version: str) -> None:
        metrics.RELOADS.labels(outcome, version).inc()
        if outcome == "success":
            metrics.SERVING_VERSION.labels(self.worker).set(float(version))

    # -- LitAPI --
    def decode_request(self, request: PredictRequest) -> PredictRequest:
        return request

    def predict(self, batch: list[PredictRequest]) -> list:
        served = self.follower.served  # read once: the whole batch uses this model
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
        return encoded(output) if self.settings.serve.render == "worker" else output

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
                if self.follower.status.registry_reachable
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
        queries = [Query.of(r.agent_type, r.task, r.context, r.decision_id) for r in reqs]
        started = time.perf_counter()
        made = decide(served.model, queries, self.policy, served.version)
        ms = 1000 * (time.perf_counter() - started) / len(made)
        for d in made:
            d.record["decide_ms"] = ms
        self.decisions.put([d.record for d in made])  # queued: written off the request's path
        self.shadow.offer(queries, made)  # scored after the answers leave (spare_time)
        return [d.answer | {"model_version": served.version} for d in made]

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
        st = self.follower.status
        uptime = time.time() - self.started
        status = {
            "model": self.name,
            "alias": ALIAS,
            "version": served.version if served else None,
            "loaded_at": served.loaded_at if served else None,
            "uptime_s": round(uptime, 1),
            "requests_served": metrics.requests_served(),
            "last_reload": st.last_outcome,
            "reloads": st.reloads,
            "reload_failures": st.failures,
            "registry_reachable": st.registry_reachable,
            "registry_error": st.registry_error,
            "metrics": _shown_metrics(served.model.metrics) if served else {},
            "worker": self.worker,
            "shadow": self.shadow.status(),
        }
        if served:
            m = status["metrics"]
            model = (
                f"Serving {self.name} v{served.version} (alias {ALIAS}), loaded at "
                f"{served.loaded_at}; holdout AUC {_figure(m.get('auc'))}, "
                f"RMSE {_figure(m.get('rmse'))}."
            )
        else:
            model = f"No {self.name} model is serving yet (none promoted to {ALIAS})."
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
        shadow = status["shadow"]
        challenger = (
            f" {CHALLENGER} v{shadow['alias_version']} in shadow: {shadow['state']}."
            if shadow["alias_version"]
            else ""
        )
        answer = (
            f"{model} Up {uptime / 60:.1f} min, {status['requests_served']} requests "
            f"served.{reload} Model registry {registry}.{challenger}"
        )
        return answer, status


SHOWN_METRICS = ("auc", "rmse", "mae", "replay_value", "rows", "true_value_policy", "gap_closed")


def _shown_metrics(metrics: dict) -> dict:
    """The serving version's metrics for the status answer; NaN (say, no replay match)
    becomes null, since JSON has no NaN."""
    shown = {k: metrics[k] for k in SHOWN_METRICS if k in metrics}
    return {k: v if _finite_or_other(v) else None for k, v in shown.items()}


def _finite_or_other(v) -> bool:
    return not isinstance(v, float) or math.isfinite(v)


def _figure(v) -> str:
    return f"{v:.3f}" if isinstance(v, int | float) else "n/a"


async def _validation_error(request, exc) -> JSONResponse:
    """422 with each problem's place and message; never echoes the input back (it may
    hold what cannot be encoded, such as a lone surrogate)."""
    problems = [
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
        for e in exc.errors()
    ]
    message = "; ".join(problems).encode("utf-8", "backslashreplace").decode("utf-8")
    return _error(422, f"invalid request: {message}"[:2000])


def _http_error(settings: Settings):
    """Errors raised as HTTPException (a body that cannot be parsed, a timeout) in the
    same shape as every other error, with FastAPI's `detail` kept beside it.

    A request whose inference worker died cannot be answered; the server is stopping
    so that its supervisor restarts it (valifi.supervise). That is a 503 to retry,
    not a 500: nothing was wrong with the request or the model.
    """

    async def handle(request, exc) -> JSONResponse:
        if exc.status_code == 500 and not all(
            w["alive"] for w in worker_status(settings)["workers"]
        ):
            return _error(
                503,
                "an inference worker stopped; the server is restarting: retry shortly",
                headers={"Retry-After": "5"},
                detail=exc.detail,
            )
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
        return _error(
            exc.status_code, detail[:2000], headers=getattr(exc, "headers", None), detail=exc.detail
        )

    return handle


class ApiKeyMiddleware:
    """Optional API key (header X-API-Key) on everything but the probes."""

    OPEN = ("/health", "/metrics", "/status")

    def __init__(self, app, key: str):
        self.app = app
        self.key = key

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            headers = dict(scope.get("headers") or [])
            # bytes against bytes, in constant time: no decoding of what a client sent
            if not hmac.compare_digest(headers.get(b"x-api-key", b""), self.key.encode()):
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


def _one_served_version(settings: Settings) -> str | None:
    """The version every live worker serves, if they agree (labels unattributed 5xx)."""
    versions = {w["version"] for w in worker_status(settings)["workers"] if w["alive"]}
    return versions.pop() if len(versions) == 1 else None


def build_server(settings: Settings, api_class: type[ls.LitAPI] = AgentAPI) -> ls.LitServer:
    """The server around `api_class` (the agent; the serving benchmark swaps in a no-op)."""
    serve = settings.serve
    api = api_class(
        max_batch_size=serve.max_batch_size,
        batch_timeout=serve.batch_timeout_s,
        loop=DrainingBatchedLoop() if serve.max_batch_size > 1 else "auto",
    )
    middlewares = [
        (metrics.PredictMetricsMiddleware, {"fallback": lambda: _one_served_version(settings)})
    ]
    if serve.api_key:
        middlewares.append((ApiKeyMiddleware, {"key": serve.api_key}))
    server = AgentServer.with_transport(serve.transport)(
        api,
        accelerator="auto",  # a GPU when there is one
        workers_per_device=serve.workers,
        timeout=serve.request_timeout_s,
        max_payload_size=serve.max_payload_bytes,
        middlewares=middlewares,
        model_metadata={"model": settings.model_name, "alias": ALIAS},
    )

    async def prometheus():
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    async def status():
        return worker_status(settings)

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    server.app.add_exception_handler(RequestValidationError, _validation_error)
    server.app.add_exception_handler(StarletteHTTPException, _http_error(settings))
    server.app.add_api_route("/metrics", prometheus, methods=["GET"])
    server.app.add_api_route("/status", status, methods=["GET"])
    rewards = Rewards(settings)

    def reward(body: RewardRequest):
        return rewards.record(body)

    server.app.add_api_route("/reward", reward, methods=["POST"])
    return server


def serve(settings: Settings, host: str, port: int, api_class: type[ls.LitAPI] = AgentAPI) -> None:
    """Run the server (blocks). `valifi serve` sets up the shared folders first."""
    os.environ.setdefault("VALIFI_SERVER_STARTED_AT", str(time.time()))
    server = build_server(settings, api_class)
    log.info(
        "serving %s@%s on http://%s:%d (%d workers, batch %d)",
        settings.model_name,
        ALIAS,
        host,
        port,
        settings.serve.workers,
        settings.serve.max_batch_size,
    )
    server.run(
        host=host,
        port=port,
        generate_client_file=False,
        num_api_servers=settings.serve.api_servers,
        access_log=settings.serve.access_log,
    )

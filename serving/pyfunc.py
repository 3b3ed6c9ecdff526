"""The registered model as an MLflow pyfunc, logged from code (its file is logged with
the model; it imports `model` alone, which is logged beside it).

`mlflow models serve -m models:/valifi-agent@Production` serves it: POST
/invocations with `{"dataframe_records": [{"agent_type": "trading_advanced",
"task": "Analyze AAPL stock and suggest trade", "context": {...}}]}` answers, per
record, the execute answer `/predict` gives (model.decision), without
`model_version`, which only the agent server knows. A record's `decision_id` draws the
same decision as on the agent server; the exploration is the default one, or what the
request's `params` set. Its decisions are not logged.
"""

from __future__ import annotations

from mlflow.pyfunc import PythonModel

import mlflow


def _records(model_input) -> list[dict]:
    if hasattr(model_input, "to_dict"):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, dict):
        return [model_input]
    return list(model_input)


class AgentPyfunc(PythonModel):
    def load_context(self, context):
        from model.artifact import load

        self.model = load(context.artifacts["agent"])  # verifies the canary set

    def predict(self, context, model_input, params=None):
        from model.config import Exploration
        from model.decision import Query, decide

        queries = [
            Query.of(
                r.get("agent_type") or r.get("bot"),
                r.get("task", ""),
                r.get("context") or {},
                r.get("decision_id"),
            )
            for r in _records(model_input)
        ]  # an unknown agent is decide's UnknownAgent (a ValueError)
        # the exploration's defaults (the agent server's, unless VALIFI_SERVE_* change them)
        return [d.answer for d in decide(self.model, queries, Exploration(**(params or {})))]


mlflow.models.set_model(AgentPyfunc())

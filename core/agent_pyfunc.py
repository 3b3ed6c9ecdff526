"""The registered model as an MLflow pyfunc, logged from code.

`mlflow models serve -m models:/valifi-agent@Production` serves it: POST
/invocations with `{"dataframe_records": [{"agent_type": "trading_advanced",
"task": "Analyze AAPL stock and suggest trade", "context": {...}}]}` answers, per
record, the chosen action, its expected reward and the runners-up. An execute
request becomes the document the bots log: `{"task": task, **context}`.
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
        records = _records(model_input)
        reqs = []
        for r in records:
            ctx = r.get("context") or {}
            bot = r.get("agent_type") or r.get("bot")
            if bot not in self.model.bank and not ctx.get("candidates"):
                raise ValueError(f"unknown agent {bot!r}; known: {', '.join(self.model.bots)}")
            doc = {k: v for k, v in ctx.items() if k != "candidates"}
            doc = {"task": r.get("task", ""), **doc}
            reqs.append((bot, doc, ctx.get("candidates")))
        out = []
        for (bot, _, _), ranked in zip(reqs, self.model.rank_many(reqs), strict=True):
            out.append(
                {
                    "agent": bot,
                    "action": ranked[0].action,
                    "expected_reward": ranked[0].score,
                    "lower_bound": ranked[0].lower,
                    "runners_up": [
                        {"action": r.action, "expected_reward": r.score, "lower_bound": r.lower}
                        for r in ranked[1:4]
                    ],
                }
            )
        return out


mlflow.models.set_model(AgentPyfunc())

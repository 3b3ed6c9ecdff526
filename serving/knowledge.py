"""The knowledge base: what Valifi is, its agents, and how to route a request.

Questions are matched to topics by TF-IDF cosine similarity over words and
character trigrams against several phrasings of each topic, so "Which bots are
available?" finds the agents topic without a keyword per branch. The same
matcher tells an info question from an instruction, and picks the agent an
instruction is for when the request does not name one.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

DEFAULT_FILE = Path(__file__).with_name("knowledge.json")
_WORD = re.compile(r"[a-z0-9]+")
QUESTION_WORDS = {
    "what",
    "which",
    "who",
    "how",
    "why",
    "when",
    "where",
    "is",
    "are",
    "list",
    "show",
    "tell",
    "explain",
    "help",
    "status",
    "describe",
}
ACTION_WORDS = {
    "analyze",
    "analyse",
    "suggest",
    "buy",
    "sell",
    "trade",
    "rebalance",
    "invest",
    "hedge",
    "evaluate",
    "review",
    "find",
    "recommend",
    "execute",
    "place",
    "deposit",
    "verify",
    "run",
    "should",
}


def _features(text: str) -> Counter:
    t = text.lower()
    words = _WORD.findall(t)
    grams = [g for w in words for g in (f" {w} "[i : i + 3] for i in range(len(w)))]
    return Counter(words + grams)


class _Index:
    """TF-IDF vectors of labelled example texts; `best` returns the closest label."""

    def __init__(self, examples: list[tuple[str, str]]):
        feats = [(label, _features(text)) for label, text in examples]
        df = Counter(f for _, c in feats for f in c)
        n = len(feats)
        self.idf = {f: math.log((1 + n) / (1 + d)) + 1 for f, d in df.items()}
        self.rows = [(label, self._vector(c)) for label, c in feats]

    def _vector(self, counts: Counter) -> dict[str, float]:
        v = {f: (1 + math.log(c)) * self.idf.get(f, 0.0) for f, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {f: x / norm for f, x in v.items()}

    def best(self, text: str) -> tuple[str | None, float]:
        q = self._vector(_features(text))
        scored = [(label, sum(q.get(f, 0.0) * x for f, x in v.items())) for label, v in self.rows]
        label, score = max(scored, key=lambda s: s[1], default=(None, 0.0))
        return label, score


@dataclass
class Topic:
    id: str
    answer: str  # "dynamic": filled from live state by the server


class KnowledgeBase:
    def __init__(self, data: dict):
        self.agents: dict[str, dict] = data["agents"]
        self.topics = {t["id"]: Topic(t["id"], t["answer"]) for t in data["topics"]}
        self._topics = _Index([(t["id"], q) for t in data["topics"] for q in t["questions"]])
        self._agents = _Index(
            [(name, a["description"]) for name, a in self.agents.items()]
            + [(name, kw) for name, a in self.agents.items() for kw in a["keywords"]]
        )

    @classmethod
    def load(cls, path: Path | None = None) -> KnowledgeBase:
        return cls(json.loads(Path(path or DEFAULT_FILE).read_text()))

    def match(self, question: str) -> tuple[Topic | None, float]:
        label, score = self._topics.best(question)
        return (self.topics[label] if label else None), score

    def agent_for(self, task: str) -> tuple[str | None, float]:
        return self._agents.best(task)

    def is_question(self, task: str, min_score: float = 0.35) -> bool:
        """Whether a task reads as a question about the system rather than an instruction."""
        words = _WORD.findall(task.lower())
        if not words:
            return True
        _, score = self.match(task)
        asks = words[0] in QUESTION_WORDS or task.rstrip().endswith("?")
        acts = bool(ACTION_WORDS & set(words))
        if acts and not (asks and score >= 0.5):
            return False
        return asks or score >= min_score

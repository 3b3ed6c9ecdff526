"""The model artifact: one folder, JSON and safetensors only (never pickle).

    ARTIFACT/
      model.safetensors   weights of the RewardModel (or of each member of an ensemble)
      config.json         ModelConfig, TrainConfig and where the model came from
      featurizer.json     key paths, numeric statistics, word vocabulary
      action_bank.json    per bot: the actions seen in training, most frequent first,
                          how many rows show each, and the ranking's pessimism
      canary.json         a few pairs with the scores this model gave them
      metrics.json        evaluation on the temporal holdout

`load()` rebuilds the model anywhere and `AgentModel.verify()` checks that it
reproduces the canary scores.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from model.features import Featurizer, canonical_json
from model.network import ModelConfig, RewardEnsemble, RewardModel, build, to_tensors
from model.snapshot import DATA_TYPES

FILES = (
    "model.safetensors",
    "config.json",
    "featurizer.json",
    "action_bank.json",
    "canary.json",
    "metrics.json",
)
BANK_CAP = 32
CANARY_SIZE = 16
ACTIONS_KEPT = 1024  # embedded actions a prefix network's model keeps
# a prefix network scores this many pairs or more apart (contexts once, actions once):
# below it the joined sequences' one pass cost less than the two passes apart (one
# torch thread: 4 pairs 1.18x apart, 8 pairs 1.01x, 32 pairs 0.86x, 128 pairs 0.57x)
APART_MIN_PAIRS = 8


class ArtifactError(RuntimeError):
    """An artifact is missing files, cannot be read, or does not reproduce its canaries."""


@dataclass
class Ranked:
    action: dict
    score: float  # expected reward
    lower: float  # what the ranking orders by: the score less the action's uncertainty


@dataclass(frozen=True)
class Support:
    """How well the training rows cover each bank action, for ranking by a lower bound.

    An action logged n times for a bot ranks by `score - penalty / sqrt(n)`: `penalty`
    is the model's pessimism times its validation error (a mean over n noisy rewards is
    off by about error / sqrt(n)). An action outside the bank counts as logged once.
    Without it (artifacts made before it, or pessimism 0) actions rank by score alone.
    """

    counts: dict[str, dict[str, int]]  # bot -> canonical JSON of the action -> rows
    penalty: float = 0.0

    def margin(self, bot: str, action: dict) -> float:
        if self.penalty <= 0:
            return 0.0
        n = self.counts.get(bot, {}).get(canonical_json(action), 0)
        return self.penalty / max(n, 1) ** 0.5

    @classmethod
    def from_json(cls, doc: dict, bank: dict[str, list[dict]]) -> Support:
        counts = doc.get("counts", {})
        penalty = float(doc.get("pessimism", 0.0)) * float(doc.get("noise_sd", 0.0))
        if not (np.isfinite(penalty) and penalty >= 0):
            raise ValueError(f"pessimism and noise_sd must be numbers >= 0: {doc}")
        return cls(
            {
                bot: {canonical_json(a): int(n) for a, n in zip(bank[bot], ns, strict=True)}
                for bot, ns in counts.items()
            },
            penalty,
        )


NO_SUPPORT = Support({})


class AgentModel:
    """A trained reward model with its featurizer and action bank, ready to rank actions."""

    def __init__(
        self,
        net: RewardModel | RewardEnsemble,
        featurizer: Featurizer,
        bank: dict[str, list[dict]] | None = None,
        default_data_type: dict[str, str] | None = None,
        config: dict | None = None,
        canary: list[dict] | None = None,
        metrics: dict | None = None,
        support: Support = NO_SUPPORT,
    ):
        """A network and its featurizer score pairs; the bank (per bot, its actions) and
        the support (see `Support`) rank them; the rest is what the artifact records."""
        self.net = net.eval()
        self.featurizer = featurizer
        self.bank = bank or {}
        self.default_data_type = default_data_type or {}
        self.config = config or {}
        self.canary = canary or []
        self.metrics = metrics or {}
        self.support = support
        self.device = torch.device("cpu")
        self._bank_keys: dict[str, set[str]] | None = None
        # a prefix network's embedded actions, and their tokens, by canonical JSON
        self._vectors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tokens_of: dict[str, list] = {}
        # the bank's actions live as long as the model: their keys are found by identity
        self._bank_key = {id(a): canonical_json(a) for acts in self.bank.values() for a in acts}

    def to(self, device: str | torch.device) -> AgentModel:
        """Score on `device` from now on (bf16 autocast on GPUs that support it)."""
        self.device = torch.device(device)
        self.net.to(self.device)
        self._vectors = {}
        return self

    @property
    def bots(self) -> list[str]:
        return sorted(self.bank)

    @torch.inference_mode()
    def score(
        self, rows: list[tuple[str, str, object, object]], batch_size: int = 512
    ) -> np.ndarray:
        """Expected reward of each (bot, data_type, input, action) row: one batched pass."""
        return self._score([self.featurizer.tokens(*r) for r in rows], batch_size)

    @torch.inference_mode()
    def _score(self, seqs: list, batch_size: int = 512) -> np.ndarray:
        out = []
        for i in range(0, len(seqs), batch_size):
            enc = self.featurizer.pad(seqs[i : i + batch_size])
            x = [t.to(self.device) for t in to_tensors(enc)]
            with self._autocast():
                out.append(self.net(*x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def rank_many(
        self,
        requests: list[tuple[str, dict, list[dict] | None]],
        data_types: list[str | None] | None = None,
    ) -> list[list[Ranked]]:
        """For each (bot, input, candidates or None for the bank): candidates, best first
        by the lower bound of their reward (see `Support`).

        Each request's context is featurized once, each distinct action once. A joint
        network scores every (context, candidate) sequence in one batched pass; a
        prefix one encodes each context once, embeds each action once per loaded model
        (bank actions are kept), and runs only the candidates' tokens per pair.
        """
        fz = self.featurizer
        ctxs, spans, margins, margin = [], [], [], {}
        for i, (bot, x, candidates) in enumerate(requests):
            cands = candidates if candidates else self.bank.get(bot, [])
            dt = (data_types[i] if data_types else None) or self.default_data_type.get(
                bot, DATA_TYPES[0]
            )
            ctxs.append(fz.context_tokens(bot, dt, x))
            start = len(margins)
            spans.append((start, start + len(cands), cands))
            for a in cands:
                if (bot, id(a)) not in margin:
                    margin[bot, id(a)] = self.support.margin(bot, a)
                margins.append(margin[bot, id(a)])
        if getattr(self.net, "prefix", False) and len(margins) >= APART_MIN_PAIRS:
            scores = self._score_apart(ctxs, spans)
        else:
            tokens = {id(a): fz.action_tokens(a) for _, _, cands in spans for a in cands}
            seqs = [
                fz.join(c, tokens[id(a)])
                for c, (_, _, cands) in zip(ctxs, spans, strict=True)
                for a in cands
            ]
            scores = self._score(seqs)
        lower = scores - np.asarray(margins, dtype=scores.dtype)
        ranked = []
        for lo, hi, cands in spans:
            order = np.argsort(-lower[lo:hi], kind="stable")
            ranked.append(
                [Ranked(cands[k], float(scores[lo + k]), float(lower[lo + k])) for k in order]
            )
        return ranked

    @torch.inference_mode()
    def _score_apart(self, ctxs: list, spans: list, chunk: int = 256) -> np.ndarray:
        """The score of each (context, candidate) pair of `spans`, a prefix network's
        way: each context encoded once (`chunk` at a time), each action embedded once
        per model, and only the candidates' tokens run per pair."""
        fz = self.featurizer
        out = []
        for i in range(0, len(ctxs), chunk):
            part = spans[i : i + chunk]
            cands = [a for _, _, cs in part for a in cs]
            if not cands:
                continue
            keys = [self._bank_key.get(id(a)) or canonical_json(a) for a in cands]
            # the context as training cut it: room left for the longest candidate
            longest = max(len(self._action_tokens(k, a)) for k, a in zip(keys, cands, strict=True))
            room = fz.max_len - longest
            enc = fz.pad([c[:room] for c in ctxs[i : i + chunk]])
            ci = torch.tensor(
                [j for j, (lo, hi, _) in enumerate(part) for _ in range(hi - lo)],
                device=self.device,
            )
            with self._autocast():
                table, valid, ai = self._embedded(keys, cands)
                contexts = self.net.encode_contexts(*[t.to(self.device) for t in to_tensors(enc)])
                scores = self.net.score_pairs(contexts, table, valid, ci, ai)
            out.append(scores.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def _autocast(self) -> torch.autocast:
        """bf16 autocast on a GPU that supports it; elsewhere off."""
        bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)

    def _action_tokens(self, key: str, action) -> list:
        tokens = self._tokens_of.get(key)
        if tokens is None:
            tokens = self.featurizer.action_tokens(action)
            if len(self._tokens_of) < ACTIONS_KEPT:
                self._tokens_of[key] = tokens
        return tokens

    def _embedded(self, keys: list[str], actions: list[dict]):
        """The distinct actions' token vectors and which are tokens, trimmed to the
        longest, and each candidate's row among them. An action's vectors are kept
        for the model's life (bank actions, and the first ACTIONS_KEPT others)."""
        new = {k: a for k, a in zip(keys, actions, strict=True) if k not in self._vectors}
        fresh = {}
        if new:
            enc = self.featurizer.pad([self._action_tokens(k, a) for k, a in new.items()])
            vecs, valid = self.net.embed_actions(*[t.to(self.device) for t in to_tensors(enc)])
            fresh = {k: (vecs[n], valid[n]) for n, k in enumerate(new)}
            for k, row in fresh.items():
                if len(self._vectors) < ACTIONS_KEPT:
                    self._vectors[k] = row
        rows = {k: n for n, k in enumerate(dict.fromkeys(keys))}
        got = [self._vectors.get(k) or fresh[k] for k in rows]
        valid = torch.stack([v for _, v in got])
        width = int(valid.sum(1).max())
        table = torch.stack([e for e, _ in got])[..., :width, :]
        ai = torch.tensor([rows[k] for k in keys], device=self.device)
        return table, valid[:, :width], ai

    def knows(self, bot: str) -> bool:
        """Whether the bank holds actions for `bot` (a bot the training rows showed)."""
        return bool(self.bank.get(bot))

    def knows_action(self, bot: str, action) -> bool:
        """Whether `action` is in `bot`'s bank."""
        if self._bank_keys is None:
            self._bank_keys = {
                b: {canonical_json(a) for a in acts} for b, acts in self.bank.items()
            }
        return canonical_json(action) in self._bank_keys.get(bot, ())

    def choose(self, bots, inputs, data_types=None) -> list[dict | None]:
        """The best bank action for each (bot, input): the learned policy. None for a
        bot the model does not know (it has no actions to rank)."""
        reqs = [(b, x, None) for b, x in zip(bots, inputs, strict=True)]
        return [r[0].action if r else None for r in self.rank_many(reqs, data_types)]

    def verify(self, atol: float = 1e-4) -> float:
        """Re-score the canary set; raises ArtifactError past `atol`. Returns the max error."""
        if not self.canary:
            raise ArtifactError("artifact has no canary set")
        got = self.score(pairs(self.canary))
        want = np.array([c["score"] for c in self.canary])
        err = float(np.max(np.abs(got - want)))
        if not np.isfinite(err) or err > atol:
            raise ArtifactError(
                f"canary scores differ by {err:.3g} (> {atol:g}): corrupt or incompatible artifact"
            )
        return err


def action_counts(df: pd.DataFrame) -> dict[str, Counter]:
    """Per bot, how many rows of `df` show each action (by its canonical JSON)."""
    return {
        str(bot): Counter(canonical_json(a) for a in group["action"])
        for bot, group in df.groupby("bot", sort=True)
    }


def bank_counts(df: pd.DataFrame, bank: dict[str, list[dict]]) -> dict[str, list[int]]:
    """Per bot, how many rows of `df` show each of its bank actions (in bank order)."""
    return {
        bot: [counts[canonical_json(a)] for a in bank.get(bot, [])]
        for bot, counts in action_counts(df).items()
    }


def action_bank(df: pd.DataFrame, cap: int = BANK_CAP) -> dict[str, list[dict]]:
    """Per bot, the distinct actions of the training rows, most frequent first."""
    bank = {}
    for bot, counts in action_counts(df).items():
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:cap]
        bank[bot] = [json.loads(k) for k, _ in ordered]
    return bank


def default_data_types(df: pd.DataFrame) -> dict[str, str]:
    return {str(b): str(g["data_type"].mode().iloc[0]) for b, g in df.groupby("bot")}


def pairs(canary: list[dict]) -> list[tuple]:
    """(bot, data_type, input, action) of each canary row, as `AgentModel.score` takes them."""
    return [(c["bot"], c["data_type"], c["input"], c["action"]) for c in canary]


def canary_rows(df: pd.DataFrame, k: int = CANARY_SIZE) -> list[dict]:
    take = df.iloc[np.linspace(0, len(df) - 1, min(k, len(df))).astype(int)]
    return [
        {"bot": r.bot, "data_type": r.data_type, "input": r.input, "action": r.action}
        for r in take.itertuples()
    ]


def save(
    out: Path,
    model: AgentModel,
    config: dict,
    canary: list[dict],
    metrics: dict,
    support: dict | None = None,
) -> Path:
    """Write `model`'s artifact folder atomically; the canary scores are computed here, by
    its net. `support`: {"counts": bank_counts(...), "pessimism": k, "noise_sd": s} (see
    Support), from which `model.support` was made."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scores = model.score(pairs(canary))
    canary = [c | {"score": float(s)} for c, s in zip(canary, scores, strict=True)]
    bank = {"bank": model.bank, "default_data_type": model.default_data_type}
    texts = {
        "config.json": json.dumps(config, indent=2),
        "featurizer.json": model.featurizer.to_json(),
        "action_bank.json": json.dumps(bank | ({"support": support} if support else {}), indent=2),
        "canary.json": json.dumps(canary, indent=2),
        "metrics.json": json.dumps(metrics, indent=2),
    }
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-artifact-", dir=out.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
        save_file(state, tmp / "model.safetensors")
        for name, text in texts.items():
            (tmp / name).write_text(text)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load(path: Path, verify: bool = True) -> AgentModel:
    """Rebuild an AgentModel from an artifact folder (and check its canaries)."""
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise ArtifactError(f"artifact {path} lacks {', '.join(missing)}")
    try:
        config = json.loads((path / "config.json").read_text())
        featurizer = Featurizer.from_json((path / "featurizer.json").read_text())
        bank = json.loads((path / "action_bank.json").read_text())
        net = build(ModelConfig.from_dict(config["model"]))
        net.load_state_dict(load_file(path / "model.safetensors"))
        model = AgentModel(
            net,
            featurizer,
            bank=bank["bank"],
            default_data_type=bank["default_data_type"],
            config=config,
            canary=json.loads((path / "canary.json").read_text()),
            metrics=json.loads((path / "metrics.json").read_text()),
            support=Support.from_json(bank.get("support", {}), bank["bank"]),
        )
    except ArtifactError:
        raise
    except Exception as exc:  # any unreadable part: one clear error
        raise ArtifactError(f"cannot load artifact {path}: {exc}") from exc
    if verify:
        model.verify()
    return model

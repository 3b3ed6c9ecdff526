"""Featurisation: an (input, action) pair of JSON documents → one token sequence.

A document is flattened into leaves sorted by key path, so key order and
whitespace never matter. Every leaf starts with a token for its key path:

- a number becomes that one token, carrying the value three times: standardised
  per path; as its quantile among the training snapshot's values of that path (a
  piecewise-linear CDF), from which the network reads which of evenly populated
  bins the value passed; and as the interval it falls in between the path's cuts,
  the levels where the training rewards step (model/splits.py), so a level such as
  "RSI below 30" is one step for it to learn, at its exact place;
- a string (or a boolean) becomes the path token followed by its words, from a
  word-level `tokenizers` vocabulary built on the training snapshot. Where the path
  takes few distinct short values (a status, a channel, an action's name), the
  value seen in training is a category: its own token takes the path token's place,
  so "kyc_status is pending" is one token, not a path and a word to be paired up,
  and its words, which would say the same again, are left out (a value not seen in
  training is its path and its words).

Sequence: [CLS] meta leaves (bot, data type) · input leaves · [SEP] · action leaves.
Segment ids tell context (0) from action (1). A document is a set of leaves, not a
sentence, so a token's place is its place in its leaf (0 for the leaf's first token,
1, 2, ... for its words), and each word also carries the path of its leaf: where a
leaf falls in the sequence (which depends on how many words came before it) says
nothing.
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain

import numpy as np
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

from model import splits

PAD, UNK, CLS, SEP, UNK_PATH = 0, 1, 2, 3, 4
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[UNK_PATH]"]
MAX_WORDS_PER_LEAF = 12
MAX_LEAF_CHARS = 1024  # a leaf's text is cut here before tokenizing (12 words fit)
CACHED_TEXT_CHARS = 128  # word-id cache: texts up to this long ...
CACHE_ENTRIES = 50_000  # ... and this many of them (a few MB at most)
Z_CLIP = 6.0
# id, value, is_num, segment, quantile, place in the leaf, path of the leaf (words),
# interval among the path's cuts (numbers)
Token = tuple[int, float, float, int, float, int, int, int]
QUANTILES = 33  # points of each path's CDF kept from the training values (32 bins)
CATEGORY_CHARS = 64  # a string this short can be a category ...
CATEGORIES_PER_PATH = 64  # ... of a path with at most this many distinct values


def canonical_json(doc) -> str:
    """The one text form of a JSON value: sorted keys, no insignificant whitespace."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def leaves(doc, prefix: str) -> Iterator[tuple[str, object]]:
    """(key path, scalar) pairs in sorted path order; list items share a path."""
    if isinstance(doc, dict):
        for key in sorted(doc):
            yield from leaves(doc[key], f"{prefix}.{key}")
    elif isinstance(doc, list):
        for item in doc:
            yield from leaves(item, f"{prefix}[]")
    else:
        yield prefix, doc


def _is_numeric(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A number the network can take: finite and within float range."""
    if not _is_numeric(v):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond float range
        return False


def _text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return "null" if v is None else str(v)


def _pair_leaves(bot: str, data_type: str, x, action) -> tuple[list, list]:
    meta = {"bot": bot, "data_type": data_type}
    x = x if isinstance(x, dict) else {"_raw": _text(x)}
    action = action if isinstance(action, dict) else {"_raw": _text(action)}
    ctx = [*leaves(meta, "meta"), *leaves(x, "in")]
    return ctx, list(leaves(action, "act"))


@dataclass
class Encoded:
    """A batch of sequences, each (N, max_len)."""

    ids: np.ndarray  # int64 token ids
    nums: np.ndarray  # float32 standardised values (0 where not numeric)
    is_num: np.ndarray  # float32 1.0 on numeric tokens
    segment: np.ndarray  # int64 0 context, 1 action
    quant: np.ndarray  # float32 quantile of the value in [0, 1] (0 where not numeric)
    place: np.ndarray  # int64 place in the leaf: 0 its first token, 1... its words
    leaf: np.ndarray  # int64 on a word: the path token of its leaf (PAD elsewhere)
    cut: np.ndarray  # int64 on a number: how many of its path's cuts it passed (0 elsewhere)


def _word_level(texts: list[str], max_words: int, min_count: int) -> Tokenizer:
    """The word vocabulary of the texts: lower-cased NFKC words seen `min_count` times."""
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=max_words,
        min_frequency=min_count,
        special_tokens=["[UNK]"],
        show_progress=False,
    )
    words.train_from_iterator(texts, trainer=trainer)
    return words


def _categories(
    strings: dict[str, Counter[str]], paths: dict[str, int], min_count: int
) -> dict[str, list[str]]:
    """The kept paths whose few short strings are categories: their values seen
    `min_count` times (paths with none left out)."""
    categories = {
        p: sorted(v for v, c in seen.items() if c >= min_count)
        for p, seen in strings.items()
        if p in paths
        and len(seen) <= CATEGORIES_PER_PATH
        and all(len(v) <= CATEGORY_CHARS for v in seen)
    }
    return {p: v for p, v in categories.items() if v}


def _quantiles(values: list[float]) -> list[float]:
    """The path's CDF as distinct values at evenly spaced quantiles."""
    q = np.quantile(np.asarray(values, np.float64), np.linspace(0, 1, QUANTILES))
    return [float(v) for v in np.unique(q)]


def _collect(by_group: dict, group: tuple[str, str], ctx: list, reward: float) -> None:
    for path, v in ctx:
        if _is_number(v):
            vs, rs = by_group.setdefault(path, {}).setdefault(group, ([], []))
            vs.append(float(v))
            rs.append(reward)


class Featurizer:
    """Vocabulary of key paths and words, and numeric statistics, built from a snapshot."""

    def __init__(
        self,
        paths: dict[str, int],
        num_stats: dict[str, tuple[float, float]],
        words: Tokenizer,
        max_len: int,
        missing_numbers: int = 0,
        quantiles: dict[str, list[float]] | None = None,
        categories: dict[str, list[str]] | None = None,
        words_after_category: bool = True,
        cuts: dict[str, list[float]] | None = None,
    ):
        self.paths = paths
        self.num_stats = num_stats
        self.quantiles = quantiles or {}  # none in artifacts made before quantiles
        self.cuts = cuts or {}  # per path, sorted levels; none in artifacts made before
        self.words = words
        # per path, its category values; none in artifacts made before categories
        self.categories = categories or {}
        self._category_ids: dict[tuple[str, str], int] = {}
        # a category token followed by the value's words (artifacts made before the
        # words were left out) or alone
        self.words_after_category = words_after_category
        offset = self.word_offset + words.get_vocab_size()
        for path in sorted(self.categories):
            for value in self.categories[path]:
                self._category_ids[(path, value)] = offset + len(self._category_ids)
        self.max_len = max_len
        self._word_cache: dict[str, list[int]] = {}
        self.missing_numbers = missing_numbers  # when built: numbers taken as missing

    # -- building --
    @classmethod
    def build(
        cls,
        rows: Iterable[tuple[str, str, object, object]],
        max_len: int = 64,
        min_count: int = 2,
        max_words: int = 5000,
        rewards: Iterable[float] | None = None,
    ) -> Featurizer:
        """Learn paths, numeric statistics and words from (bot, data_type, input, action)
        rows, and with their `rewards` the levels where the rewards step."""
        path_counts: Counter[str] = Counter()
        values: dict[str, list[float]] = {}
        texts: list[str] = []
        strings: dict[str, Counter[str]] = {}
        missing = 0
        # per context path, per (bot, action): its numbers and their rewards
        by_group: dict[str, dict[tuple[str, str], tuple[list, list]]] = {}
        rewards = iter(rewards) if rewards is not None else None
        for bot, data_type, x, action in rows:
            ctx, act = _pair_leaves(bot, data_type, x, action)
            if rewards is not None:
                _collect(by_group, (bot, canonical_json(action)), ctx, float(next(rewards)))
            for path, v in ctx + act:
                path_counts[path] += 1
                if _is_number(v):
                    values.setdefault(path, []).append(float(v))
                elif not _is_numeric(v):
                    texts.append(_text(v))
                    strings.setdefault(path, Counter())[_text(v)] += 1
                else:  # NaN, infinite or beyond float range: missing, not text
                    missing += 1
        kept = sorted(p for p, c in path_counts.items() if c >= min_count)
        paths = {p: len(SPECIALS) + i for i, p in enumerate(kept)}
        stats = {p: (float(np.mean(v)), float(np.std(v)) or 1.0) for p, v in values.items()}
        cuts = {p: splits.path_cuts(g.values()) for p, g in by_group.items() if p in paths}
        return cls(
            paths,
            stats,
            _word_level(texts, max_words, min_count),
            max_len,
            missing,
            {p: _quantiles(v) for p, v in values.items()},
            _categories(strings, paths, min_count),
            words_after_category=False,
            cuts={p: c for p, c in cuts.items() if c},
        )

    @property
    def word_offset(self) -> int:
        return len(SPECIALS) + len(self.paths)

    @property
    def vocab_size(self) -> int:
        return self.word_offset + self.words.get_vocab_size() + len(self._category_ids)

    def category(self, path: str, value) -> int | None:
        """The token of `value` at `path` when it is a category, else None."""
        return self._category_ids.get((path, _text(value)))

    # -- encoding --
    def _word_ids(self, text: str) -> list[int]:
        text = text[:MAX_LEAF_CHARS]  # only the first words are kept: tokenize no more
        ids = self._word_cache.get(text)
        if ids is None:
            unk = self.words.token_to_id("[UNK]")
            ids = [
                UNK if i == unk else self.word_offset + i
                for i in self.words.encode(text).ids[:MAX_WORDS_PER_LEAF]
            ]
            # bounded in bytes: short texts only, and a fixed number of them
            if len(text) <= CACHED_TEXT_CHARS and len(self._word_cache) < CACHE_ENTRIES:
                self._word_cache[text] = ids
        return ids

    def _leaf_tokens(self, path: str, v, seg: int, out: list) -> None:
        pid = self.paths.get(path, UNK_PATH)
        if _is_number(v):
            mean, std = self.num_stats.get(path, (0.0, 1.0))
            z = max(-Z_CLIP, min(Z_CLIP, (float(v) - mean) / std))
            q = self._quantile(path, float(v))
            out.append((pid, z, 1.0, seg, q, 0, PAD, bisect_right(self.cuts.get(path, ()), v)))
        elif _is_numeric(v):  # NaN, infinite or out of range: the value is missing
            out.append((pid, 0.0, 0.0, seg, 0.0, 0, PAD, 0))
        else:
            text = _text(v)
            first = self._category_ids.get((path, text), pid)
            out.append((first, 0.0, 0.0, seg, 0.0, 0, PAD, 0))
            if first != pid and not self.words_after_category:
                return
            words = self._word_ids(text)
            out.extend((w, 0.0, 0.0, seg, 0.0, i, pid, 0) for i, w in enumerate(words, 1))

    def _quantile(self, path: str, v: float) -> float:
        """Where `v` falls among the training values of `path`, in [0, 1]."""
        q = self.quantiles.get(path)
        if not q:
            return 0.5
        if len(q) == 1:  # one value seen: below, at or above it
            return 0.0 if v < q[0] else 1.0 if v > q[0] else 0.5
        i = bisect_right(q, v)  # q[i - 1] <= v < q[i]: linear between the two
        if i == 0 or i == len(q):
            return 0.0 if i == 0 else 1.0
        return (i - 1 + (v - q[i - 1]) / (q[i] - q[i - 1])) / (len(q) - 1)

    def context_tokens(self, bot: str, data_type: str, x) -> list[Token]:
        """[CLS] and the meta and input leaves, cut at `max_len` as they are made: a huge
        input costs no more than the tokens that can be kept."""
        meta = {"bot": bot, "data_type": data_type}
        x = x if isinstance(x, dict) else {"_raw": _text(x)}
        ctx: list = [(CLS, 0.0, 0.0, 0, 0.0, 0, PAD, 0)]
        for path, v in chain(leaves(meta, "meta"), leaves(x, "in")):
            if len(ctx) >= self.max_len:
                break
            self._leaf_tokens(path, v, 0, ctx)
        return ctx[: self.max_len]

    def action_tokens(self, action) -> list[Token]:
        """[SEP] and the action leaves (at most half the sequence)."""
        action = action if isinstance(action, dict) else {"_raw": _text(action)}
        act: list = [(SEP, 0.0, 0.0, 1, 0.0, 0, PAD, 0)]
        for path, v in leaves(action, "act"):
            if len(act) >= self.max_len // 2:
                break
            self._leaf_tokens(path, v, 1, act)
        return act[: self.max_len // 2]

    def join(self, ctx: list, act: list) -> list[Token]:
        """One sequence: the context, cut to leave room for the whole action part."""
        return ctx[: self.max_len - len(act)] + act

    def tokens(self, bot: str, data_type: str, x, action) -> list[Token]:
        """(id, value, is_num, segment, quantile, place, leaf, cut) per token; the
        action part is never truncated."""
        return self.join(self.context_tokens(bot, data_type, x), self.action_tokens(action))

    def encode(self, rows: Iterable[tuple[str, str, object, object]]) -> Encoded:
        """Encode (bot, data_type, input, action) rows into padded arrays."""
        return self.pad([self.tokens(*r) for r in rows])

    def pad(self, seqs: list[list[Token]]) -> Encoded:
        """Token sequences into padded arrays."""
        n, length = len(seqs), self.max_len
        ids = np.zeros((n, length), np.int64)
        nums = np.zeros((n, length), np.float32)
        is_num = np.zeros((n, length), np.float32)
        seg = np.zeros((n, length), np.int64)
        quant = np.zeros((n, length), np.float32)
        place = np.zeros((n, length), np.int64)
        leaf = np.zeros((n, length), np.int64)
        cut = np.zeros((n, length), np.int64)
        for i, seq in enumerate(seqs):
            k = len(seq)
            if k:
                a = np.asarray(seq, dtype=np.float64)
                ids[i, :k], nums[i, :k] = a[:, 0], a[:, 1]
                is_num[i, :k], seg[i, :k], quant[i, :k] = a[:, 2], a[:, 3], a[:, 4]
                place[i, :k], leaf[i, :k], cut[i, :k] = a[:, 5], a[:, 6], a[:, 7]
        return Encoded(ids, nums, is_num, seg, quant, place, leaf, cut)

    # -- persistence (JSON only) --
    def to_json(self) -> str:
        return json.dumps(
            {
                "max_len": self.max_len,
                "paths": self.paths,
                "num_stats": self.num_stats,
                "quantiles": self.quantiles,
                "cuts": self.cuts,
                "categories": self.categories,
                "words_after_category": self.words_after_category,
                "words": json.loads(self.words.to_str()),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> Featurizer:
        d = json.loads(text)
        return cls(
            paths={k: int(v) for k, v in d["paths"].items()},
            num_stats={k: (float(v[0]), float(v[1])) for k, v in d["num_stats"].items()},
            words=Tokenizer.from_str(json.dumps(d["words"])),
            max_len=int(d["max_len"]),
            quantiles={k: [float(x) for x in v] for k, v in d.get("quantiles", {}).items()},
            categories={k: [str(x) for x in v] for k, v in d.get("categories", {}).items()},
            words_after_category=bool(d.get("words_after_category", True)),
            cuts={k: [float(x) for x in v] for k, v in d.get("cuts", {}).items()},
        )

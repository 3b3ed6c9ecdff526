"""The network: a transformer encoder that estimates the reward of an (input, action) pair."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.features import CLS, MAX_WORDS_PER_LEAF, PAD, SEP, Encoded
from model.splits import MAX_CUTS

POSITIONS = ("leaf", "sequence")
# how the context and the action meet: "joint", one encoder over the pair, every token
# attending to every other; "prefix", the same encoder, but the context's tokens do not
# attend to the action's (the action's still read the context's at every layer), and
# the score is read off the action's [SEP]. A prefix network encodes a request's
# context once for all its candidates, and each candidate's tokens alone read it.
INTERACTIONS = ("joint", "prefix")


@dataclass
class ModelConfig:
    """The network's shape; its defaults are today's `small` model. An artifact carries
    its own config: `from_dict` reads one made before a field existed as it was made."""

    vocab_size: int
    max_len: int = 64
    d_model: int = 64  # width of every token
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 128  # hidden width of each feed-forward block
    dropout: float = 0.0
    # bins of each number's quantile, one-hot-like (piecewise linear) into its token;
    # 0: the value alone
    num_bins: int = 32
    # token ids below this are key paths, each with bins and cuts of its own (its
    # levels are its own: RSI 70 is not volatility 0.65); 0: one set of bins shared by
    # all paths, and no cuts
    num_paths: int = 0
    # where a token is: its place in its leaf, and its leaf's path on words ("leaf"), or
    # its index in the sequence ("sequence")
    positions: str = "leaf"
    # beside the [CLS] head, a product of the mean context token and the mean action
    # token (each projected): every context feature times every action feature is one
    # term to learn, as in a factorisation machine
    cross: bool = True
    # intervals between each path's cuts (the levels where the training rewards step),
    # one embedding each per path (used with num_paths)
    num_cuts: int = MAX_CUTS + 1
    # networks of this config trained side by side from their own initial weights,
    # the score their mean
    members: int = 1
    # see INTERACTIONS
    interaction: str = "prefix"

    @classmethod
    def preset(
        cls,
        name: str,
        vocab_size: int,
        max_len: int,
        num_paths: int = 0,
        members: int = 1,
        interaction: str = "prefix",
    ) -> ModelConfig:
        """`small` trains in a minute or two on 2 CPU cores; `large` is meant for GPUs."""
        sizes = {
            "small": {},
            "large": {"d_model": 512, "n_heads": 8, "n_layers": 6, "d_ff": 2048},
        }
        return cls(
            vocab_size,
            max_len,
            num_paths=num_paths,
            members=members,
            interaction=interaction,
            **sizes[name],
        )

    @classmethod
    def from_dict(cls, doc: dict) -> ModelConfig:
        """The config an artifact recorded; a field it lacks takes the value that meant
        "without it" when the artifact was made (they were added one by one)."""
        return cls(**(BEFORE_FIELDS | doc))

    def to_dict(self) -> dict:
        return asdict(self)


# What each field meant in an artifact made before the field existed.
BEFORE_FIELDS = {
    "num_bins": 0,
    "num_paths": 0,
    "positions": "sequence",
    "cross": False,
    "num_cuts": 0,
    "members": 1,
    "interaction": "joint",
}


class RewardModel(nn.Module):
    """tokens → transformer encoder → the head (and the context × action product) →
    expected reward (a scalar). The head reads [CLS] (joint) or the action's [SEP]
    (prefix; see INTERACTIONS)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok = nn.Embedding(cfg.vocab_size, d, padding_idx=PAD)
        if cfg.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}: {cfg.positions!r}")
        if cfg.interaction not in INTERACTIONS:
            raise ValueError(f"interaction must be one of {INTERACTIONS}: {cfg.interaction!r}")
        self.prefix = cfg.interaction == "prefix"
        if self.prefix and cfg.positions != "leaf":  # apart, a sequence index would differ
            raise ValueError("a prefix interaction needs positions 'leaf'")
        if cfg.positions == "leaf":
            self.place = nn.Embedding(MAX_WORDS_PER_LEAF + 1, d)
        else:
            self.pos = nn.Embedding(cfg.max_len, d)
        self.seg = nn.Embedding(2, d)
        # A number's value, standardised per key path, added to its path token.
        self.num = nn.Sequential(nn.Linear(1, d), nn.GELU(), nn.Linear(d, d))
        # Its quantile, as how far it passed each of `num_bins` equally populated bins:
        # crossing a level is a step in one input, which a linear map learns at once.
        self.bins = nn.Linear(cfg.num_bins, d, bias=False) if cfg.num_bins else None
        if cfg.num_bins and cfg.num_paths:  # per path, one row per bin: a weighted sum
            self.path_bins = nn.EmbeddingBag(cfg.num_paths * cfg.num_bins, d, mode="sum")
            nn.init.normal_(self.path_bins.weight, std=cfg.num_bins**-0.5)
        else:
            self.path_bins = None
        # Per path, one row per interval between its cuts, initialised as the tokens
        # are: each side of a level is told apart from the first step, before the
        # smooth paths above learn a ramp in its place.
        if cfg.num_cuts and cfg.num_paths:
            self.cuts = nn.Embedding(cfg.num_paths * cfg.num_cuts, d)
        else:
            self.cuts = None
        layer = nn.TransformerEncoderLayer(
            d,
            cfg.n_heads,
            cfg.d_ff,
            cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        if cfg.cross:
            self.cross_norm = nn.LayerNorm(d)
            self.cross_ctx = nn.Linear(d, d)
            self.cross_act = nn.Linear(d, d, bias=False)

    def _embed(
        self,
        ids: torch.Tensor,
        nums: torch.Tensor,
        is_num: torch.Tensor,
        segment: torch.Tensor,
        quant: torch.Tensor,
        place: torch.Tensor | None,
        leaf: torch.Tensor | None,
        cut: torch.Tensor | None,
        trim: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, segment, token vectors), cut to the longest row's tokens (`trim`)."""
        # ids, segment, place, leaf, cut: (B, T) int64; nums, is_num, quant: (B, T) float
        t = int(ids.ne(PAD).sum(1).max()) if trim else ids.shape[1]
        ids, nums, is_num = ids[:, :t], nums[:, :t], is_num[:, :t]
        segment, quant = segment[:, :t], quant[:, :t]
        b = ids.shape[0]
        x = self.tok(ids) + self.seg(segment)  # (B, T, d)
        if self.cfg.positions == "leaf":
            if place is None or leaf is None:
                raise ValueError("this network needs each token's place and leaf")
            # a word's leaf path through the token table (PAD, elsewhere, is zero)
            x = x + self.place(place[:, :t]) + self.tok(leaf[:, :t])
        else:
            x = x + self.pos(torch.arange(t, device=ids.device).expand(b, t))
        value = self.num(nums.unsqueeze(-1))  # (B, T, d)
        if self.bins is not None:
            k = self.cfg.num_bins
            edges = torch.arange(k, device=ids.device, dtype=quant.dtype)
            passed = (quant.unsqueeze(-1) * k - edges).clamp(0.0, 1.0)  # (B, T, k)
            value = value + self.bins(passed)
            if self.path_bins is not None:  # numbers' tokens are their paths' ids
                path = ids.clamp(max=self.cfg.num_paths - 1).reshape(-1, 1)
                rows = path * k + edges.long()  # (B*T, k): the path's bins
                own = self.path_bins(rows, per_sample_weights=passed.reshape(-1, k))
                value = value + own.view(b, t, -1)
        if self.cuts is not None:  # the interval among its path's cuts
            if cut is None:
                raise ValueError("this network needs each number's interval among its cuts")
            path = ids.clamp(max=self.cfg.num_paths - 1)
            value = value + self.cuts(path * self.cfg.num_cuts + cut[:, :t])
        return ids, segment, x + is_num.unsqueeze(-1) * value  # (B, T, d)

    def forward(self, *x: torch.Tensor) -> torch.Tensor:
        """The score of each joined (context, action) sequence: (B,)."""
        ids, segment, h = self._embed(*_eight(x))
        pad = ids.eq(PAD)
        if self.prefix:  # a context token does not attend to the action's tokens
            blind = segment.unsqueeze(2).lt(segment.unsqueeze(1))  # (B, T, T)
            blind = blind.repeat_interleave(self.cfg.n_heads, 0)
            h = self.encoder(h, mask=blind, src_key_padding_mask=pad)  # (B, T, d)
            sep = ids.eq(SEP).to(torch.int64).argmax(1)
            read = h[torch.arange(len(h), device=h.device), sep]  # (B, d)
        else:
            h = self.encoder(h, src_key_padding_mask=pad)  # (B, T, d)
            read = h[:, 0]
        out = self.head(self.norm(read)).squeeze(-1)  # (B,)
        if self.cfg.cross:
            out = out + self._cross(h, ids, segment)
        return out

    def each(self, *x: torch.Tensor) -> torch.Tensor:
        """The score as a one-member ensemble's: (1, B)."""
        return self(*x).unsqueeze(0)

    # -- a prefix network apart: contexts once, actions once, then the pairs; the same
    # -- scores as forward() on the joined sequences, layer by layer --
    def encode_contexts(self, *x: torch.Tensor) -> Contexts:
        """Context-only sequences ([CLS] and the context's leaves) → each layer's keys
        and values, and the mean of the context's leaf tokens (for the cross term)."""
        ids, _, h = self._embed(*_eight(x))
        valid = ids.ne(PAD)
        keys, values = [], []
        for layer in self.encoder.layers:
            q, k, v = self._qkv(layer, h)
            keys.append(k)
            values.append(v)
            h = self._block(layer, h, q, k, v, valid)
        mean = self._mean(self.cross_norm(h), valid & ids.ne(CLS)) if self.cfg.cross else None
        return Contexts(keys, values, valid, mean)

    def embed_actions(self, *x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Action-only sequences ([SEP] and the action's leaves) → their tokens'
        vectors (K, T, d), untrimmed, and which are tokens (K, T)."""
        ids, _, h = self._embed(*_eight(x), trim=False)
        return h, ids.ne(PAD)

    def score_pairs(
        self,
        ctx: Contexts,
        actions: torch.Tensor,
        valid: torch.Tensor,
        ci: torch.Tensor,
        ai: torch.Tensor,
    ) -> torch.Tensor:
        """The score of each pair (context ci[p], action ai[p]): (P,). `actions`,
        `valid`: embed_actions' output; only the action's tokens go through the layers,
        reading the context's keys and values."""
        h, own = actions[ai], valid[ai]  # (P, Ta, d), (P, Ta)
        both = torch.cat([ctx.valid[ci], own], 1)  # (P, Tc + Ta)
        for layer, k_ctx, v_ctx in zip(self.encoder.layers, ctx.keys, ctx.values, strict=True):
            q, k, v = self._qkv(layer, h)
            k = torch.cat([k_ctx[ci], k], 2)
            v = torch.cat([v_ctx[ci], v], 2)
            h = self._block(layer, h, q, k, v, both)
        out = self.head(self.norm(h[:, 0])).squeeze(-1)
        if self.cfg.cross:  # the action's leaf tokens: all but its [SEP]
            leaf = own.clone()
            leaf[:, 0] = False
            out = out + self._product(ctx.mean[ci], self._mean(self.cross_norm(h), leaf))
        return out

    def _qkv(self, layer: nn.TransformerEncoderLayer, h: torch.Tensor):
        """The layer's queries, keys and values of `h`, by head: (B, H, T, d / H)."""
        b, t, d = h.shape
        heads = self.cfg.n_heads
        attn = layer.self_attn
        qkv = F.linear(layer.norm1(h), attn.in_proj_weight, attn.in_proj_bias)
        return qkv.view(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)

    @staticmethod
    def _block(layer: nn.TransformerEncoderLayer, h, q, k, v, valid) -> torch.Tensor:
        """The rest of a (pre-norm) encoder layer, as nn.TransformerEncoderLayer
        computes it in evaluation: attention over the keys that are tokens (`valid`),
        then the feed-forward block."""
        b, heads, t, dh = q.shape
        read = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        h = h + layer.self_attn.out_proj(read.transpose(1, 2).reshape(b, t, heads * dh))
        return h + layer.linear2(layer.activation(layer.linear1(layer.norm2(h))))

    @staticmethod
    def _mean(g: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """The mean of `g`'s tokens (B, T, d) where `which` (B, T) holds: (B, d)."""
        w = which.unsqueeze(-1).to(g.dtype)
        return (g * w).sum(1) / w.sum(1).clamp(min=1.0)

    def _cross(self, h: torch.Tensor, ids: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
        """<P·mean context token, Q·mean action token>, over the leaves' tokens only."""
        g = self.cross_norm(h)  # (B, T, d)
        leaf = ids.ne(PAD) & ids.ne(CLS) & ids.ne(SEP)
        return self._product(
            self._mean(g, leaf & segment.eq(0)), self._mean(g, leaf & segment.eq(1))
        )

    def _product(self, c: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The cross term of the mean context token `c` and mean action token `a`: (B,)."""
        return (self.cross_ctx(c) * self.cross_act(a)).sum(-1) / c.shape[-1] ** 0.5


@dataclass
class Contexts:
    """Encoded contexts, as a prefix network's pairs read them: per layer, the keys
    and values of their tokens ((B, H, T, d / H) each); which are tokens (B, T); the
    mean of the leaf tokens of the last layer (B, d), for the cross term (or None)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: torch.Tensor
    mean: torch.Tensor | None


def _eight(x: tuple) -> tuple:
    """The network's eight inputs (the last three None when not given)."""
    return (*x, *([None] * (8 - len(x))))


class RewardEnsemble(nn.Module):
    """`cfg.members` networks of one config, each trained on its own loss from its own
    initial weights; the score is their mean. Where one network's decisions near a level
    depend on its seed, the mean's depend on it much less."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.members = nn.ModuleList(RewardModel(cfg) for _ in range(cfg.members))

    def each(self, *x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(*x) for m in self.members])  # (M, B)

    def forward(self, *x: torch.Tensor) -> torch.Tensor:
        return self.each(*x).mean(0)  # (B,)

    @property
    def prefix(self) -> bool:
        return self.cfg.interaction == "prefix"

    def encode_contexts(self, *x: torch.Tensor) -> list[Contexts]:
        return [m.encode_contexts(*x) for m in self.members]

    def embed_actions(self, *x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = [m.embed_actions(*x) for m in self.members]
        return torch.stack([e for e, _ in embedded], 1), embedded[0][1]  # (K, M, T, d)

    def score_pairs(self, ctx: list[Contexts], actions, valid, ci, ai) -> torch.Tensor:
        scores = [
            m.score_pairs(c, actions[:, i], valid, ci, ai)
            for i, (m, c) in enumerate(zip(self.members, ctx, strict=True))
        ]
        return torch.stack(scores).mean(0)


def build(cfg: ModelConfig) -> RewardModel | RewardEnsemble:
    """The network of `cfg`: one RewardModel, or an ensemble of `cfg.members`."""
    if cfg.members < 1:
        raise ValueError(f"members must be at least 1: {cfg.members}")
    return RewardModel(cfg) if cfg.members == 1 else RewardEnsemble(cfg)


def to_tensors(enc: Encoded, reward: np.ndarray | None = None) -> list[torch.Tensor]:
    """The network's inputs from an encoded batch (and the rewards, when given)."""
    out = [
        torch.from_numpy(enc.ids),
        torch.from_numpy(enc.nums),
        torch.from_numpy(enc.is_num),
        torch.from_numpy(enc.segment),
        torch.from_numpy(enc.quant),
        torch.from_numpy(enc.place),
        torch.from_numpy(enc.leaf),
        torch.from_numpy(enc.cut),
    ]
    if reward is not None:
        out.append(torch.as_tensor(reward, dtype=torch.float32))
    return out

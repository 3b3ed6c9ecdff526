"""The network: a transformer encoder that estimates the reward of an (input, action) pair."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from model.features import PAD


@dataclass
class ModelConfig:
    vocab_size: int
    max_len: int = 64
    d_model: int = 64  # width of every token
    n_heads: int = 4
    n_layers: int = 2
    d_ff: int = 128  # hidden width of each feed-forward block
    dropout: float = 0.1

    @classmethod
    def preset(cls, name: str, vocab_size: int, max_len: int) -> ModelConfig:
        """`small` trains in a minute or two on 2 CPU cores; `large` is meant for GPUs."""
        sizes = {
            "small": {},
            "large": {"d_model": 512, "n_heads": 8, "n_layers": 6, "d_ff": 2048},
        }
        return cls(vocab_size=vocab_size, max_len=max_len, **sizes[name])

    def to_dict(self) -> dict:
        return asdict(self)


class RewardModel(nn.Module):
    """tokens → transformer encoder → [CLS] → expected reward (a scalar)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok = nn.Embedding(cfg.vocab_size, d, padding_idx=PAD)
        self.pos = nn.Embedding(cfg.max_len, d)
        self.seg = nn.Embedding(2, d)
        # A number's value, standardised per key path, added to its path token.
        self.num = nn.Sequential(nn.Linear(1, d), nn.GELU(), nn.Linear(d, d))
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

    def forward(
        self, ids: torch.Tensor, nums: torch.Tensor, is_num: torch.Tensor, segment: torch.Tensor
    ) -> torch.Tensor:
        # ids, segment: (B, T) int64; nums, is_num: (B, T) float
        t = int(ids.ne(PAD).sum(1).max())  # drop the padding columns no row uses
        ids, nums, is_num, segment = ids[:, :t], nums[:, :t], is_num[:, :t], segment[:, :t]
        b = ids.shape[0]
        pos = torch.arange(t, device=ids.device).expand(b, t)
        x = self.tok(ids) + self.pos(pos) + self.seg(segment)  # (B, T, d)
        x = x + is_num.unsqueeze(-1) * self.num(nums.unsqueeze(-1))  # (B, T, d)
        h = self.encoder(x, src_key_padding_mask=ids.eq(PAD))  # (B, T, d)
        return self.head(self.norm(h[:, 0])).squeeze(-1)  # (B,)

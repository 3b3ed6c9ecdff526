"""A synthetic world of Valifi bots with a known ground truth.

Each bot sees a context (a JSON document with a `task` sentence beside structured
fields), takes one of a few actions, and earns `true_reward(...) + noise`. The
actions were chosen by an imperfect behaviour policy (a habit, some exploration,
some skill), so a learned policy can do measurably better, and because the reward
function is known, evaluation can compute the true value of any policy, of the
behaviour policy and of the oracle.

Rewards hinge on numbers crossing levels (an RSI above 70, a drawdown above 15%),
like the rewards of the real bots. After `drift_at` the trading regime flips from
mean reversion to momentum. Everything is deterministic for a given seed.

`World(hard=True)` is a harder world over the same contexts: twice as many actions
per bot, most of them parameterised (a size, a horizon, a channel), rewards twice as
noisy, and in every bot one action that is the best in some contexts but that the
behaviour policy almost never tries (its skill ignores it, its exploration picks it
a twentieth as often as the others).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from model.features import canonical_json
from model.snapshot import DATA_TYPES, FORMAT_VERSION, SCHEMA, Manifest, sha256, write_table

Doc = dict

SYMBOLS = ["AAPL", "MSFT", "TSLA", "NVDA", "AMZN", "GOOGL", "META", "JPM"]
REWARD_BOUNDS = (-1.0, 1.0)


def _act(name: str, **extra) -> Doc:
    return {"action": name, **extra}


# --- the bots: contexts, actions, true rewards --------------------------------------


def _trading_context(rng: np.random.Generator) -> Doc:
    symbol = str(rng.choice(SYMBOLS))
    task = str(
        rng.choice(
            [
                f"Analyze {symbol} stock and suggest trade",
                f"Should I buy or sell {symbol} right now?",
                f"Find a trade setup for {symbol}",
            ]
        )
    )
    return {
        "task": task,
        "symbol": symbol,
        "price": round(float(rng.uniform(20, 900)), 2),
        "indicators": {
            "rsi": round(float(rng.uniform(10, 90)), 1),
            "macd": round(float(rng.normal(0, 1)), 3),
            "volatility": round(float(rng.uniform(0.1, 0.8)), 3),
        },
        "sentiment": round(float(rng.uniform(-1, 1)), 3),
    }


def _trading_edge(x: Doc, regime: int) -> float:
    """What a long position earns, by regime."""
    rsi = x["indicators"]["rsi"]
    if regime == 0:  # mean reversion: oversold bounces, overbought falls
        return 0.8 if rsi < 30 else -0.8 if rsi > 70 else 0.5 * x["sentiment"]
    # momentum: overbought keeps rising, oversold keeps falling
    return 0.7 if rsi > 70 else -0.7 if rsi < 30 else 0.3 * x["sentiment"]


def _trading_reward(x: Doc, a: Doc, regime: int) -> float:
    vol = x["indicators"]["volatility"]
    edge = _trading_edge(x, regime)
    size = a.get("size")
    return {
        ("buy", "small"): 0.5 * edge,
        ("buy", "large"): edge - (0.5 if vol > 0.5 else 0.0),
        ("sell", None): -0.6 * edge,
        ("hold", None): 0.05,
    }[(a["action"], size)]


def _stocks_context(rng: np.random.Generator) -> Doc:
    symbol = str(rng.choice(SYMBOLS))
    task = str(
        rng.choice(
            [
                f"Should I invest in {symbol}?",
                f"Evaluate {symbol} fundamentals",
                f"Is {symbol} a good long-term hold?",
            ]
        )
    )
    return {
        "task": task,
        "symbol": symbol,
        "fundamentals": {
            "pe_ratio": round(float(rng.uniform(5, 60)), 1),
            "earnings_surprise": round(float(rng.normal(0, 0.08)), 3),
            "dividend_yield": round(float(rng.uniform(0, 0.05)), 4),
        },
        "analyst_sentiment": round(float(rng.uniform(-1, 1)), 3),
    }


def _stocks_value(f: Doc) -> float:
    """How much a stock is worth buying, from its fundamentals."""
    return (
        0.6 * (f["pe_ratio"] < 15)
        - 0.7 * (f["pe_ratio"] > 40)
        + 0.5 * (f["earnings_surprise"] > 0.05)
        - 0.5 * (f["earnings_surprise"] < -0.05)
    )


def _stocks_reward(x: Doc, a: Doc, regime: int) -> float:
    value = _stocks_value(x["fundamentals"])
    return {
        "recommend_buy": 0.7 * value,
        "recommend_sell": -0.6 * value,
        "recommend_hold": 0.15 - 0.2 * abs(value),
        "research_more": 0.0,
    }[a["action"]]


def _portfolio_context(rng: np.random.Generator) -> Doc:
    task = str(
        rng.choice(
            [
                "Review my portfolio risk",
                "How is my portfolio doing?",
                "Should I rebalance my portfolio?",
            ]
        )
    )
    return {
        "task": task,
        "portfolio": {
            "drawdown": round(float(rng.uniform(0, 0.3)), 3),
            "sharpe": round(float(rng.normal(1.0, 0.6)), 2),
            "concentration": round(float(rng.uniform(0.1, 0.9)), 3),
            "cash_ratio": round(float(rng.uniform(0, 0.5)), 3),
        },
        "positions": int(rng.integers(2, 40)),
    }


def _portfolio_reward(x: Doc, a: Doc, regime: int) -> float:
    p = x["portfolio"]
    return {
        "rebalance": 0.8 * (p["concentration"] > 0.6) - 0.25,
        "hedge": 0.8 * (p["drawdown"] > 0.15) - 0.3,
        "reduce_risk": 0.7 * (p["sharpe"] < 0.5) - 0.2,
        "hold": 0.35 * (p["sharpe"] > 1.2) - 0.05,
    }[a["action"]]


_ONBOARDING_QUESTIONS = {
    "signup": ["How do I create an account?", "What do I need to sign up?"],
    "kyc": ["How do I verify my identity?", "Why is my verification taking so long?"],
    "funding": ["How do I deposit funds?", "Which payment methods can I use?"],
    "first_trade": ["How do I place my first trade?", "Where do I buy my first stock?"],
}


def _onboarding_context(rng: np.random.Generator) -> Doc:
    step = str(rng.choice(list(_ONBOARDING_QUESTIONS)))
    kyc = str(rng.choice(["none", "pending", "verified", "rejected"]))
    return {
        "task": str(rng.choice(_ONBOARDING_QUESTIONS[step])),
        "user": {
            "step": step,
            "kyc_status": kyc,
            "account_age_days": int(rng.integers(0, 120)),
        },
        "channel": str(rng.choice(["app", "web", "chat"])),
    }


def _onboarding_reward(x: Doc, a: Doc, regime: int) -> float:
    u = x["user"]
    stuck = u["kyc_status"] in ("none", "pending")
    return {
        "send_kyc_link": 0.7 if stuck else -0.2,
        "escalate_to_human": 0.8 if u["kyc_status"] == "rejected" else -0.3,
        "show_deposit_guide": (
            0.6 if u["kyc_status"] == "verified" and u["step"] == "funding" else -0.1
        ),
        "show_tutorial": (0.5 if u["step"] in ("signup", "first_trade") and not stuck else 0.0),
    }[a["action"]]


# --- the harder world's actions: parameterised, more of them, one rarely explored ---


def _hard_trading_reward(x: Doc, a: Doc, regime: int) -> float:
    vol = x["indicators"]["volatility"]
    if a["action"] == "hedge":  # the rarely explored one: pays whenever volatility is high
        return 0.85 if vol > 0.65 else -0.4
    if a["action"] == "hold":
        return 0.05
    edge = _trading_edge(x, regime)
    scale = (a["size_pct"] / 50) ** 0.5  # bigger positions: more of the edge ...
    risk = 0.6 * (a["size_pct"] / 50) * (vol > 0.5)  # ... and of the volatility
    if a["action"] == "sell":
        return -0.8 * edge * scale - 0.5 * risk
    if "stop_loss_pct" in a:  # a stop caps the loss of a long position
        return max(edge, -0.25) * scale * 0.8 - 0.5 * risk
    return edge * scale - risk


def _hard_stocks_reward(x: Doc, a: Doc, regime: int) -> float:
    f = x["fundamentals"]
    value = _stocks_value(f)
    name = a["action"]
    if name == "covered_call":  # the rarely explored one: income on a fairly valued payer
        return 0.75 if f["dividend_yield"] > 0.035 and 15 <= f["pe_ratio"] <= 40 else -0.35
    if name == "recommend_buy":
        long = a["horizon_months"] >= 12
        # a long horizon pays on cheap stocks, a short one on earnings surprises
        return 0.7 * value + (0.2 if long == (f["pe_ratio"] < 15) else -0.2)
    if name == "recommend_sell":
        return -0.6 * value
    if name == "recommend_hold":
        return 0.15 - 0.2 * abs(value)
    return 0.0


def _hard_portfolio_reward(x: Doc, a: Doc, regime: int) -> float:
    p = x["portfolio"]
    name = a["action"]
    if name == "raise_cash":  # the rarely explored one
        return 0.8 if p["cash_ratio"] < 0.08 and p["drawdown"] > 0.1 else -0.3
    if name == "rebalance":
        # the tighter cap pays only on a very concentrated portfolio
        tight = a["max_weight_pct"] <= 10
        hit = p["concentration"] > (0.75 if tight else 0.6)
        return (0.95 if tight else 0.7) * hit - 0.25
    if name == "hedge":
        share = a["hedge_pct"] / 50
        return (0.9 * (p["drawdown"] > 0.15) - 0.3) * share + 0.1 * (1 - share)
    if name == "reduce_risk":
        return 0.7 * (p["sharpe"] < 0.5) - 0.2
    return 0.35 * (p["sharpe"] > 1.2) - 0.05


def _hard_onboarding_reward(x: Doc, a: Doc, regime: int) -> float:
    u = x["user"]
    stuck = u["kyc_status"] in ("none", "pending")
    name = a["action"]
    if name == "offer_video_call":  # the rarely explored one
        return 0.9 if u["kyc_status"] == "rejected" and u["account_age_days"] < 30 else -0.35
    if name == "send_kyc_link":
        # a text message works in the app, an e-mail elsewhere
        wrong_way = (a["via"] == "sms") != (x["channel"] == "app")
        return (0.75 if stuck else -0.2) - (0.25 if wrong_way else 0.0)
    if name == "escalate_to_human":
        return 0.6 if u["kyc_status"] == "rejected" else -0.3
    if name == "show_deposit_guide":
        return 0.6 if u["kyc_status"] == "verified" and u["step"] == "funding" else -0.1
    fits = (a["level"] == "advanced") == (u["account_age_days"] > 60)
    return (0.5 if u["step"] in ("signup", "first_trade") and not stuck else 0.0) + (
        0.1 if fits else -0.15
    )


@dataclass(frozen=True)
class Bot:
    name: str
    strategy: str  # trading_bots.strategy in the application's layout
    actions: list[Doc]
    habit: int  # index of the action the behaviour policy falls back on
    data_types: tuple[float, float, float]  # probabilities over DATA_TYPES
    context: Callable[[np.random.Generator], Doc] = field(repr=False)
    reward: Callable[[Doc, Doc, int], float] = field(repr=False)
    rare: int | None = None  # an action the behaviour policy almost never tries


BOTS: dict[str, Bot] = {
    b.name: b
    for b in [
        Bot(
            "trading_advanced",
            "momentum_ai",
            [_act("buy", size="small"), _act("buy", size="large"), _act("sell"), _act("hold")],
            3,
            (0.6, 0.1, 0.3),
            _trading_context,
            _trading_reward,
        ),
        Bot(
            "financial_stocks",
            "dca",
            [
                _act("recommend_buy"),
                _act("recommend_sell"),
                _act("recommend_hold"),
                _act("research_more"),
            ],
            2,
            (0.6, 0.2, 0.2),
            _stocks_context,
            _stocks_reward,
        ),
        Bot(
            "analytics_portfolio",
            "market_making",
            [_act("rebalance"), _act("hedge"), _act("reduce_risk"), _act("hold")],
            3,
            (0.3, 0.3, 0.4),
            _portfolio_context,
            _portfolio_reward,
        ),
        Bot(
            "platform_onboarding",
            "grid",
            [
                _act("send_kyc_link"),
                _act("escalate_to_human"),
                _act("show_deposit_guide"),
                _act("show_tutorial"),
            ],
            3,
            (0.1, 0.8, 0.1),
            _onboarding_context,
            _onboarding_reward,
        ),
    ]
}


def _harder(name: str, actions: list[Doc], habit: int, reward, rare: int) -> Bot:
    """`BOTS[name]` with the harder world's actions and rewards (same contexts)."""
    return replace(BOTS[name], actions=actions, habit=habit, reward=reward, rare=rare)


HARD_BOTS: dict[str, Bot] = {
    b.name: b
    for b in [
        _harder(
            "trading_advanced",
            [
                *(_act("buy", size_pct=p) for p in (5, 20, 50)),
                _act("buy", size_pct=20, stop_loss_pct=5),
                *(_act("sell", size_pct=p) for p in (20, 50)),
                _act("hold"),
                _act("hedge", instrument="put", strike_pct=90),
            ],
            habit=6,
            reward=_hard_trading_reward,
            rare=7,
        ),
        _harder(
            "financial_stocks",
            [
                *(_act("recommend_buy", horizon_months=m) for m in (3, 12, 36)),
                _act("recommend_sell"),
                _act("recommend_hold"),
                _act("research_more"),
                _act("covered_call", strike_pct=105),
            ],
            habit=4,
            reward=_hard_stocks_reward,
            rare=6,
        ),
        _harder(
            "analytics_portfolio",
            [
                *(_act("rebalance", max_weight_pct=w) for w in (10, 25)),
                *(_act("hedge", hedge_pct=h) for h in (20, 50)),
                _act("reduce_risk"),
                _act("hold"),
                _act("raise_cash", target_pct=10),
            ],
            habit=5,
            reward=_hard_portfolio_reward,
            rare=6,
        ),
        _harder(
            "platform_onboarding",
            [
                *(_act("send_kyc_link", via=v) for v in ("email", "sms")),
                _act("escalate_to_human"),
                _act("show_deposit_guide"),
                *(_act("show_tutorial", level=v) for v in ("basic", "advanced")),
                _act("offer_video_call"),
            ],
            habit=4,
            reward=_hard_onboarding_reward,
            rare=6,
        ),
    ]
}
RARE_EXPLORATION = 0.05  # the rare action's weight in exploration, the others' being 1


# --- the world ------------------------------------------------------------------------


@dataclass
class BadRows:
    """Fractions of rows to spoil, for validation tests."""

    null_reward: float = 0.0
    out_of_range: float = 0.0
    malformed: float = 0.0


@dataclass
class World:
    """The generator and its ground truth.

    `behaviour` is the mix of the behaviour policy: (habit, random exploration, skill).
    Skill picks the truly best action, except a bot's rare action; exploration picks
    that one RARE_EXPLORATION times as often as each other. `hard` selects the harder
    world (HARD_BOTS); its noise defaults to 0.5.
    """

    seed: int = 0
    drift_at: datetime | None = None
    noise: float | None = None  # standard deviation of the reward noise; 0.25, hard 0.5
    behaviour: tuple[float, float, float] = (0.45, 0.35, 0.20)
    hard: bool = False
    # generate rows of these bots only (a bot going live, or retired); None: all of them
    only: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.noise is None:
            self.noise = 0.5 if self.hard else 0.25

    @property
    def bots(self) -> dict[str, Bot]:
        return HARD_BOTS if self.hard else BOTS

    # -- ground truth --
    def regime(self, when: datetime | None) -> int:
        return int(self.drift_at is not None and when is not None and when >= self.drift_at)

    def true_reward(self, bot: str, x: Doc, a: Doc, when: datetime | None = None) -> float:
        """Expected reward of action `a` for bot `bot` in context `x` (before noise)."""
        return float(self.bots[bot].reward(x, a, self.regime(when)))

    def rewards(self, bot: str, x: Doc, when: datetime | None = None) -> list[float]:
        """True expected reward of every action of `bot`, in bank order."""
        return [self.true_reward(bot, x, a, when) for a in self.bots[bot].actions]

    def oracle_action(self, bot: str, x: Doc, when: datetime | None = None) -> Doc:
        return self.bots[bot].actions[int(np.argmax(self.rewards(bot, x, when)))]

    def behaviour_value(self, bot: str, x: Doc, when: datetime | None = None) -> float:
        """Expected true reward of the behaviour policy's action in context `x`."""
        b, true = self.bots[bot], self.rewards(bot, x, when)
        habit, explore, skill = self.behaviour
        explored = float(np.dot(self._explore(b), true))
        return habit * true[b.habit] + explore * explored + skill * true[self._skill(b, true)]

    def noisy_reward(self, bot: str, x: Doc, a: Doc, rng: np.random.Generator, when=None):
        """A reward as the world pays it: the true one plus noise, within the bounds."""
        return float(
            np.clip(self.true_reward(bot, x, a, when) + rng.normal(0, self.noise), *REWARD_BOUNDS)
        )

    def _explore(self, bot: Bot) -> np.ndarray:
        w = np.ones(len(bot.actions))
        if bot.rare is not None:
            w[bot.rare] = RARE_EXPLORATION
        return w / w.sum()

    def _skill(self, bot: Bot, true: list[float]) -> int:
        if bot.rare is None:
            return int(np.argmax(true))
        return int(np.argmax([v if i != bot.rare else -np.inf for i, v in enumerate(true)]))

    def policy_value(
        self,
        rows: Iterable[tuple[str, Doc, datetime | None]],
        policy: Callable[[str, Doc], Doc],
    ) -> float:
        """True mean reward of `policy(bot, input) -> action` over (bot, input, when) rows."""
        vals = [self.true_reward(b, x, policy(b, x), w) for b, x, w in rows]
        return float(np.mean(vals)) if vals else float("nan")

    # -- generation --
    def generate(
        self,
        rows: int,
        days: float = 7.0,
        end: datetime | None = None,
        bad: BadRows | None = None,
    ) -> pd.DataFrame:
        """`rows` logged decisions spread over the `days` before `end`, oldest first.

        Columns: id, bot, data_type, input (dict, or str when malformed), action
        (dict), reward (float or NaN), created_at (naive UTC), true_reward.
        """
        rng = np.random.default_rng(self.seed)
        end = end or datetime.now(UTC).replace(tzinfo=None, microsecond=0)
        names = [n for n in self.bots if self.only is None or n in self.only]
        if not names:
            raise ValueError(f"no bot of this world is in {self.only}; bots: {list(self.bots)}")
        explore = {name: self._explore(b) for name, b in self.bots.items()}
        offsets = np.sort(rng.uniform(0, days * 86400, size=rows))[::-1]
        records = []
        for off in offsets:
            bot = self.bots[names[int(rng.integers(len(names)))]]
            when = end - timedelta(seconds=float(off))
            x = bot.context(rng)
            true = self.rewards(bot.name, x, when)
            mode = rng.choice(3, p=self.behaviour)
            explored = int(rng.integers(len(bot.actions)))  # drawn whatever the mode
            if mode == 1 and bot.rare is not None:
                explored = int(rng.choice(len(bot.actions), p=explore[bot.name]))
            k = (bot.habit, explored, self._skill(bot, true))[mode]
            reward = float(np.clip(true[k] + rng.normal(0, self.noise), *REWARD_BOUNDS))
            records.append(
                {
                    "id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                    "bot": bot.name,
                    "data_type": DATA_TYPES[rng.choice(3, p=bot.data_types)],
                    "input": x,
                    "action": bot.actions[k],
                    "reward": round(reward, 4),
                    "created_at": when,
                    "true_reward": true[k],
                }
            )
        df = pd.DataFrame.from_records(records)
        if bad is not None:
            self._spoil(df, bad, rng)
        return df

    @staticmethod
    def _spoil(df: pd.DataFrame, bad: BadRows, rng: np.random.Generator) -> None:
        n = len(df)
        picks = rng.permutation(n)
        k1 = round(bad.null_reward * n)
        k2 = k1 + round(bad.out_of_range * n)
        k3 = k2 + round(bad.malformed * n)
        df["reward"] = df["reward"].astype("float64")
        df.loc[picks[:k1], "reward"] = np.nan
        df.loc[picks[k1:k2], "reward"] = 50.0
        for i in picks[k2:k3]:  # a truncated payload, as a broken client would send it
            df.at[i, "input"] = '{"task": "Analyze ' + str(df.at[i, "id"])[:8]


def behaviour_value(df: pd.DataFrame) -> float:
    """True mean reward of the logged actions (the behaviour policy's value)."""
    return float(df["true_reward"].mean())


def write_snapshot(
    folder: Path,
    rows: int,
    world: World | None = None,
    days: float = 7.0,
    end: datetime | None = None,
    bad: BadRows | None = None,
) -> Path:
    """A snapshot folder (model.snapshot's format, as an export writes it) of `rows`
    rows straight from the generator, without a database; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    world = world or World()
    end = end or datetime.now(UTC).replace(tzinfo=None, microsecond=0)
    df = world.generate(rows, days=days, end=end, bad=bad).iloc[::-1]  # newest first
    created = pa.array(df["created_at"], pa.timestamp("us")).cast(pa.timestamp("us", tz="UTC"))
    table = pa.table(
        {
            "id": df["id"],
            "bot_id": df["bot"],
            "bot": df["bot"],
            "data_type": df["data_type"],
            "input": [x if isinstance(x, str) else canonical_json(x) for x in df["input"]],
            "input_ok": [isinstance(x, dict) for x in df["input"]],
            "action": [canonical_json(a) for a in df["action"]],
            "action_ok": [True] * len(df),
            "reward": df["reward"],
            "created_at": created,
            "propensity": pa.nulls(len(df), pa.float64()),
            "decision": pa.nulls(len(df), pa.string()),
        },
        schema=SCHEMA,
    )
    write_table(folder, table)
    _manifest(df, world, rows, (end - timedelta(days=days), end), sha256(folder)).write(folder)
    return folder


def _manifest(df: pd.DataFrame, world: World, rows: int, window, digest: str) -> Manifest:
    """A generated snapshot's manifest, as the export writes one."""

    def utc(t) -> str:
        return f"{t.isoformat()}+00:00"

    readable = [isinstance(x, dict) for x in df["input"]]
    return Manifest(
        format_version=FORMAT_VERSION,
        rows=len(df),
        null_reward_rows=int(df["reward"].isna().sum()),
        bad_input_rows=readable.count(False),
        bad_action_rows=0,
        window={"since": utc(window[0]), "until": utc(window[1])},
        watermark=utc(df["created_at"].max()) if len(df) else None,
        oldest=utc(df["created_at"].min()) if len(df) else None,
        layout="synthetic",
        table="synthetic",
        columns={},
        query=f"World(seed={world.seed}, hard={world.hard}, only={world.only})",
        limit=rows,
        sha256=digest,
        bots=df["bot"].value_counts().sort_index().to_dict(),
        data_types=df["data_type"].value_counts().sort_index().to_dict(),
        exported_at=datetime.now(UTC).isoformat(),
        trainable_rows=int((df["reward"].notna().to_numpy() & np.array(readable)).sum()),
    )

"""The closed loop, measured: serving → logging → rewards → nightly retraining → gated
promotion → hot swap, day after day, on the synthetic world (true rewards known).

    python3 scripts/bench.py closed_loop [--days 7] [--requests 250] [--worlds default hard]
                                         [--epsilons 0.05] [--no-greedy] [--no-vw]

One stack of its own (embedded PostgreSQL, MLflow, Prefect). For each world and each
loop, a database and a model of its own: day 0 seeds the bots' table with
`--seed-rows` rows (2,000; the hard world 4,000) of the behaviour policy's logs over
the week before and runs the real `train` flow (v1). Then each day every bot sends
`--requests` execute requests to the live agent server, the world draws each reward
from its truth and the bot posts it to `POST /reward`, and the `train` flow runs
(export with the decisions joined, validation, training, the gate, promotion, hot
swap: the server serves the new version before the next day starts). The loops see
the same contexts each day:

- ours with exploration (epsilon-greedy, each `--epsilons` value);
- ours greedy (exploration off: probability 1, no floor);
- Vowpal Wabbit `--cb_explore_adf` (epsilon 0.1, doubly robust, context × action),
  warm-started on the same seed log, learning online from the same stream;
- the behaviour policy and the oracle on those contexts.

Prints per day the true mean reward of the served decisions, the share of the
behaviour→oracle gap closed and the cumulative regret per decision, and, per loop,
what the gate did each night.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np

from model.synthetic import World

NIGHT_ENV = {  # what every nightly run of these loops is told
    "VALIFI_EXPORT_REWARD_WAIT_S": "3600",  # (each night's window ends an hour ahead)
    "VALIFI_EXPORT_LIMIT": "1000000",
    "VALIFI_EXPORT_DAYS": "30",  # every loop trains on its whole log, whenever its night
    "VALIFI_WATCH_WINDOW_S": "0",  # the bench waits for the hot swap itself
    "VALIFI_TRAIN_LOCK_WAIT_S": "600",
}


@dataclass
class Loop:
    """One policy learning in the loop, and what it earned day by day."""

    name: str
    values: list[float] = field(default_factory=list)  # true mean reward per day
    # ours with exploration: the true mean reward of its best-ranked actions per day
    # (what it would have served greedily; the rest of the gap is exploration's cost)
    best: list[float] = field(default_factory=list)
    regret: float = 0.0  # summed over every decision so far
    decisions: int = 0
    nights: list[str] = field(default_factory=list)

    def record(self, true: list[float], oracle: list[float]) -> None:
        self.values.append(float(np.mean(true)))
        self.regret += float(np.sum(np.asarray(oracle) - np.asarray(true)))
        self.decisions += len(true)


# --- ours: the real stack ---------------------------------------------------------------


class Ours(Loop):
    def __init__(self, name: str, env: dict):
        super().__init__(name)
        from valifi.experiments import free_port, start_agent_server

        self.env = env
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = None
        self._start = lambda: start_agent_server(int(self.url.rsplit(":", 1)[1]), env, workers=1)

    def night(self) -> str:
        """One nightly run of the real flow; the hot swap done before it returns."""
        from flows.pipeline import train

        # the day is over and its rewards are in: the window ends one reward wait from
        # now, so that every decision of the day has waited it (the days pass in minutes)
        until = datetime.now(UTC) + timedelta(
            seconds=float(NIGHT_ENV["VALIFI_EXPORT_REWARD_WAIT_S"])
        )
        env = self.env | {"VALIFI_EXPORT_UNTIL": until.isoformat()}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            state = train(return_state=True)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        line = f"{state.name}: {state.message}"
        self.nights.append(line)
        if self.proc is None:
            self.proc = self._start()
        self._wait_serving()
        return line

    def _wait_serving(self) -> None:
        from core.registry import Registry

        want = Registry(self.env["MLFLOW_TRACKING_URI"], self.env["VALIFI_MODEL_NAME"]).champion()
        deadline = time.monotonic() + 120
        while want is not None and time.monotonic() < deadline:
            st = httpx.get(f"{self.url}/status", timeout=10).json()
            if st["versions"] == [want.version]:
                return
            time.sleep(0.5)

    def act(self, bot: str, dt: str, x: dict, client: httpx.Client) -> tuple[dict, str, dict]:
        """(the action served, its decision id, the best-ranked action)"""
        context = {k: v for k, v in x.items() if k != "task"} | {"data_type": dt}
        body = {"task": x["task"], "agent_type": bot, "query_type": "execute", "context": context}
        r = client.post(f"{self.url}/predict", json=body)
        r.raise_for_status()
        answer = r.json()
        result = answer["result"]
        # an explored answer's best-ranked action is the first of its runners-up
        best = result["runners_up"][0]["action"] if answer["explored"] else result["action"]
        return result["action"], answer["decision_id"], best

    def reward(self, decision_id: str, reward: float, client: httpx.Client) -> None:
        """POST /reward; a decision still on its way to the log (404) is tried again."""
        for _ in range(100):
            r = client.post(
                f"{self.url}/reward", json={"decision_id": decision_id, "reward": reward}
            )
            if r.status_code != 404:
                break
            time.sleep(0.1)
        r.raise_for_status()

    def stop(self) -> None:
        from core.processes import stop_group

        if self.proc is not None:
            stop_group(self.proc)


# --- Vowpal Wabbit, online ------------------------------------------------------------


class VWOnline(Loop):
    def __init__(self, world: World, seed_rows, epsilon: float = 0.1, seed: int = 0):
        super().__init__("Vowpal Wabbit --cb_explore_adf")
        import vowpalwabbit

        from model.offpolicy import Behaviour

        self.world, self.rng = world, np.random.default_rng(seed)
        self.vw = vowpalwabbit.Workspace(
            f"--cb_explore_adf --epsilon {epsilon} --cb_type dr -q CA --quiet --random_seed {seed}"
        )
        bots, inputs, actions = zip(*[(b, x, a) for b, _, x, a, _ in seed_rows], strict=True)
        p, _ = Behaviour(bots, inputs, actions).propensity(bots, inputs, actions)
        for (bot, dt, x, a, r), prob in zip(seed_rows, p, strict=True):
            k = world.bots[bot].actions.index(a)
            self.vw.learn(self._lines(bot, dt, x, (k, r, prob)))

    def _lines(self, bot, dt, x, label=None) -> list[str]:
        from policy_bench import _context, _flat, _vw_features

        lines = [f"shared |C {_vw_features(_context(bot, dt, x))}"]
        for i, a in enumerate(self.world.bots[bot].actions):
            tag = f"0:{-label[1]:.6g}:{label[2]:.6g} " if label and label[0] == i else ""
            lines.append(f"{tag}|A {_vw_features(_flat(a, 'act'))}")
        return lines

    def act_and_learn(self, bot: str, dt: str, x: dict, rng: np.random.Generator) -> dict:
        pmf = np.asarray(self.vw.predict(self._lines(bot, dt, x)), float)
        k = int(self.rng.choice(len(pmf), p=pmf / pmf.sum()))
        action = self.world.bots[bot].actions[k]
        reward = self.world.noisy_reward(bot, x, action, rng)
        self.vw.learn(self._lines(bot, dt, x, (k, reward, pmf[k])))
        return action


# --- the days -----------------------------------------------------------------------------


def contexts(world: World, day: int, per_bot: int, seed: int) -> list[tuple[str, str, dict]]:
    """`per_bot` contexts of each bot for one day (the same for every loop)."""
    df = World(seed=seed * 1000 + day, hard=world.hard).generate(
        per_bot * len(world.bots) * 2, days=1
    )
    out, taken = [], dict.fromkeys(world.bots, 0)
    for bot, dt, x in zip(df["bot"], df["data_type"], df["input"], strict=True):
        if taken[bot] < per_bot:
            taken[bot] += 1
            out.append((bot, dt, x))
    return out


def serve_day(loop: Ours, world: World, day_contexts, seed: int) -> list[float]:
    """Every context as an execute request; at the end of the day the world draws each
    reward and the bots post them. Returns the true rewards of the actions served."""
    rng = np.random.default_rng(seed)
    true, owed, best = [], [], []
    with httpx.Client(timeout=60) as client:
        for bot, dt, x in day_contexts:
            action, decision_id, top = loop.act(bot, dt, x, client)
            best.append(world.true_reward(bot, x, top))
            owed.append((decision_id, world.noisy_reward(bot, x, action, rng)))
            true.append(world.true_reward(bot, x, action))
        for decision_id, reward in owed:
            loop.reward(decision_id, reward, client)
    loop.best.append(float(np.mean(best)))
    return true


def seed_log(url: str, world: World, rows: int, start: datetime, seed: int) -> list:
    """The bots' own log of the week before day 1 (the behaviour policy); its rows."""
    from valifi.seed import seed as fill

    w = World(seed=seed, hard=world.hard)
    fill(url, rows, days=7, world=w, end=start, mode="replace")
    df = w.generate(rows, days=7, end=start)
    return list(
        zip(df["bot"], df["data_type"], df["input"], df["action"], df["reward"], strict=True)
    )


def start_loops(args, stack: dict, world: World, name: str) -> tuple[list[Loop], list]:
    """Every loop's database, seed log, day-0 model and server; and the seed log."""
    start = datetime.now(UTC).replace(tzinfo=None, microsecond=0) - timedelta(minutes=5)
    specs = [(f"ours, epsilon {e:g}", {"VALIFI_SERVE_EPSILON": str(e)}) for e in args.epsilons]
    if args.greedy:
        greedy = {"VALIFI_SERVE_EPSILON": "0", "VALIFI_SERVE_MIN_PROBABILITY": "0"}
        specs.append(("ours, greedy", greedy))
    loops: list[Loop] = []
    try:
        seed_rows = _start_ours(args, stack, world, name, specs, start, loops)
    except BaseException:
        for loop in loops:  # each day-0 server started so far
            loop.stop()
        raise
    if args.vw:
        loops.append(VWOnline(world, seed_rows, seed=args.seed))
    return loops, seed_rows


def _start_ours(args, stack, world, name, specs, start, loops: list) -> list:
    """Each of our loops, appended to `loops` as it starts; the seed log's rows."""
    seed_rows = None
    for i, (label, extra) in enumerate(specs):
        db = create_database(stack["pg"], f"loop_{name}_{i}")
        rows = seed_log(db, world, seed_rows_of(args, world), start, seed=args.seed)
        seed_rows = seed_rows or rows
        own = {
            "DATABASE_URL": db,
            "VALIFI_MODEL_NAME": f"closed-loop-{name}-{i}",
            "VALIFI_SERVE_POLL_INTERVAL_S": "1",
        }
        loop = Ours(label, stack["env"] | NIGHT_ENV | extra | own)
        loops.append(loop)
        night = loop.night()
        print(f"[{name}] {label}: day 0 {night}", flush=True)
        if not night.startswith("Completed: promoted"):
            raise SystemExit(f"day 0's model was not promoted, nothing to serve: {night}")
    return seed_rows


def play_day(loop: Loop, world: World, day: int, day_ctx) -> list[float]:
    """One day of one loop: the true rewards of what it served."""
    if isinstance(loop, VWOnline):
        rng = np.random.default_rng(day)
        return [world.true_reward(b, x, loop.act_and_learn(b, dt, x, rng)) for b, dt, x in day_ctx]
    return serve_day(loop, world, day_ctx, seed=day)


def run_world(args, stack: dict, hard: bool) -> None:
    world, name = World(hard=hard), "hard" if hard else "default"
    loops: list[Loop] = []
    behaviour, oracle_v, behaviour_loop = [], [], Loop("behaviour")
    try:
        loops, _ = start_loops(args, stack, world, name)
        for day in range(1, args.days + 1):
            day_ctx = contexts(world, day, args.requests, args.seed)
            oracle = [max(world.rewards(b, x)) for b, _, x in day_ctx]
            logged = [world.behaviour_value(b, x) for b, _, x in day_ctx]
            behaviour.append(float(np.mean(logged)))
            oracle_v.append(float(np.mean(oracle)))
            behaviour_loop.record(logged, oracle)
            for loop in loops:
                loop.record(play_day(loop, world, day, day_ctx), oracle)
                if isinstance(loop, Ours) and day < args.days:
                    print(f"[{name}] {loop.name}: night {day} {loop.night()}", flush=True)
            print(f"[{name}] day {day} done", flush=True)
    finally:
        for loop in loops:
            if isinstance(loop, Ours):
                loop.stop()
    report(name, loops, behaviour, oracle_v, behaviour_loop, args, world)


def seed_rows_of(args, world: World) -> int:
    """The seed log's rows: the hard world's noisier rewards need twice the default's
    for a first model that meets the gate's floors."""
    return args.seed_rows or (4000 if world.hard else 2000)


def report(name, loops, behaviour, oracle, behaviour_loop, args, world) -> None:
    print(
        f"\n## {name} world: {args.requests} requests per bot per day, "
        f"seed log {seed_rows_of(args, world)} rows"
    )
    head = " | ".join(loop.name for loop in loops)
    print(f"| day | {head} | behaviour | oracle |")
    print("|---|" + "---|" * (len(loops) + 2))
    for d in range(len(behaviour)):
        gap = oracle[d] - behaviour[d]
        cells = [_cell(loop, d, behaviour[d], gap) for loop in loops]
        print(f"| {d + 1} | " + " | ".join(cells) + f" | {behaviour[d]:.4f} | {oracle[d]:.4f} |")
    regrets = [f"{loop.regret / max(1, loop.decisions):.4f}" for loop in loops]
    br = behaviour_loop.regret / max(1, behaviour_loop.decisions)
    print("| regret per decision, all days | " + " | ".join(regrets) + f" | {br:.4f} | 0 |")
    print(
        "(the share of the behaviour→oracle gap closed in brackets; `best-ranked`: the true\n"
        "value of the actions the loop ranked first, which it serves when it does not explore)"
    )
    for loop in loops:
        for i, night in enumerate(loop.nights):
            print(f"- {loop.name}, night {i}: {night}")


def _cell(loop: Loop, d: int, behaviour: float, gap: float) -> str:
    cell = f"{loop.values[d]:.4f} ({(loop.values[d] - behaviour) / gap:.2f})"
    if loop.best and loop.best[d] != loop.values[d]:
        cell += f"; best-ranked {loop.best[d]:.4f} ({(loop.best[d] - behaviour) / gap:.2f})"
    return cell


# --- a Challenger in shadow for one day ------------------------------------------------------

# the two challengers: a world to train on (its regime flipped for the worse one: a
# model of a stale regime), how many rows, and the training seed
CHALLENGERS = {
    "worse": ({"seed": 21, "drift_at": datetime(2000, 1, 1)}, 4000),
    "better": ({"seed": 22}, 10_000),
}


def run_shadow(args, stack: dict, hard: bool) -> None:
    """Day 0 as the loops start (the seed log, the first nightly model on Production);
    then each challenger (`CHALLENGERS`: the worse first) on the Challenger alias for one
    day of live traffic, scored in shadow; then what a nightly run does first
    (flows.shadow.settle): promote it, take it off, or leave it. Prints the live DR
    interval beside the true difference of the two exploring policies on the same
    decisions, and the verdict."""
    from core.registry import Registry
    from core.settings import CHALLENGER, Settings
    from flows.shadow import judge, settle

    world, name = World(hard=hard), "hard" if hard else "default"
    start = datetime.now(UTC).replace(tzinfo=None, microsecond=0) - timedelta(minutes=5)
    db = create_database(stack["pg"], f"shadow_{name}")
    seed_log(db, world, seed_rows_of(args, world), start, seed=args.seed)
    model = f"closed-loop-shadow-{name}"
    own = {"DATABASE_URL": db, "VALIFI_MODEL_NAME": model, "VALIFI_SERVE_POLL_INTERVAL_S": "1"}
    # the day's requests come back to back (a day in a minute): no time budget, so that
    # the shadow sees the whole day, as it would at a day's real pace
    own["VALIFI_SERVE_SHADOW_BUDGET"] = "1"
    epsilon = {"VALIFI_SERVE_EPSILON": str(args.epsilons[0])}
    loop = Ours(f"ours, epsilon {args.epsilons[0]:g}", stack["env"] | NIGHT_ENV | epsilon | own)
    registry = Registry(stack["env"]["MLFLOW_TRACKING_URI"], model)
    spec = Settings(_env_file=None).gate
    try:
        print(f"[{name} shadow] day 0 {loop.night()}", flush=True)
        for day, (label, (kind, rows)) in enumerate(CHALLENGERS.items(), start=1):
            version = _challenger(registry, stack, world, label, kind, rows, args.seed)
            registry.promote(version, f"closed-loop bench: the {label} one", alias=CHALLENGER)
            _wait_shadow(loop.url, version)
            since = datetime.now(UTC)
            served = _shadow_day(loop, world, contexts(world, 100 + day, args.requests, args.seed))
            rep = _reported(db, registry, spec, version, since)
            truth = _true_difference(db, version, since, world, served)
            verdict = judge(rep, spec)
            settled = settle(db, registry, spec, "closed-loop bench")
            _print_shadow(name, label, rep, truth, verdict, settled)
    finally:
        loop.stop()


def _challenger(registry, stack, world: World, label: str, kind: dict, rows: int, seed: int):
    """A challenger trained on `rows` rows of the world `kind`, registered; its version."""
    from model.synthetic import write_snapshot
    from valifi.experiments import register, train

    folder = Path(stack["env"]["VALIFI_DATA_DIR"]) / "challengers" / registry.name / label
    snap = write_snapshot(folder / "snapshot", rows, World(hard=world.hard, **kind))
    out = train(snap, folder / "train", seed)
    return register(registry.uri, registry.name, out, snap)


def _wait_shadow(url: str, version: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = httpx.get(f"{url}/status", timeout=10).json()["shadow"]
        if st["state"] == "scoring" and st.get("alias_versions") == [version]:
            return
        time.sleep(0.5)
    raise SystemExit(f"the server did not start scoring v{version} in shadow: {st}")


def _shadow_day(loop: Ours, world: World, day_ctx) -> dict[str, tuple[str, dict]]:
    """One day of requests to the loop's server, one request at a time (the shadow
    scores between them), each reward drawn and posted; decision id -> (bot, input)."""
    rng = np.random.default_rng(len(day_ctx))
    served = {}
    with httpx.Client(timeout=60) as client:
        for bot, dt, x in day_ctx:
            action, decision_id, _ = loop.act(bot, dt, x, client)
            served[decision_id] = (bot, x)
            loop.reward(decision_id, world.noisy_reward(bot, x, action, rng), client)
    return served


def _reported(db, registry, spec, version: str, since: datetime) -> dict:
    """The shadow report once every decision of the day has its shadow row written."""
    from flows.shadow import report

    for _ in range(60):
        rep = report(db, registry, spec, version, since)
        time.sleep(1.0)
        again = report(db, registry, spec, version, since)
        if again["rows"] == rep["rows"]:
            return again
    return again


def _true_difference(db, version: str, since: datetime, world: World, served: dict) -> float:
    """The true value of the Challenger's exploring policy minus Production's, on the
    decisions the report's estimate covers (scored, with a reward)."""
    from core import decisions

    conn = decisions.connect(db, decisions.SHADOW)
    try:
        rows = decisions.shadow_window(conn, version, since, datetime.now(UTC))
    finally:
        conn.close()
    diffs = []
    for r in rows:
        if r["outcome"] != "scored" or r["reward"] is None or r["decision_id"] not in served:
            continue
        bot, x = served[r["decision_id"]]
        diffs.append(
            _policy_value(world, bot, x, r["shadow_ranking"])
            - _policy_value(world, bot, x, r["ranking"])
        )
    return float(np.mean(diffs)) if diffs else float("nan")


def _policy_value(world: World, bot: str, x: dict, ranking: str) -> float:
    """The true value of an exploring policy in one context: its logged probabilities."""
    import json

    return sum(
        c["probability"] * world.true_reward(bot, x, c["action"]) for c in json.loads(ranking)
    )


def _print_shadow(name, label, rep, truth, verdict, settled) -> None:
    dr, v = rep["value"].get("dr"), rep["value"]
    print(f"\n## {name} world: the {label} challenger, v{rep['version']}, one day in shadow")
    print(
        f"- decisions: {rep['rows']} taken up, {rep['counts']['scored']} scored, "
        f"{rep['with_reward']} with a reward; effective sample size {v.get('ess', 0):.0f}; "
        f"first choice the same as Production's {rep['agreement'] or 0:.1%}"
    )
    if dr:
        inside = dr["ci"][0] <= truth <= dr["ci"][1]
        print(
            f"- live DR difference {dr['diff']:+.4f} [{dr['ci'][0]:+.4f}, {dr['ci'][1]:+.4f}]; "
            f"true difference {truth:+.4f}: {'inside' if inside else 'OUTSIDE'} the interval"
        )
    print(f"- verdict: {verdict.outcome}: {verdict.reason}")
    moved = (
        "promoted to Production"
        if settled["promoted"]
        else (
            "taken off the Challenger alias"
            if settled["cleared"]
            else "left on the Challenger alias"
        )
    )
    print(f"- the nightly run's first step: {moved}", flush=True)


# --- the stack -----------------------------------------------------------------------------


def create_database(server_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    base, _, query = server_url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


def up(folder: Path) -> dict:
    """PostgreSQL, MLflow and Prefect of this run's own; the environment that finds them
    (set in this process before Prefect is imported)."""
    from core.settings import Settings
    from valifi import stack
    from valifi.experiments import free_port

    env = {
        "VALIFI_DATA_DIR": str(folder),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
        "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api",
        "PREFECT_HOME": str(folder / "prefect-client"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }
    os.environ.pop("DATABASE_URL", None)
    os.environ.update(env)
    settings = Settings(_env_file=None)
    stack.up(settings)
    return {"env": env, "pg": stack.start_embedded_pg(settings), "settings": settings}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--requests", type=int, default=250, help="execute requests per bot per day")
    p.add_argument(
        "--seed-rows", type=int, help="the bots' log before day 1 (2000; the hard world 4000)"
    )
    p.add_argument("--worlds", nargs="+", default=["default", "hard"])
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.05])
    p.add_argument("--no-greedy", dest="greedy", action="store_false")
    p.add_argument("--no-vw", dest="vw", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shadow",
        action="store_true",
        help="instead of the loops: a worse and a better challenger, one day each in shadow",
    )
    args = p.parse_args()
    # a stopped bench stops its servers and its stack (the finally blocks run)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    folder = Path(tempfile.mkdtemp(prefix="valifi-closed-loop-"))
    stack = up(folder)
    started = time.monotonic()
    try:
        for w in args.worlds:
            (run_shadow if args.shadow else run_world)(args, stack, hard=w == "hard")
    finally:
        from valifi import stack as local

        local.down(stack["settings"])
    print(f"\n{time.monotonic() - started:.0f} s in all; data in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

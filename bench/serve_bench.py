"""The agent server against `mlflow models serve` and against LitServe doing no work.

    python3 scripts/bench.py serve_bench [--seconds 5] [--rounds 2] [--concurrency 1,8,32]

One command, one machine, one promoted version. It starts an MLflow server of its
own, trains and promotes a small model, then starts side by side:

- `valifi serve` with its defaults (2 workers, dynamic batching, the cores shared
  out between the workers), and beside it the same server with the decision log
  and exploration off, and the same server with a Challenger scored in shadow on
  every execute decision (`VALIFI_SERVE_SHADOW_SHARE` 1.0: another training of the
  same size on the `Challenger` alias of a registered model of its own);
- `mlflow models serve` of the same version with as many workers, as shipped (each
  worker's torch on every core) and with `OMP_NUM_THREADS=1` (its best set-up here);
- the same LitServe set-up (request model, workers, batching, middlewares) with a
  no-op model that answers a constant: the framework's ceiling on this machine.

The load comes from `wrk` (Debian package `wrk`: a C client, one thread, keep-alive
connections, which leaves the cores to the servers) when it is installed, else from
a Python client process (asyncio), whose own CPU comes out of the servers' share on
a small machine (`VALIFI_BENCH_PYTHON_CLIENT=1` forces it). It sends the same
requests to each server in turn, round after round, so noise touches all alike:
execute requests for the bots of the synthetic world (mlflow gets the same records
in its `dataframe_records` form), and a mix of four executes to one info question
(ours and the ceiling only: mlflow has no info answers). For each concurrency it
prints req/s, p50 and p99, the CPU each server spent per request, and the ratios.
Targets with the defaults on 2 cores, at 8 and 32 clients: >= 1.5x the better
mlflow throughput at a p99 no higher than its, and >= 0.85x the no-op ceiling.

`--only` with the names in STEPS also starts ours with one of its serving settings
changed, or serving another training of the same rows (VARIANTS: the joint network,
three members), to measure what that setting or model gives side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from valifi.experiments import with_venv_path

ROOT = Path(__file__).resolve().parents[1]

MODEL = "valifi-agent-bench"
MODEL_SHADOW = "valifi-agent-bench-shadow"  # the same Production, and a Challenger
INFO = [
    "What is Valifi?",
    "What is the system status?",
    "List all agents",
    "How do I roll back a model?",
]


# --- the load: a client process of its own --------------------------------------


async def _load(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    import aiohttp

    warmup = min(1.0, seconds / 4)
    done: list[tuple[float, float, int]] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        begin, end = start + warmup, start + warmup + seconds

        async def user(i: int) -> None:
            k = i
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    async with session.post(
                        url, data=bodies[k % len(bodies)], headers=headers
                    ) as r:
                        await r.read()
                        code = r.status
                except (aiohttp.ClientError, TimeoutError):
                    code = 0
                done.append((t0, time.perf_counter(), code))
                k += concurrency

        await asyncio.gather(*(user(i) for i in range(concurrency)))
    window = [(t1 - t0, code) for t0, t1, code in done if begin <= t1 <= end]
    lat = sorted(d for d, _ in window)
    return {
        "rps": len(window) / seconds,
        "p50": 1000 * lat[len(lat) // 2] if lat else float("nan"),
        "p99": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan"),
        "max": 1000 * lat[-1] if lat else float("nan"),
        "n": len(window),
        "all": len(done),
        "failed": sum(1 for _, code in window if code != 200),
    }


def client(spec: dict) -> dict:
    bodies = [json.dumps(b).encode() for b in spec["bodies"]]
    return asyncio.run(_load(spec["url"], bodies, spec["concurrency"], spec["seconds"]))


def run_client(url: str, bodies: list[dict], concurrency: int, seconds: float) -> dict:
    """The load of one cell: `wrk` (a C client that leaves the cores to the servers)
    when it is installed, else the Python client in a process of its own."""
    if shutil.which("wrk") and not os.environ.get("VALIFI_BENCH_PYTHON_CLIENT"):
        return run_wrk(url, bodies, concurrency, seconds)
    spec = {"url": url, "bodies": bodies, "concurrency": concurrency, "seconds": seconds}
    r = subprocess.run(
        [sys.executable, __file__, "--client"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return json.loads(r.stdout)


WRK_SCRIPT = """
local bodies = {%s}
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"},
                    bodies[(i %% #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "VALIFI %%d %%d %%d %%d %%d %%d %%d %%.1f %%.1f %%.1f\\n",
    summary.requests, e.status, e.connect, e.read, e.write, e.timeout,
    summary.duration, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def _lua_string(text: str) -> str:
    """`text` as a Lua long string: [=[...]=] with as many '=' as it needs."""
    level = ""
    while f"]{level}]" in text:
        level += "="
    return f"[{level}[{text}]{level}]"


def run_wrk(url: str, bodies: list[dict], concurrency: int, seconds: float) -> dict:
    """One wrk thread holding `concurrency` keep-alive connections, cycling through
    `bodies`: a second of warm-up, then `seconds` measured."""
    script = WRK_SCRIPT % ", ".join(_lua_string(json.dumps(b)) for b in bodies)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:

        def wrk(length: float) -> str:
            cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(length))}s"]
            cmd += ["--timeout", "60s", "-s", f.name, url]
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

        wrk(min(1.0, seconds / 4))  # warm-up
        return _wrk_summary(wrk(seconds))
    finally:
        os.unlink(f.name)


def _wrk_summary(stdout: str) -> dict:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("VALIFI "))
    n, status, connect, read, write, timeout, duration_us, p50, p99, top = line.split()[1:]
    n, duration = int(n), int(duration_us) / 1e6
    failed = int(status) + int(connect) + int(read) + int(write) + int(timeout)
    return {
        "rps": n / duration,
        "p50": float(p50) / 1000,
        "p99": float(p99) / 1000,
        "max": float(top) / 1000,
        "n": n,
        "all": n,
        "failed": failed,
    }


# --- set-up ---------------------------------------------------------------------


def requests_for(n: int = 64) -> tuple[list[dict], list[dict], list[dict]]:
    """(execute bodies, mlflow records of the same requests, mixed bodies)."""
    from datetime import datetime

    from model.synthetic import World

    df = World(seed=7).generate(n, days=1, end=datetime(2026, 1, 1))
    execute, records = [], []
    for row in df.itertuples():
        context = {k: v for k, v in row.input.items() if k != "task"}
        context["data_type"] = row.data_type
        one = {"task": row.input["task"], "agent_type": row.bot, "context": context}
        execute.append({**one, "query_type": "execute"})
        records.append({"dataframe_records": [one]})
    mixed = []
    for i, body in enumerate(execute):
        mixed.append(body)
        if i % 4 == 3:
            mixed.append({"task": INFO[(i // 4) % len(INFO)]})
    return execute, records, mixed


def worst_cases(execute: dict) -> dict[str, dict]:
    """Requests at the limits of what is accepted (under the 64 KiB default body)."""
    base = {k: v for k, v in execute.items() if k != "context"}
    ctx = execute["context"]
    return {
        "typical": execute,
        "4000 values": {**base, "context": {**ctx, "v": list(range(3990))}},
        "60 KB of text": {**base, "context": {**ctx, "note": "word " * 12000}},
        "64 candidates": {
            **base,
            "context": {
                **ctx,
                "candidates": [{"action": f"a{i}", "x": "y" * 900} for i in range(64)],
            },
        },
        "depth 16": {**base, "context": {**ctx, "d": _nested(14)}},
    }


def _nested(depth: int) -> dict:
    doc: dict = {"leaf": 1.0}
    for i in range(depth):
        doc = {f"k{i}": doc, "pad": list(range(50))}
    return doc


def measure_worst(url: str, pid: int, execute: dict, seconds: float) -> None:
    """One client sending one kind of request at a time: latency and server CPU each."""
    print(
        f"\n{'request (valifi serve, 1 client)':<34} {'bytes':>6} {'p50 ms':>7} {'max ms':>7} "
        f"{'CPU ms/req':>11} {'status':>6}"
    )
    for name, body in worst_cases(execute).items():
        before = cpu_seconds(pid)
        r = run_client(url, [body], 1, seconds)
        after = cpu_seconds(pid)
        cpu = 1000 * sum(after[k] - before[k] for k in after) / max(1, r["all"])
        status = "ok" if r["failed"] == 0 else f"{r['failed']} not 200"
        print(
            f"{name:<34} {len(json.dumps(body)):>6} {r['p50']:7.1f} {r['max']:7.1f} "
            f"{cpu:11.2f} {status:>6}"
        )


def train_and_promote(uri: str, root: Path, variants: tuple[str, ...] = ()) -> str:
    """A small model (1,500 synthetic rows, 2 epochs) trained, registered and promoted;
    registered and promoted as MODEL_SHADOW too, with another training of the same
    size (another seed) as its Challenger; and for each of `variants` (names in
    VARIANTS), the same training with that variant's options, promoted under its
    own model name."""
    from core.registry import Registry
    from core.settings import CHALLENGER
    from model.synthetic import World, write_snapshot
    from valifi.experiments import register, train

    snap = write_snapshot(root / "snap", 1500, World(seed=1))
    out = train(snap, root / "train", 1, "--max-epochs", "2")
    version = register(uri, MODEL, out, snap)
    Registry(uri, MODEL).promote(version, "serving benchmark")
    shadowed = Registry(uri, MODEL_SHADOW)
    shadowed.promote(register(uri, MODEL_SHADOW, out, snap), "serving benchmark")
    other = write_snapshot(root / "snap2", 1500, World(seed=2))
    challenger = register(
        uri, MODEL_SHADOW, train(other, root / "train2", 2, "--max-epochs", "2"), other
    )
    shadowed.promote(challenger, "serving benchmark", alias=CHALLENGER, action="shadow")
    for name in variants:
        model, options = VARIANTS[name]
        out = train(snap, root / model, 1, "--max-epochs", "2", *options)
        Registry(uri, model).promote(register(uri, model, out, snap), "serving benchmark")
    return version


def wait_until(url: str, body: dict, deadline_s: float = 180) -> None:
    import httpx

    deadline, last = time.monotonic() + deadline_s, "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url, json=body, timeout=10)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:500]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer 200 within {deadline_s:.0f} s; last: {last}")


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=with_venv_path({**os.environ, **env}),  # mlflow runs `uvicorn` from PATH
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


# --- the run --------------------------------------------------------------------


def servers(ports: dict[str, int], workers: int, data_dir: Path, db: str) -> dict[str, list]:
    """name -> [command, extra environment, predict URL]. Ours logs every decision to
    the database `db` and explores (its defaults); OFF does neither."""
    from valifi.experiments import mlflow_serve_command

    ours = {"VALIFI_MODEL_NAME": MODEL, "VALIFI_DATA_DIR": str(data_dir), "DATABASE_URL": db}
    off = ours | {
        "VALIFI_SERVE_LOG_DECISIONS": "false",
        "VALIFI_SERVE_EPSILON": "0",
        "VALIFI_SERVE_MIN_PROBABILITY": "0",
    }
    url = "http://127.0.0.1:{}/{}".format

    def valifi(name: str, env: dict) -> list:
        cmd = [sys.executable, "-m", "valifi.cli", "serve", "--port", str(ports[name])]
        return [cmd, env, url(ports[name], "predict")]

    shadow = ours | {"VALIFI_MODEL_NAME": MODEL_SHADOW, "VALIFI_SERVE_SHADOW_SHARE": "1.0"}
    return {
        "valifi serve": valifi("valifi serve", ours),
        OFF: valifi(OFF, off),
        SHADOW: valifi(SHADOW, shadow),
        **{name: valifi(name, ours | env) for name, env in STEPS.items()},
        "mlflow models serve": [
            mlflow_serve_command(MODEL, ports["mlflow models serve"], workers),
            {},
            url(ports["mlflow models serve"], "invocations"),
        ],
        "mlflow, 1 thread/worker": [
            mlflow_serve_command(MODEL, ports["mlflow, 1 thread/worker"], workers),
            {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
            url(ports["mlflow, 1 thread/worker"], "invocations"),
        ],
        "no-op LitServe": [
            [
                sys.executable,
                str(ROOT / "bench" / "noop_server.py"),
                "127.0.0.1",
                str(ports["no-op LitServe"]),
            ],
            ours,
            url(ports["no-op LitServe"], "predict"),
        ],
    }


def cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds so far of a server's processes: the spawned workers, and the rest
    (for LitServe the HTTP process and the queue manager; mlflow's uvicorn workers
    answer HTTP and predict both)."""
    import psutil

    out = {"workers": 0.0, "rest": 0.0}
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            t, cmd = proc.cpu_times(), " ".join(proc.cmdline())
        except psutil.Error:
            continue
        out["workers" if "spawn_main" in cmd else "rest"] += t.user + t.system
    return out


def measure(args, table: dict, started: dict, bodies: dict, procs: dict) -> None:
    for mix in args.mixes:
        for c in args.concurrency:
            for _ in range(args.rounds):
                for name, (_, _, url) in started.items():
                    mlflow = name.startswith("mlflow")
                    if mix == "mixed" and mlflow:
                        continue
                    which = "records" if mlflow else mix
                    before = cpu_seconds(procs[name].pid)
                    r = run_client(url, bodies[which], c, args.seconds)
                    after = cpu_seconds(procs[name].pid)
                    for role in before:  # CPU ms per request, warm-up included
                        r[f"cpu_{role}"] = 1000 * (after[role] - before[role]) / max(1, r["all"])
                    table.setdefault((mix, c, name), []).append(r)
                    print(
                        f"  {mix:<8} c={c:<3} {name:<24} {r['rps']:7.1f} req/s "
                        f"p50 {r['p50']:6.1f} ms p99 {r['p99']:6.1f} ms failed {r['failed']} "
                        f"CPU/req {r['cpu_workers']:.2f} + {r['cpu_rest']:.2f} ms",
                        flush=True,
                    )


def combine(runs: list[dict]) -> dict:
    """Rounds of one cell: median req/s and latencies, failures added up."""
    return {
        "rps": statistics.median(r["rps"] for r in runs),
        "p50": statistics.median(r["p50"] for r in runs),
        "p99": statistics.median(r["p99"] for r in runs),
        "failed": sum(r["failed"] for r in runs),
        "cpu": statistics.median(r["cpu_workers"] + r["cpu_rest"] for r in runs),
        "cpu_workers": statistics.median(r["cpu_workers"] for r in runs),
    }


OFF = "valifi serve, no log, greedy"
SHADOW = "valifi serve, shadow 1.0"
# ours with one serving setting changed (the queues back to LitServe's own, the
# access log off, answers rendered by FastAPI, the decision log writing each decision
# as it comes): what each gives, side by side (measured only when named in --only)
STEPS = {
    "valifi serve, LitServe queues": {"VALIFI_SERVE_TRANSPORT": "litserve"},
    "valifi serve, no access log": {"VALIFI_SERVE_ACCESS_LOG": "false"},
    "valifi serve, answers rendered in HTTP": {"VALIFI_SERVE_RENDER": "http"},
    # the decision log's writer taking each decision as it comes, as it did before
    # batches waited for their rest
    "valifi serve, log flush 1 ms": {"VALIFI_SERVE_LOG_FLUSH_S": "0.001"},
}
# ours serving another training of the same rows: its model name and training options
VARIANTS = {
    # every (context, candidate) pair through the whole encoder, as before the prefix
    "valifi serve, joint network": ("valifi-agent-bench-joint", ["--interaction", "joint"]),
    "valifi serve, 3 members": ("valifi-agent-bench-members", ["--members", "3"]),
}
STEPS |= {name: {"VALIFI_MODEL_NAME": model} for name, (model, _) in VARIANTS.items()}
NAMES = (
    "valifi serve",
    OFF,
    SHADOW,
    *STEPS,
    "mlflow models serve",
    "mlflow, 1 thread/worker",
    "no-op LitServe",
)


def _cost(what: str, with_it: dict, without: dict) -> None:
    """What one feature costs, from the same server's cells with it and without."""
    print(
        f"{'':<14}{what} {1 - with_it['rps'] / without['rps']:+.1%} of the throughput, p99 "
        f"{with_it['p99'] / without['p99'] - 1:+.1%} (target: within 10%)"
    )


def report(table: dict, concurrency: list[int], mixes: list[str]) -> bool:
    cells = {k: combine(v) for k, v in table.items()}
    print(
        f"\n{'mix':<8} {'conc':>4}  {'server':<24} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'failed':>6} {'CPU ms/req':>11}  {'vs mlflow':>9} {'vs no-op':>8}"
    )
    met = True
    for mix in mixes:
        for c in concurrency:
            ours, noop = cells[(mix, c, "valifi serve")], cells.get((mix, c, "no-op LitServe"))
            ml = [
                cells[(mix, c, n)] for n in NAMES if n.startswith("mlflow") and (mix, c, n) in cells
            ]
            best = max(ml, key=lambda r: r["rps"]) if ml else None
            for name in NAMES:
                if (mix, c, name) not in cells:
                    continue
                r = cells[(mix, c, name)]
                cpu = f"{r['cpu']:.2f}" + (
                    f" ({r['cpu_workers']:.2f})" if not name.startswith("mlflow") else ""
                )
                vs_ml = f"{r['rps'] / best['rps']:.2f}x" if best else "n/a"
                vs_noop = f"{r['rps'] / noop['rps']:.2f}x" if noop else "n/a"
                print(
                    f"{mix:<8} {c:>4}  {name:<24} {r['rps']:7.1f} {r['p50']:7.1f} "
                    f"{r['p99']:7.1f} {r['failed']:>6} {cpu:>11}  {vs_ml:>9} {vs_noop:>8}"
                )
            if best and noop and c > 1:
                ok = (
                    ours["rps"] >= 1.5 * best["rps"]
                    and ours["p99"] <= best["p99"]
                    and ours["rps"] >= 0.85 * noop["rps"]
                )
                met &= ok
                print(
                    f"{'':<14}targets (>= 1.5x the better mlflow at p99 <= its, >= 0.85x no-op): "
                    f"{'met' if ok else 'NOT met'}"
                )
            if off := cells.get((mix, c, OFF)):
                _cost("the decision log and exploration cost", ours, off)
            if shadow := cells.get((mix, c, SHADOW)):
                _cost("the shadow (share 1.0) costs", shadow, ours)
                met &= shadow["failed"] == 0
            met &= ours["failed"] == 0
    print(
        "\nCPU ms/req: all the server's processes over the client run, per request; in\n"
        "brackets the inference workers' share (the rest: HTTP process and queue manager)."
    )
    return met


def _names(text: str) -> set[str]:
    """Server names from `--only` (names may hold commas: matched against NAMES)."""
    wanted = {n for n in NAMES if n in text}
    if not wanted:
        raise SystemExit(f"--only names none of: {', '.join(NAMES)}")
    return wanted


def profile(name: str, url: str, pid: int, bodies: list[dict], seconds: float) -> None:
    """Sample every process of a server with py-spy while 32 clients load it; print
    where each kind of process spends its samples (the function on top of the stack,
    and the share of samples under a few functions of interest)."""
    import threading

    spy = shutil.which("py-spy") or shutil.which("py-spy", path=Path(sys.executable).parent)
    if spy is None:
        print("\n(no profile: py-spy is not installed; pip install py-spy)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "stacks.txt"
        cmd = [spy, "record", "--format", "raw", "--subprocesses", "--nonblocking"]
        cmd += ["--rate", "200", "-d", str(round(seconds + 2)), "-o", str(out), "--pid", str(pid)]
        recorder = threading.Thread(
            target=subprocess.run, args=(cmd,), kwargs={"capture_output": True}
        )
        recorder.start()
        time.sleep(1.0)
        run_client(url, bodies, 32, seconds)
        recorder.join()
        lines = out.read_text().splitlines() if out.exists() else []
    print(f"\nwhere {name} spends its CPU under 32 clients (py-spy samples, all threads):")
    _print_profile(lines)


def _print_profile(lines: list[str]) -> None:
    """py-spy's raw stacks ('frame;frame;... count') by kind of process: the functions
    on top of the stack, and the share of samples under each of INTERESTING."""
    from collections import Counter

    tops: dict[str, Counter] = {}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        own = [f for f in frames if f.startswith("process ")][-1:] or ["process ?:"]
        # the spawned inference workers together; the server, its forked HTTP process and
        # LitServe's queue manager (the same command line) each by its pid
        role = "inference workers" if "spawn_main" in own[0] else own[0].split(":")[0]
        tops.setdefault(role, Counter())[_frame(frames[-1])] += int(count)
        for key in INTERESTING:
            if key in stack:
                tops[role][f"  under {key}"] += int(count)
    for role, counts in sorted(tops.items()):
        total = sum(v for k, v in counts.items() if not k.startswith("  under"))
        print(f"  {role}: {total} samples")
        for key, v in sorted(counts.items(), key=lambda kv: -kv[1])[:18]:
            print(f"    {100 * v / max(1, total):5.1f}%  {key}")


# functions whose share (everything below them) the profile prints
INTERESTING = (
    "decide ",
    "rank_many",
    "_score ",
    "forward ",
    "put_response",
    "collate_requests",
    "_decision (decision.py",  # an answer and its decision record from a ranking
    "decision_log.py",  # the decision log: its queue and its writer thread
    "insert (decisions.py",  # the writer's transactions
    "write_status",
    "jsonable_encoder",
    "PredictMetricsMiddleware",
    "serialize_response",
    "solve_dependencies",
    "_feed (queues.py",  # the pipes' feeder threads (serving.transport)
    "read (transport.py",  # the HTTP process's reader of answers
)


def _frame(frame: str) -> str:
    """'function (path/file.py:line)' as 'function (file.py)'."""
    fn, _, where = frame.partition(" (")
    return f"{fn} ({Path(where.split(':')[0]).name})" if where else fn


def print_shadow(predict_url: str) -> None:
    """What the shadow scored under the load, from the server's /status."""
    import httpx

    st = httpx.get(predict_url.rsplit("/", 1)[0] + "/status", timeout=10).json()["shadow"]
    print(f"\nshadow over the whole run: {st.get('summary')}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per cell")
    p.add_argument("--rounds", type=int, default=2, help="passes over every server")
    p.add_argument("--concurrency", default="1,8,32", help="client connections, comma-separated")
    p.add_argument("--mixes", default="execute,mixed", help="request mixes, comma-separated")
    p.add_argument("--workers", type=int, default=2, help="mlflow workers (ours: its default)")
    p.add_argument("--worst-only", action="store_true", help="only the requests at the limits")
    p.add_argument(
        "--profile",
        action="store_true",
        help="last, where ours and the no-op spend their CPU under 32 clients (py-spy)",
    )
    p.add_argument(
        "--only",
        help="these servers alone, comma-separated (e.g. 'valifi serve,valifi serve, shadow "
        "1.0' to measure the shadow's cost): names as printed",
    )
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        print(json.dumps(client(json.loads(sys.stdin.read()))))
        return 0
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.mixes = args.mixes.split(",")

    # an MLflow server and data folder of this run's own
    from core.settings import Settings

    procs: dict[str, subprocess.Popen] = {}
    data = Path(tempfile.mkdtemp(prefix="valifi-serve-bench-"))
    db_settings = Settings(_env_file=None, data_dir=data / "db")
    try:
        return run(args, data, db_settings, procs)
    finally:  # after the tracking server has stopped: its files are under `data`
        if not os.environ.get("VALIFI_KEEP_BENCH_DATA"):
            shutil.rmtree(data, ignore_errors=True)


def run(args, data: Path, db_settings, procs: dict) -> int:
    from core.processes import stop_group
    from valifi import stack as local
    from valifi.experiments import free_port, own_mlflow

    with own_mlflow(data / "stack") as uri:
        try:
            wanted = _names(args.only) if args.only else set(NAMES) - set(STEPS)
            print(f"training and promoting a model in {uri} ...", flush=True)
            version = train_and_promote(
                uri, data / "train", tuple(n for n in VARIANTS if n in wanted)
            )
            execute, records, mixed = requests_for()
            bodies = {"execute": execute, "records": records, "mixed": mixed}
            ports = {n: free_port() for n in NAMES}
            db = local.start_embedded_pg(db_settings)  # the decision log's database
            started = servers(ports, args.workers, data / "serve", db)
            started = {n: v for n, v in started.items() if n in wanted}
            logs = data / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            for name, (cmd, env, _) in started.items():
                procs[name] = start(cmd, env, logs / f"{ports[name]}.log")
            for name, (_, _, url) in started.items():
                wait_until(url, records[0] if name.startswith("mlflow") else execute[0])
            print(f"v{version} served by every server; cores: {os.cpu_count()}", flush=True)
            ours = "valifi serve"
            if not args.worst_only:
                table: dict = {}
                measure(args, table, started, bodies, procs)
                met = report(table, args.concurrency, args.mixes)
                print(f"\ntargets {'met' if met else 'NOT met'}")
                if SHADOW in started:
                    print_shadow(started[SHADOW][2])
            measure_worst(started[ours][2], procs[ours].pid, execute[0], args.seconds)
            if args.profile:
                for name in (ours, "no-op LitServe"):
                    if name in started:
                        profile(name, started[name][2], procs[name].pid, execute, args.seconds)
            return 0
        finally:
            for proc in procs.values():
                stop_group(proc)
            local.stop_embedded_pg(db_settings)


if __name__ == "__main__":
    sys.exit(main())

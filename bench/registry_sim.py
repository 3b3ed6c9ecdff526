"""N agent-server replicas polling one MLflow server for the Production alias.

    python3 scripts/bench.py registry_sim [--replicas 1 10 30 100] [--intervals 10 1] [--seconds 20]

Starts an MLflow tracking server of its own (as `valifi stack` does), registers a
model with two versions and points `Production` at the first. Each simulated
replica is what an agent server's alias follower does: every poll interval (first poll at
a random phase) it asks the registry which version `Production` names, with the
same REST call MLflow's client makes. For each replica count and interval it
prints the registry's request rate, the lookup latency (p50, p99, max) and, after
the alias is moved mid-run, how long until every replica had seen the move (model
download and load come on top of that; the serving bench measures them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

MODEL = "valifi-registry-sim"


async def replica(client, url, interval, stop, latencies, seen, moved_at):
    await asyncio.sleep(random.uniform(0, interval))
    params = {"name": MODEL, "alias": "Production"}
    while time.monotonic() < stop:
        t = time.monotonic()
        try:
            r = await client.get(f"{url}/api/2.0/mlflow/registered-models/alias", params=params)
            r.raise_for_status()
        except httpx.HTTPError:  # a follower logs it and polls again
            seen.setdefault("errors", 0)
            seen["errors"] += 1
            await asyncio.sleep(interval)
            continue
        latencies.append(time.monotonic() - t)
        version = r.json()["model_version"]["version"]
        if version == "2" and moved_at[0] is not None:
            seen.setdefault(asyncio.current_task().get_name(), time.monotonic() - moved_at[0])
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - t)))


async def level(url, n, interval, seconds, mover) -> dict:
    latencies: list[float] = []
    seen: dict[str, float] = {}
    moved_at: list[float | None] = [None]
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        start = time.monotonic()
        stop = start + seconds + interval
        mover(1)
        tasks = [
            asyncio.create_task(
                replica(client, url, interval, stop, latencies, seen, moved_at), name=f"r{i}"
            )
            for i in range(n)
        ]
        await asyncio.sleep(seconds / 2)
        mover(2)
        moved_at[0] = time.monotonic()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - start
    errors = seen.pop("errors", 0)
    lat = np.array(latencies or [np.nan]) * 1000
    return {
        "rate": len(latencies) / elapsed,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "max": float(lat.max()),
        "converged": max(seen.values()) if len(seen) == n else float("nan"),
        "saw": len(seen),
        "errors": errors,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 10, 30, 100])
    p.add_argument("--intervals", type=float, nargs="+", default=[10.0, 1.0])
    p.add_argument("--seconds", type=float, default=20.0, help="per level, before the tail")
    args = p.parse_args()

    from mlflow import MlflowClient
    from valifi.experiments import own_mlflow

    with tempfile.TemporaryDirectory(prefix="valifi-registry-sim-") as tmp, own_mlflow(tmp) as url:
        client = MlflowClient(url)
        client.create_registered_model(MODEL)
        run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
        for _ in range(2):  # versions need no files to be named by an alias
            client.create_model_version(
                MODEL, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
            )

        def move(version: int) -> None:
            client.set_registered_model_alias(MODEL, "Production", str(version))

        print(f"MLflow at {url} (1 worker); cores: {os.cpu_count()}")
        print("| replicas | poll s | req/s | p50 ms | p99 ms | max ms | all saw it | failed |")
        print("|---|---|---|---|---|---|---|---|")
        for interval in args.intervals:
            for n in args.replicas:
                r = asyncio.run(level(url, n, interval, args.seconds, move))
                print(
                    f"| {n} | {interval:g} | {r['rate']:.1f} | {r['p50']:.1f} | {r['p99']:.1f} "
                    f"| {r['max']:.1f} | {r['converged']:.2f} s ({r['saw']}/{n}) "
                    f"| {r['errors']} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

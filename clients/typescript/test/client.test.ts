/**
 * The client against live agent servers, started here with `valifi serve`: one that
 * serves a promoted model and one whose model has no `Production` version yet.
 *
 * The registry comes from the environment (MLFLOW_TRACKING_URI, VALIFI_TEST_MODEL
 * with a Production alias, VALIFI_TEST_EMPTY_MODEL without), as the project's test
 * suite sets it; without them, `python -m tests.client_fixture` starts an MLflow
 * server of its own and trains and promotes a small model first (a minute or two).
 * VALIFI_PYTHON: the Python with the project installed (default: ../../.venv).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { createServer } from "node:net";
import { dirname, resolve } from "node:path";
import { createInterface } from "node:readline";
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";

import {
  ValifiClient,
  ValifiConnectionError,
  ValifiRequestError,
  ValifiUnavailableError,
} from "../src/index.js";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
const PYTHON = process.env.VALIFI_PYTHON ?? resolve(ROOT, ".venv/bin/python");
const children: ChildProcess[] = [];
let fixture: ChildProcess | undefined; // the registry of our own, when none is given

function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => ok(port));
    });
    srv.on("error", fail);
  });
}

function start(args: string[], env: Record<string, string>): ChildProcess {
  const child = spawn(PYTHON, args, {
    cwd: ROOT,
    env: { ...process.env, ...env },
    detached: true, // its own process group: stopped whole in after()
    stdio: ["pipe", "pipe", "inherit"],
  });
  children.push(child);
  return child;
}

async function registry(): Promise<Record<string, string>> {
  const given = process.env.MLFLOW_TRACKING_URI && process.env.VALIFI_TEST_MODEL;
  if (given) {
    return {
      MLFLOW_TRACKING_URI: process.env.MLFLOW_TRACKING_URI!,
      model: process.env.VALIFI_TEST_MODEL!,
      empty: process.env.VALIFI_TEST_EMPTY_MODEL ?? `${process.env.VALIFI_TEST_MODEL}-none`,
    };
  }
  fixture = start(["-m", "tests.client_fixture"], {});
  const line = await new Promise<string>((ok, fail) => {
    const lines = createInterface({ input: fixture!.stdout! });
    lines.on("line", (l) => l.startsWith('{"tracking_uri"') && ok(l));
    fixture!.once("exit", (code) => fail(new Error(`tests.client_fixture exited ${code}`)));
  });
  const info = JSON.parse(line) as { tracking_uri: string; model: string; empty_model: string };
  return { MLFLOW_TRACKING_URI: info.tracking_uri, model: info.model, empty: info.empty_model };
}

async function serve(model: string, uri: string): Promise<string> {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  const server = start(["-m", "valifi.cli", "serve", "--port", String(port), "--workers", "1"], {
    MLFLOW_TRACKING_URI: uri,
    VALIFI_MODEL_NAME: model,
    VALIFI_SERVE_POLL_INTERVAL_S: "1",
  });
  const client = new ValifiClient({ baseUrl: url, timeoutMs: 2000 });
  const deadline = Date.now() + 180_000;
  while (!(await client.health())) {
    assert.equal(server.exitCode, null, "the server exited during start-up");
    assert.ok(Date.now() < deadline, "the server did not become healthy");
    await new Promise((r) => setTimeout(r, 500));
  }
  return url;
}

let served: ValifiClient;
let empty: ValifiClient;

before(async () => {
  const reg = await registry();
  const [a, b] = await Promise.all([
    serve(reg.model, reg.MLFLOW_TRACKING_URI),
    serve(reg.empty, reg.MLFLOW_TRACKING_URI),
  ]);
  served = new ValifiClient({ baseUrl: a, timeoutMs: 30_000 });
  empty = new ValifiClient({ baseUrl: b, timeoutMs: 30_000, retries: 1, backoffMs: 50 });
  // the promoted version is loaded once an execute answers
  const deadline = Date.now() + 120_000;
  for (;;) {
    try {
      await served.execute("warm up", "trading_advanced");
      break;
    } catch (err) {
      if (!(err instanceof ValifiUnavailableError) || Date.now() > deadline) throw err;
    }
  }
});

after(async () => {
  for (const child of children) {
    if (child === fixture) continue;
    try {
      process.kill(-child.pid!, "SIGTERM");
    } catch {
      // already gone
    }
  }
  if (fixture && fixture.exitCode === null) {
    const exited = new Promise((ok) => fixture!.once("exit", ok));
    fixture.stdin!.end(); // it stops its MLflow server and removes its data
    await exited;
  }
});

describe("the Valifi client against a live server", () => {
  test("health", async () => {
    assert.equal(await served.health(), true);
    const nobody = new ValifiClient({ baseUrl: `http://127.0.0.1:${await freePort()}` });
    assert.equal(await nobody.health(), false);
  });

  test("an info question", async () => {
    const a = await served.info("What is Valifi?");
    assert.equal(a.type, "info");
    assert.ok(a.answer.length > 10);
    assert.ok(a.model_version);
  });

  test("execute with the agent's action bank", async () => {
    const a = await served.execute("Analyze AAPL stock and suggest trade", "trading_advanced", {
      symbol: "AAPL",
      indicators: { rsi: 75 },
    });
    assert.equal(a.type, "execution");
    assert.equal(a.result.candidates, "action bank");
    assert.equal(typeof a.result.action.action, "string");
    assert.equal(typeof a.result.expected_reward, "number");
    assert.ok(a.result.lower_bound <= a.result.expected_reward);
    assert.ok(a.result.runners_up.length > 0);
  });

  test("an execute answer is a decision whose reward is recorded once", async (t) => {
    const a = await served.execute("Find a trade", "trading_advanced", { symbol: "NVDA" });
    assert.ok(a.probability > 0 && a.probability <= 1);
    assert.equal(typeof a.explored, "boolean");
    const again = await served.execute("Find a trade", "trading_advanced", { symbol: "NVDA" }, a.decision_id);
    assert.deepEqual(again.result, a.result); // the same id: the same decision
    let recorded;
    for (let i = 0; ; i++) {
      // the decision reaches the log a moment after the answer
      try {
        recorded = await served.reward(a.decision_id, 0.5);
        break;
      } catch (err) {
        if (err instanceof ValifiUnavailableError && /not logged/.test(err.message)) {
          t.skip("this server has no database: its decisions are not logged");
          return;
        }
        if (!(err instanceof ValifiRequestError) || err.status !== 404 || i > 50) throw err;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    assert.equal(recorded.status, "recorded");
    assert.equal((await served.reward(a.decision_id, 0.5)).status, "already recorded");
    const clash = await served.reward(a.decision_id, -0.5).then(() => null, (e: unknown) => e);
    assert.ok(clash instanceof ValifiRequestError && clash.status === 409);
  });

  test("execute with context.candidates", async () => {
    const candidates = [{ action: "buy", size: "small" }, { action: "hold" }];
    const a = await served.execute("Should I buy?", "trading_advanced", { candidates });
    assert.equal(a.result.candidates, "context");
    assert.ok(candidates.some((c) => JSON.stringify(c) === JSON.stringify(a.result.action)));
  });

  test("a 422 carries the server's message and is not retried", async () => {
    const err = await served
      .predict({ task: "x", query_type: "sideways" as never })
      .then(() => null, (e: unknown) => e);
    assert.ok(err instanceof ValifiRequestError);
    assert.equal(err.status, 422);
    assert.match(err.message, /invalid request/);
    assert.equal(typeof err.body === "object" && err.body.type, "error");
  });

  test("a 404 names the unknown agent", async () => {
    const err = await served.execute("act", "no_such_agent").then(() => null, (e: unknown) => e);
    assert.ok(err instanceof ValifiRequestError);
    assert.equal(err.status, 404);
    assert.match(err.message, /unknown agent 'no_such_agent'/);
  });

  test("503 before any promotion, after the retries", async () => {
    const started = Date.now();
    const err = await empty.execute("act", "trading_advanced").then(() => null, (e: unknown) => e);
    assert.ok(err instanceof ValifiUnavailableError);
    assert.equal(err.status, 503);
    assert.match(err.message, /no model promoted yet/);
    assert.ok(Date.now() - started >= 50, "one retry after a backoff");
  });

  test("a server that is not there: connection errors after the retries", async () => {
    const url = `http://127.0.0.1:${await freePort()}`;
    const client = new ValifiClient({ baseUrl: url, retries: 2, backoffMs: 20 });
    const started = Date.now();
    const err = await client.info("hello").then(() => null, (e: unknown) => e);
    assert.ok(err instanceof ValifiConnectionError);
    assert.ok(Date.now() - started >= 60, "two backoffs: 20 + 40 ms");
  });
});

describe("the client's own rules", () => {
  test("X-API-Key is sent, and a 503's Retry-After is honoured", async () => {
    const { createServer: httpServer } = await import("node:http");
    const seen: { key?: string; at: number }[] = [];
    const srv = httpServer((req, res) => {
      seen.push({ key: req.headers["x-api-key"] as string | undefined, at: Date.now() });
      if (seen.length === 1) {
        res.writeHead(503, { "content-type": "application/json", "retry-after": "1" });
        res.end(JSON.stringify({ type: "error", error: "restarting" }));
        return;
      }
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify({ type: "info", topic: null, answer: "ok", model_version: "7" }));
    });
    await new Promise<void>((ok) => srv.listen(0, "127.0.0.1", ok));
    const port = (srv.address() as { port: number }).port;
    try {
      const client = new ValifiClient({
        baseUrl: `http://127.0.0.1:${port}/`,
        apiKey: "s3cret",
        backoffMs: 10,
      });
      const a = await client.info("hello");
      assert.equal(a.model_version, "7");
      assert.deepEqual(
        seen.map((s) => s.key),
        ["s3cret", "s3cret"],
      );
      assert.ok(seen[1].at - seen[0].at >= 900, "waited for Retry-After: 1");
    } finally {
      srv.close();
    }
  });
});

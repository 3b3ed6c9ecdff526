/**
 * A typed client for the Valifi agent server: `POST {baseUrl}/predict`, `POST /reward`,
 * `GET /health`.
 *
 * Node's built-in fetch, no runtime dependencies. Each call has a timeout. Only
 * failures that are safe to repeat are retried, with exponential backoff: a
 * connection that could not be made (nothing was sent) and a 503 (the server is
 * starting, restarting a worker, or has no model yet; its Retry-After is honoured
 * up to the backoff cap). Any other 4xx or 5xx throws a typed error carrying the
 * server's own message; a timeout is never retried.
 */

export type QueryType = "auto" | "info" | "execute";

export interface PredictRequest {
  task: string;
  agent_type?: string;
  query_type?: QueryType;
  context?: Record<string, unknown> & { candidates?: Record<string, unknown>[] };
  /** an execute request's own id: a retry with it gets the same answer, logged once */
  decision_id?: string;
}

export interface RankedAction {
  action: Record<string, unknown>;
  expected_reward: number;
  /** what the ranking orders by: the expected reward less the action's uncertainty */
  lower_bound: number;
}

export interface ExecutionAnswer {
  type: "execution";
  agent: string;
  status: string;
  /** the decision's id: report its reward with `reward(decision_id, ...)` */
  decision_id: string;
  /** the probability with which the served policy chose this action, in (0, 1] */
  probability: number;
  /** true when the action is not the best-ranked one (exploration) */
  explored: boolean;
  result: RankedAction & {
    runners_up: RankedAction[];
    candidates: "context" | "action bank";
  };
  answer: string;
  model_version: string;
}

export interface InfoAnswer {
  type: "info";
  topic: string | null;
  answer: string;
  data?: Record<string, unknown>;
  model_version: string | null;
}

export type Answer = ExecutionAnswer | InfoAnswer;

/** What `POST /reward` answers. */
export interface RewardAnswer {
  type: "reward";
  decision_id: string;
  reward: number;
  recorded_at: string;
  /** "already recorded": a retry of the same reward (it is recorded once) */
  status: "recorded" | "already recorded";
  answer: string;
}

/** What the server sends with every 4xx/5xx. */
export interface ErrorBody {
  type: "error";
  error: string;
  answer?: string;
  model_version?: string | null;
  [key: string]: unknown;
}

export interface ClientOptions {
  /** Where the server listens, e.g. `process.env.PYTHON_AGENT_URL`. */
  baseUrl: string;
  /** Sent as `X-API-Key` when the server requires one. */
  apiKey?: string;
  /** Per attempt, in milliseconds (default 10,000). */
  timeoutMs?: number;
  /** Retries after the first attempt, for connect errors and 503 only (default 3). */
  retries?: number;
  /** First backoff in milliseconds, doubled on each retry (default 200). */
  backoffMs?: number;
  /** The longest single wait between attempts, in milliseconds (default 5,000). */
  maxBackoffMs?: number;
  /** A fetch to use instead of the global one. */
  fetch?: typeof fetch;
}

/** Base class of every error this client throws. */
export class ValifiError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The server answered with an error status; `message` is the server's own. */
export class ValifiHttpError extends ValifiError {
  constructor(
    readonly status: number,
    message: string,
    readonly body: ErrorBody | string,
    readonly retryAfterS?: number,
  ) {
    super(message);
  }
}

/** A 4xx: the request itself was refused (bad input, unknown agent, missing key). */
export class ValifiRequestError extends ValifiHttpError {}

/** 503 after every retry: no model is served yet, or the server is restarting. */
export class ValifiUnavailableError extends ValifiHttpError {}

/** Another 5xx. */
export class ValifiServerError extends ValifiHttpError {}

/** No answer within `timeoutMs` (not retried: the server may still be working). */
export class ValifiTimeoutError extends ValifiError {}

/** No connection could be made, after every retry. */
export class ValifiConnectionError extends ValifiError {}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

function isConnectError(err: unknown): boolean {
  // fetch rejects with TypeError("fetch failed") whose cause carries the socket error
  const cause = (err as { cause?: { code?: string } })?.cause;
  const code = cause?.code ?? "";
  return (
    err instanceof TypeError &&
    ["ECONNREFUSED", "ECONNRESET", "ENOTFOUND", "EAI_AGAIN", "EHOSTUNREACH", "UND_ERR_SOCKET"]
      .concat(["UND_ERR_CONNECT_TIMEOUT", "ENETUNREACH", "EPIPE"])
      .includes(code)
  );
}

export class ValifiClient {
  private readonly baseUrl: string;
  private readonly opts: Required<Omit<ClientOptions, "apiKey" | "fetch" | "baseUrl">>;
  private readonly apiKey?: string;
  private readonly fetchImpl: typeof fetch;

  constructor(options: ClientOptions) {
    if (!options.baseUrl) throw new ValifiError("baseUrl is required");
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.apiKey = options.apiKey;
    this.fetchImpl = options.fetch ?? globalThis.fetch;
    this.opts = {
      timeoutMs: options.timeoutMs ?? 10_000,
      retries: options.retries ?? 3,
      backoffMs: options.backoffMs ?? 200,
      maxBackoffMs: options.maxBackoffMs ?? 5_000,
    };
  }

  /** `POST /predict` with any request. */
  predict(request: PredictRequest): Promise<Answer> {
    return this.request<Answer>("POST", "/predict", request);
  }

  /** An information question. */
  async info(task: string, context?: PredictRequest["context"]): Promise<InfoAnswer> {
    return (await this.predict({ task, query_type: "info", context })) as InfoAnswer;
  }

  /** Ask an agent to act: a decision among its bank's actions, or `context.candidates`. */
  async execute(
    task: string,
    agentType: string,
    context?: PredictRequest["context"],
    decisionId?: string,
  ): Promise<ExecutionAnswer> {
    return (await this.predict({
      task,
      agent_type: agentType,
      query_type: "execute",
      context,
      ...(decisionId ? { decision_id: decisionId } : {}),
    })) as ExecutionAnswer;
  }

  /**
   * `POST /reward`: the reward a decision earned, recorded once (a retry of the same
   * reward is safe). An unknown decision is a 404, a value out of bounds a 422, another
   * reward for a decision that has one a 409.
   */
  reward(decisionId: string, reward: number, at?: Date): Promise<RewardAnswer> {
    const body = { decision_id: decisionId, reward, ...(at ? { at: at.toISOString() } : {}) };
    return this.request<RewardAnswer>("POST", "/reward", body);
  }

  /** True when the server is up and its workers are ready (`GET /health` is 200). */
  async health(): Promise<boolean> {
    try {
      const res = await this.attempt("GET", "/health");
      return res.ok;
    } catch (err) {
      if (err instanceof ValifiConnectionError || err instanceof ValifiTimeoutError) return false;
      throw err;
    }
  }

  private async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    for (let attempt = 0; ; attempt++) {
      const last = attempt >= this.opts.retries;
      const backoff = Math.min(this.opts.backoffMs * 2 ** attempt, this.opts.maxBackoffMs);
      let res: Response;
      try {
        res = await this.attempt(method, path, body);
      } catch (err) {
        if (err instanceof ValifiConnectionError && !last) {
          await sleep(backoff);
          continue;
        }
        throw err;
      }
      if (res.ok) return (await res.json()) as T;
      const error = await this.httpError(res);
      if (error instanceof ValifiUnavailableError && !last) {
        const wait = error.retryAfterS !== undefined ? error.retryAfterS * 1000 : backoff;
        await sleep(Math.min(Math.max(wait, backoff), this.opts.maxBackoffMs));
        continue;
      }
      throw error;
    }
  }

  private async attempt(method: string, path: string, body?: unknown): Promise<Response> {
    const headers: Record<string, string> = { accept: "application/json" };
    if (body !== undefined) headers["content-type"] = "application/json";
    if (this.apiKey) headers["x-api-key"] = this.apiKey;
    try {
      return await this.fetchImpl(this.baseUrl + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(this.opts.timeoutMs),
      });
    } catch (err) {
      const name = (err as { name?: string })?.name;
      if (name === "TimeoutError" || name === "AbortError") {
        throw new ValifiTimeoutError(
          `${method} ${path}: no answer within ${this.opts.timeoutMs} ms`,
          { cause: err },
        );
      }
      if (isConnectError(err)) {
        throw new ValifiConnectionError(
          `${method} ${path}: cannot connect to ${this.baseUrl}`,
          { cause: err },
        );
      }
      throw new ValifiError(`${method} ${path} failed: ${String(err)}`, { cause: err });
    }
  }

  private async httpError(res: Response): Promise<ValifiHttpError> {
    const text = await res.text();
    let body: ErrorBody | string = text;
    let message = text || res.statusText;
    try {
      const parsed = JSON.parse(text) as ErrorBody;
      if (parsed && typeof parsed.error === "string") {
        body = parsed;
        message = parsed.error;
      }
    } catch {
      // not JSON: keep the text
    }
    const header = res.headers.get("retry-after");
    const retryAfter = header !== null && /^\d+$/.test(header) ? Number(header) : undefined;
    const Kind =
      res.status === 503
        ? ValifiUnavailableError
        : res.status >= 500
          ? ValifiServerError
          : ValifiRequestError;
    return new Kind(res.status, `${res.status}: ${message}`, body, retryAfter);
  }
}

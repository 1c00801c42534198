// The reference gateway of `make bench`: the seed's design (fastify-camunda), as a Node team
// would write it at its strongest, run on the same engine as flowgate so every figure of
// the cost-per-run section has something to stand beside.
//
//   node gateway.mjs        (settings from the environment, below)
//
// One process: Fastify routes, an in-memory wait map (a promise per parked request), an
// in-memory process store written through to PostgreSQL without waiting (the seed's
// `save()`: "update in-memory Map immediately, write to DB async"), one audit row per step,
// and camunda-external-task-client-js in the same process, its poll interval 0 (it polls
// again as soon as a poll returns), serving the `onboard-user` topics with the same rules
// as flowgate's example handlers. The last step ends the run in-process (the seed posts
// to its own /api/process/complete; a call inside the process is the cheaper form of it).
//
// PORT, CAMUNDA_BASE_URL, DATABASE_URL, SYNC_TIMEOUT_MS (25000), MAX_TASKS (10)
import { createHash, randomUUID } from "node:crypto";
import Fastify from "fastify";
import pg from "pg";
import { Client, Variables } from "camunda-external-task-client-js";

const env = process.env;
const PORT = Number(env.PORT ?? 8000);
const ENGINE = env.CAMUNDA_BASE_URL ?? "http://127.0.0.1:8080/engine-rest";
const SYNC_TIMEOUT_MS = Number(env.SYNC_TIMEOUT_MS ?? 25000);
const MAX_TASKS = Number(env.MAX_TASKS ?? 10);

// --- the process store: memory first, PostgreSQL behind it -----------------------------
const db = new pg.Pool({ connectionString: env.DATABASE_URL, max: 10 });
await db.query(`
  CREATE TABLE IF NOT EXISTS process_store (
    correlation_id text PRIMARY KEY, status text NOT NULL, data jsonb, error jsonb,
    started_at timestamptz NOT NULL, updated_at timestamptz NOT NULL);
  CREATE TABLE IF NOT EXISTS event_log (
    id bigserial PRIMARY KEY, correlation_id text NOT NULL, step integer, step_name text,
    process_name text, status text NOT NULL, request_data jsonb, response_data jsonb,
    error_message text, batch_id text, traceability_id text, application_id text,
    created_at timestamptz NOT NULL DEFAULT now());`);

const store = new Map();
const quietly = (promise) => promise.catch((error) => console.error("db:", error.message));

function save(correlationId, record) {
  const now = new Date().toISOString();
  const next = { startedAt: now, ...store.get(correlationId), ...record, updatedAt: now };
  store.set(correlationId, next);
  quietly(db.query(
    `INSERT INTO process_store VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (correlation_id) DO UPDATE SET status = $2, data = $3, error = $4, updated_at = $6`,
    [correlationId, next.status, JSON.stringify(next.data ?? null),
     JSON.stringify(next.error ?? null), next.startedAt, next.updatedAt],
  ));
  if (next.status !== "pending") setTimeout(() => store.delete(correlationId), 5000);
}

function logEvent(task, step, stepName, status, request, response, error) {
  const v = (name) => task.variables.get(name) ?? null;
  quietly(db.query(
    `INSERT INTO event_log (correlation_id, step, step_name, process_name, status,
       request_data, response_data, error_message, batch_id, traceability_id, application_id)
     VALUES ($1, $2, $3, 'onboard-user', $4, $5, $6, $7, $8, $9, $10)`,
    [task.businessKey, step, stepName, status, JSON.stringify(request),
     JSON.stringify(response ?? null), error ?? null, v("batch_id"), v("traceability_id"),
     v("application_id")],
  ));
}

// --- the wait room: a promise per parked request ---------------------------------------
const waits = new Map();

function createWait(correlationId, timeoutMs) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => {
      waits.delete(correlationId);
      resolve(null);
    }, timeoutMs);
    waits.set(correlationId, (record) => {
      clearTimeout(timer);
      waits.delete(correlationId);
      resolve(record);
    });
  });
}

function complete(correlationId, status, data, error) {
  save(correlationId, { status, data, error });
  waits.get(correlationId)?.(store.get(correlationId));
}

// --- the routes ------------------------------------------------------------------------
const app = Fastify({ logger: false });
const startSchema = {
  body: {
    type: "object",
    required: ["processKey", "correlationId"],
    properties: {
      processKey: { type: "string", minLength: 1 },
      correlationId: { type: "string", minLength: 1 },
      variables: { type: "object" },
    },
  },
};
const typed = (value) =>
  typeof value === "string"
    ? { value, type: "String" }
    : typeof value === "boolean"
      ? { value, type: "Boolean" }
      : typeof value === "number"
        ? { value, type: Number.isInteger(value) ? "Integer" : "Double" }
        : { value: JSON.stringify(value), type: "Json" };

app.post("/api/process/start", { schema: startSchema }, async (request, reply) => {
  const { processKey, correlationId, variables = {} } = request.body;
  const applicationId = randomUUID();
  const system = {
    correlationId,
    batch_id: randomUUID(),
    traceability_id: randomUUID(),
    application_id: applicationId,
    identifiers: { applicationId },
  };
  save(correlationId, { status: "pending", data: { step: "queued" }, error: null });
  const wait = createWait(correlationId, SYNC_TIMEOUT_MS);
  const all = { ...variables, ...system };
  const started = await fetch(`${ENGINE}/process-definition/key/${processKey}/start`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      businessKey: correlationId,
      variables: Object.fromEntries(Object.entries(all).map(([k, v]) => [k, typed(v)])),
    }),
  });
  if (!started.ok) {
    waits.get(correlationId)?.(null);
    save(correlationId, { status: "error", error: `engine answered ${started.status}` });
    return reply.code(500).send({ status: "error", correlationId, error: await started.text() });
  }
  const record = await wait;
  if (record === null) {
    const statusUrl = `/api/process/status/${encodeURIComponent(correlationId)}`;
    return reply.code(202).send({ status: "pending", correlationId, statusUrl });
  }
  if (record.status === "ok") return { status: "ok", correlationId, result: record.data };
  return reply.code(500).send({ status: "error", correlationId, error: record.error });
});

app.post("/api/process/complete", async (request) => {
  const { correlationId, status, data, error } = request.body;
  complete(correlationId, status, data, error);
  return { received: true };
});

app.get("/api/process/status/:correlationId", async (request, reply) => {
  const { correlationId } = request.params;
  let record = store.get(correlationId);
  if (!record) {
    const { rows } = await db.query(
      "SELECT status, data, error, started_at, updated_at FROM process_store WHERE correlation_id = $1",
      [correlationId],
    );
    if (rows.length === 0) return reply.code(404).send({ status: "not_found", correlationId });
    const [row] = rows;
    record = { ...row, startedAt: row.started_at, updatedAt: row.updated_at };
  }
  const code = { ok: 200, pending: 202, error: 500 }[record.status] ?? 200;
  return reply.code(code).send({ correlationId, ...record });
});

// --- the worker: the `onboard-user` handlers -------------------------------------------
const riskScore = (userId) => {
  const n = createHash("sha256").update(userId).digest().readUInt32BE(0);
  return userId.toLowerCase().includes("highrisk") ? 80 + (n % 20) : n % 50;
};

class BusinessRuleError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

const steps = {
  "validate-user-information": (v) => {
    if (v.userId.toLowerCase().includes("invalid")) {
      throw new BusinessRuleError("VALIDATION_FAILED", `User ${v.userId} failed validation`);
    }
    return { userId: v.userId, validated: true, normalizedUserId: v.userId.trim().toLowerCase() };
  },
  "run-background-check": (v) => {
    const score = riskScore(v.userId);
    return { backgroundCheckPassed: score < 80, riskScore: score };
  },
  "call-onboarding-api": (v) => {
    if (!v.backgroundCheckPassed) return { onboarded: false, reason: "Background check failed" };
    const onboarded = v.riskScore < 75;
    return onboarded ? { onboarded } : { onboarded, reason: "Risk score too high to onboard" };
  },
  "prepare-response": (v) => {
    const success = v.validated && v.backgroundCheckPassed && v.onboarded;
    const result = {
      userId: v.userId, validated: v.validated, backgroundCheckPassed: v.backgroundCheckPassed,
      onboarded: v.onboarded, riskScore: v.riskScore, success,
    };
    if (v.reason) result.reason = v.reason;
    return result;
  },
  "handle-error": () => ({ errorHandled: true }),
};
const ends = {
  "prepare-response": (r, v) =>
    r.success ? ["ok", r, null] : ["error", r, v.reason ?? "Onboarding process failed"],
  "handle-error": (r, v) => ["error", r, v.errorMessage ?? "Process failed"],
};

const worker = new Client({
  baseUrl: ENGINE,
  workerId: `reference-${process.pid}`,
  maxTasks: MAX_TASKS,
  interval: 0,
  lockDuration: 20000,
  asyncResponseTimeout: 30000,
  autoPoll: false,
});

// The step hand-off (task created -> fetched), for `make bench`: GET /bench/handoff.
let handoffs = [];
const engineTime = (text) => Date.parse(text.replace(/([+-]\d\d)(\d\d)$/, "$1:$2"));
app.get("/bench/handoff", async () => {
  const taken = handoffs;
  handoffs = [];
  return taken;
});

Object.keys(steps).forEach((step, index) => {
  worker.subscribe(`onboard-user.${step}`, async ({ task, taskService }) => {
    if (task.createTime) handoffs.push(Date.now() - engineTime(task.createTime));
    const vars = task.variables.getAll();
    try {
      const result = steps[step](vars);
      await taskService.complete(task, new Variables().setAll(result));
      logEvent(task, index + 1, step, "success", vars, result);
      if (ends[step]) complete(task.businessKey, ...ends[step](result, vars));
    } catch (error) {
      if (!(error instanceof BusinessRuleError)) throw error;
      const details = { errorCode: error.code, errorMessage: error.message, errorType: "BUSINESS_RULE_ERROR" };
      await taskService.handleBpmnError(task, error.code, error.message, new Variables().setAll(details));
      logEvent(task, index + 1, step, "error", vars, null, error.message);
    }
  });
});
worker.on("complete:error", (_task, error) => console.error("complete failed", String(error)));
worker.on("poll:error", (error) => console.error("poll failed", String(error)));

await app.listen({ port: PORT, host: "127.0.0.1" });
worker.start();

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, async () => {
    worker.stop();
    await app.close();
    await db.end();
    process.exit(0);
  });
}

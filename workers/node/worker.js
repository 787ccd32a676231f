#!/usr/bin/env node
// A relaybus worker in Node.js, written from docs/protocol.md ("The AMQP contract") alone.
//
//   node worker.js [--broker URL] [--amqp-prefix P] [--concurrency N] [--drain-timeout S]
//
// Each option has an environment twin: RELAYBUS_BROKER, RELAYBUS_AMQP_PREFIX,
// RELAYBUS_CONCURRENCY, RELAYBUS_DRAIN_TIMEOUT (a flag wins over its variable).
//
// Request types served:
//   nodeEcho   any payload: one chunk {"received": true}, then the payload as the response.
//   nodeCount  {"count": N, "delayMs": D}: N chunks {"index": i} D ms apart, then {"count": N}.
//
// Logs go to stdout, one line each; "node worker ready" once it consumes.

import { setTimeout as sleep } from "node:timers/promises";
import { parseArgs } from "node:util";
import amqp from "amqplib";
import { conformanceHandlers } from "./conformance.js";

// Configuration

const USAGE = `usage: node worker.js [--broker URL] [--amqp-prefix PREFIX] [--concurrency N]
                      [--drain-timeout SECONDS]
  --broker         AMQP URL (env RELAYBUS_BROKER, default amqp://guest:guest@127.0.0.1:5672/)
  --amqp-prefix    prefix of every exchange and queue name, as the gateway's --amqp-prefix
                   (env RELAYBUS_AMQP_PREFIX, default empty)
  --concurrency    prefetch per request type: requests of one type run at once
                   (env RELAYBUS_CONCURRENCY, default 10)
  --drain-timeout  seconds running requests may finish in on SIGTERM/SIGINT before they are
                   requeued, counted from the signal (env RELAYBUS_DRAIN_TIMEOUT, default 10)`;

function readConfig(argv, env) {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        broker: { type: "string" },
        "amqp-prefix": { type: "string" },
        concurrency: { type: "string" },
        "drain-timeout": { type: "string" },
        help: { type: "boolean", short: "h" },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (e) {
    fail(`${e.message}\n${USAGE}`);
  }
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  const concurrency = Number(values.concurrency ?? env.RELAYBUS_CONCURRENCY ?? 10);
  if (!Number.isInteger(concurrency) || concurrency < 1 || concurrency > 65535) {
    fail(`--concurrency must be an integer in 1..65535\n${USAGE}`);
  }
  const drainTimeout = Number(values["drain-timeout"] ?? env.RELAYBUS_DRAIN_TIMEOUT ?? 10);
  if (!Number.isFinite(drainTimeout) || drainTimeout < 0) {
    fail(`--drain-timeout must be a number of seconds >= 0\n${USAGE}`);
  }
  return {
    broker: values.broker ?? env.RELAYBUS_BROKER ?? "amqp://guest:guest@127.0.0.1:5672/",
    prefix: values["amqp-prefix"] ?? env.RELAYBUS_AMQP_PREFIX ?? "",
    concurrency,
    drainTimeoutMs: drainTimeout * 1000,
  };
}

function fail(message) {
  process.stderr.write(`${message}\n`);
  process.exit(2);
}

function log(message) {
  process.stdout.write(`${new Date().toISOString()} [relaybus-node-worker] ${message}\n`);
}

// Handlers

/** Thrown by a handler to end its request with a chosen error code. */
class RequestError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

function requireInteger(payload, field, min, max, fallback) {
  const value = payload[field] ?? fallback;
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new RequestError("bad_request",
      `payload.${field} must be an integer in ${min}..${max}, got ${JSON.stringify(value)}`);
  }
  return value;
}

// handle(payload, stream, request) -> the response data; stream.sendChunk(data) resolves once
// the broker confirmed the chunk; stream.signal aborts when the request is stopped;
// request.principal and request.claims say who asked, as the gateway verified it.
// Neither handler is idempotent: a redelivered request gets worker_lost.
// Only the gateway sets these headers (docs/protocol.md): `relaybus-principal` is the verified
// sub, `relaybus-claims` a JSON object of forwarded claims; anything else counts as none.
function headerString(value) {
  if (typeof value === "string") return value;
  if (Buffer.isBuffer(value)) return value.toString("utf8");
  return null;
}

function claimsFrom(value) {
  const text = headerString(value);
  if (text === null) return {};
  try {
    const claims = JSON.parse(text);
    return claims !== null && typeof claims === "object" && !Array.isArray(claims) ? claims : {};
  } catch {
    return {};
  }
}

const HANDLERS = {
  ...conformanceHandlers(RequestError), // the conformance kit's four request types
  nodeEcho: {
    idempotent: false,
    async handle(payload, stream) {
      await stream.sendChunk({ received: true });
      return payload;
    },
  },
  nodeWhoAmI: {
    idempotent: true,
    async handle(_payload, _stream, request) {
      return { principal: request.principal, claims: request.claims };
    },
  },
  nodeCount: {
    idempotent: false,
    async handle(payload, stream) {
      if (payload === null || typeof payload !== "object" || Array.isArray(payload)) {
        throw new RequestError("bad_request", "payload must be an object {count, delayMs}");
      }
      const count = requireInteger(payload, "count", 0, 10_000);
      const delayMs = requireInteger(payload, "delayMs", 0, 600_000, 0);
      for (let index = 0; index < count; index++) {
        if (index > 0 && delayMs > 0) {
          await sleep(delayMs, undefined, { signal: stream.signal });
        }
        await stream.sendChunk({ index });
      }
      return { count };
    },
  },
};

// The worker

const EXCHANGES = ["requests", "responses", "cancels"];
const RECENT_CANCEL_MS = 300_000; // a notice is remembered this long (the default max timeout)
const RECENT_CANCEL_MAX = 10_000;
const MAX_TIMER_MS = 2_147_483_647;

class Worker {
  constructor(config) {
    this.config = config;
    this.name = (base) => `${config.prefix}${base}`;
    this.session = null; // the current connection + channel
    this.running = new Map(); // correlationId -> Job (until acked, nacked or abandoned)
    this.recentCancels = new Map(); // correlationId -> time the notice came
    this.idleWaiters = [];
    this.shuttingDown = false;
    this.reconnectTimer = null;
  }

  // Connecting

  async start() {
    let delay = 500;
    while (!this.shuttingDown) {
      try {
        await this.connect();
        return;
      } catch (e) {
        if (this.shuttingDown) return;
        log(`Cannot set up the broker connection (${e.message}); retrying in ${delay} ms`);
        await sleep(delay);
        delay = Math.min(delay * 2, 10_000);
      }
    }
  }

  async connect() {
    const conn = await amqp.connect(this.config.broker, {
      clientProperties: { connection_name: `relaybus-node-worker pid ${process.pid}` },
    });
    const session = { conn, ch: null, requestConsumers: [], ready: false, closed: false,
                      closing: false };
    conn.on("error", (err) => log(`Broker connection error: ${err.message}`));
    conn.on("close", (err) => this.connectionClosed(session, err));
    try {
      const ch = await conn.createConfirmChannel();
      session.ch = ch;
      ch.on("error", (err) => log(`Channel error: ${err.message}`));
      ch.on("close", () => {
        // When the whole connection goes, its "close" follows this one: only a channel
        // closed on its own (a channel error) needs the connection closed to start over.
        setImmediate(() => {
          if (!session.closing && !session.closed) {
            log("The channel closed under us; closing the connection to start over");
            conn.close().catch(() => {});
          }
        });
      });
      // 1. Exchanges, then a durable request queue (no arguments) per type, bound by type.
      for (const exchange of EXCHANGES) {
        await ch.assertExchange(this.name(exchange), "direct", { durable: true });
      }
      const requestTypes = Object.keys(HANDLERS);
      for (const requestType of requestTypes) {
        const queue = this.name(`requests.${requestType}`);
        await ch.assertQueue(queue, { durable: true, exclusive: false, autoDelete: false });
        await ch.bindQueue(queue, this.name("requests"), requestType);
      }
      // 4. Cancel notices: an exclusive server-named queue bound per type, auto-ack. Consumed
      // before the requests, so no notice for a request we run can be missed.
      const { queue: cancelQueue } = await ch.assertQueue("", {
        exclusive: true, autoDelete: true, durable: false });
      for (const requestType of requestTypes) {
        await ch.bindQueue(cancelQueue, this.name("cancels"), requestType);
      }
      await ch.consume(cancelQueue, (msg) => this.cancelReceived(msg), { noAck: true });
      // 2. Prefetch (per consumer, never global) and manual acks.
      await ch.prefetch(this.config.concurrency, false);
      for (const requestType of requestTypes) {
        const queue = this.name(`requests.${requestType}`);
        const { consumerTag } = await ch.consume(
          queue, (msg) => this.requestReceived(session, requestType, msg), { noAck: false });
        session.requestConsumers.push(consumerTag);
      }
    } catch (e) {
      session.closing = true;
      await conn.close().catch(() => {});
      throw e;
    }
    session.ready = true;
    this.session = session;
    if (this.shuttingDown) {
      // A signal came while we were connecting: go through the ordinary shutdown.
      await this.stopConsuming(session);
    }
    log(`node worker ready: consuming ${Object.keys(HANDLERS).map((t) =>
      this.name(`requests.${t}`)).join(", ")} (prefetch ${this.config.concurrency})`);
  }

  connectionClosed(session, err) {
    if (session.closed) return;
    session.closed = true;
    if (!session.ready) return; // a failed setup: start() retries
    if (this.session === session) this.session = null;
    // Nothing of this connection can be acked or replied to any more; the broker requeues
    // its unacked deliveries (redelivered = true) for another worker.
    for (const job of [...this.running.values()]) {
      if (job.session === session) job.abandon("lost the connection to the message broker");
    }
    if (session.closing || this.shuttingDown) return;
    log(`Lost the broker connection (${err ? err.message : "closed to set up again"}); ` +
        "reconnecting");
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      this.start();
    }, 500);
  }

  // Requests

  requestReceived(session, requestType, msg) {
    if (msg === null) {
      // basic.cancel from the broker (e.g. the queue was deleted): set everything up again.
      log(`The broker cancelled our consumer of ${this.name(`requests.${requestType}`)}; ` +
          "reconnecting");
      session.conn.close().catch(() => {});
      return;
    }
    const { correlationId, replyTo } = msg.properties;
    const headers = msg.properties.headers ?? {};
    const job = new Job(this, session, requestType, msg);
    if (!correlationId || !replyTo) {
      log(`Dropped a ${requestType} request without correlation_id or reply_to`);
      job.ackWithoutReply();
      return;
    }
    const deadline = integerHeader(headers["relaybus-deadline-ms"]);
    if (deadline !== null && deadline <= Date.now()) {
      // The client already got `timeout`.
      log(`Skipped ${requestType} ${correlationId}: its deadline passed in the queue`);
      job.ackWithoutReply();
      return;
    }
    if (this.recentCancels.has(correlationId)) {
      this.recentCancels.delete(correlationId);
      log(`Skipped ${requestType} ${correlationId}: cancelled before it arrived`);
      job.finish("error", { code: "cancelled", message: "cancelled before it started" });
      return;
    }
    const handler = HANDLERS[requestType];
    if (msg.fields.redelivered && !handler.idempotent) {
      log(`Not running ${requestType} ${correlationId} again: it was redelivered ` +
          "(a worker may have died running it): worker_lost");
      job.finish("error", {
        code: "worker_lost",
        message: "the worker running this request died; it is not idempotent, so it was not " +
                 "run again",
      });
      return;
    }
    job.run(handler, deadline, {
      principal: headerString(headers["relaybus-principal"]),
      claims: claimsFrom(headers["relaybus-claims"]),
    });
  }

  cancelReceived(msg) {
    if (msg === null) return; // our own queue cannot go away while we are connected
    const correlationId = msg.properties.correlationId;
    if (!correlationId) return;
    const reason = msg.properties.headers?.["relaybus-cancel-reason"] ?? "unknown";
    const job = this.running.get(correlationId);
    if (job) {
      job.stop("cancelled", `cancelled (reason: ${reason})`);
      return;
    }
    // Not running here: another worker's, already finished, or still queued. Remember it, in
    // case the request itself comes later.
    const now = Date.now();
    this.recentCancels.set(correlationId, now);
    for (const [id, at] of this.recentCancels) {
      if (this.recentCancels.size <= RECENT_CANCEL_MAX && now - at < RECENT_CANCEL_MS) break;
      this.recentCancels.delete(id);
    }
  }

  jobDone(job) {
    if (this.running.get(job.correlationId) === job) this.running.delete(job.correlationId);
    if (this.running.size === 0) {
      for (const resolve of this.idleWaiters.splice(0)) resolve();
    }
  }

  // Shutdown: stop consuming, let running requests finish for a while, requeue the rest, close.

  async stopConsuming(session) {
    for (const consumerTag of session.requestConsumers.splice(0)) {
      try {
        await session.ch.cancel(consumerTag);
      } catch (e) {
        log(`basic.cancel failed: ${e.message}`);
      }
    }
  }

  async shutdown(signal) {
    if (this.shuttingDown) {
      log(`${signal} again: exiting at once`);
      process.exit(1);
    }
    this.shuttingDown = true;
    log(`${signal}: shutting down`);
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    // The drain timeout runs from the signal, as in the Python runtime: it bounds the wait for
    // cancel-ok too (a broker that does not answer), not only the running requests.
    const timer = new AbortController();
    const timeout = sleep(this.config.drainTimeoutMs, "timeout", { signal: timer.signal })
      .catch(() => "cleared");
    const session = this.session;
    const drained = (async () => {
      if (session && !session.closed) {
        // amqplib keeps delivering until cancel-ok: those requests are run, not requeued
        // (requeued, they would come back redelivered and be answered worker_lost).
        await this.stopConsuming(session);
        log("Stopped consuming requests");
      }
      if (this.running.size > 0) {
        log(`Waiting up to ${this.config.drainTimeoutMs / 1000} s (from the signal) for ` +
            `${this.running.size} running request(s)`);
        await new Promise((resolve) => this.idleWaiters.push(resolve));
      }
      return "drained";
    })();
    if ((await Promise.race([drained, timeout])) === "timeout") {
      for (const job of [...this.running.values()]) {
        job.abandon("the drain timeout passed while shutting down", { requeue: true });
      }
    }
    timer.abort();
    if (session && !session.closed) {
      session.closing = true;
      try {
        await session.ch.close();
        await session.conn.close();
      } catch (e) {
        log(`Closing the broker connection failed: ${e.message}`);
      }
    }
    log("node worker stopped");
    process.exit(0);
  }
}

class Job {
  constructor(worker, session, requestType, msg) {
    this.worker = worker;
    this.session = session;
    this.requestType = requestType;
    this.msg = msg;
    this.correlationId = msg.properties.correlationId;
    this.replyTo = msg.properties.replyTo;
    this.controller = new AbortController();
    this.nextSeq = 0;
    this.finished = false; // the final reply is sent (or will never be): nothing after it
    this.deadlineTimer = null;
    if (this.correlationId) worker.running.set(this.correlationId, this);
  }

  get label() {
    return `${this.requestType} ${this.correlationId}`;
  }

  async run(handler, deadline, request) {
    if (deadline !== null) {
      const delay = Math.min(Math.max(deadline - Date.now(), 0), MAX_TIMER_MS);
      this.deadlineTimer = setTimeout(
        () => this.stop("timeout", "its deadline passed"), delay);
    }
    let payload;
    try {
      payload = JSON.parse(this.msg.content.toString("utf8"));
    } catch (e) {
      this.finish("error", { code: "bad_request", message: `payload is not JSON: ${e.message}` });
      return;
    }
    const stream = {
      signal: this.controller.signal,
      sendChunk: (data) => this.sendChunk(data),
    };
    try {
      const result = await handler.handle(payload, stream, request);
      this.finish("response", result === undefined ? null : result);
    } catch (e) {
      if (this.finished) return; // stopped: the AbortError of its own signal, or a late failure
      if (e instanceof RequestError) {
        log(`${this.label} failed: ${e.code}: ${e.message}`);
        this.finish("error", { code: e.code, message: e.message });
      } else {
        log(`${this.label} failed: handler_error: ${e?.stack ?? e}`);
        this.finish("error", { code: "handler_error", message: "the handler failed" });
      }
    }
  }

  async sendChunk(data) {
    if (this.finished) throw this.controller.signal.reason ?? new Error("request stopped");
    const seq = this.nextSeq++; // a JS integer: amqplib sends it as an AMQP integer
    try {
      await this.publish("chunk", data, { "relaybus-seq": seq });
    } catch (e) {
      if (isNack(e) && !this.finished) {
        // End the request now, whatever the handler does with the error: a later chunk
        // would reach the client past the gap.
        log(`The broker refused chunk ${seq} of ${this.label}: ending the request`);
        this.stop("handler_error", "the broker refused a chunk of this request");
      }
      throw e;
    }
  }

  publish(type, body, headers) {
    const ch = this.session.ch;
    return new Promise((resolve, reject) => {
      try {
        ch.publish(this.worker.name("responses"), this.replyTo, encodeJSON(body),
          { correlationId: this.correlationId, type, contentType: "application/json",
            deliveryMode: 1, headers },
          (err) => (err ? reject(err) : resolve()));
      } catch (e) {
        reject(e);
      }
    });
  }

  /** Stop a running request and end it with an error reply (cancel notice, deadline). */
  stop(code, why) {
    if (this.finished) return;
    log(`Stopped ${this.label}: ${why}`);
    this.finish("error", { code, message: why });
  }

  /** The one final reply; the delivery is acked once the broker confirmed it. */
  async finish(type, body) {
    if (this.finished) return;
    this.finished = true;
    this.cleanUp();
    try {
      encodeJSON(body);
    } catch (e) {
      log(`${this.label}: the handler's result cannot be sent (${e.message}): handler_error`);
      type = "error";
      body = { code: "handler_error", message: "the handler's result is not JSON" };
    }
    try {
      await this.publish(type, body);
    } catch (e) {
      if (!isNack(e)) {
        // The channel or connection went (it is closed, and the connection with it): nothing
        // can be acked; the broker requeues the request itself (redelivered: worker_lost).
        log(`The ${type} reply of ${this.label} was not published (${e.message}); ` +
            "leaving the request to the broker");
        this.worker.jobDone(this);
        return;
      }
      // The broker got the reply and refused it (a publisher nack: the gateway's reply queue
      // is full). Redelivering the request would repeat that until its deadline: let it go.
      log(`The broker refused the final ${type} reply of ${this.label}: acked the request ` +
          "without an answer; its client gets timeout");
    }
    this.settle((ch) => ch.ack(this.msg));
  }

  ackWithoutReply() {
    this.finished = true;
    this.cleanUp();
    this.settle((ch) => ch.ack(this.msg));
  }

  /** Give the request up without a final reply: on a lost connection (nothing can be sent;
   * the broker requeues it) or at the drain deadline (nack with requeue). */
  abandon(why, { requeue = false } = {}) {
    if (this.finished) {
      // Its final reply is on the way and its ack follows, unless the connection went.
      if (this.session.closed) this.worker.jobDone(this);
      return;
    }
    this.finished = true;
    this.cleanUp();
    log(`Stopped ${this.label}: ${why}${requeue ? "; requeued it" : ""}`);
    if (requeue) {
      this.settle((ch) => ch.nack(this.msg, false, true));
    } else {
      this.worker.jobDone(this);
    }
  }

  cleanUp() {
    if (this.deadlineTimer) clearTimeout(this.deadlineTimer);
    this.deadlineTimer = null;
    if (!this.controller.signal.aborted) this.controller.abort();
  }

  settle(action) {
    try {
      if (!this.session.closed) action(this.session.ch);
    } catch (e) {
      log(`Could not settle ${this.label}: ${e.message}`);
    }
    this.worker.jobDone(this);
  }
}

/** A reply body: JSON (content_type application/json) or a TypeError (a BigInt, a cycle,
 * undefined or a function, which JSON.stringify leaves out). */
function encodeJSON(value) {
  const text = JSON.stringify(value);
  if (text === undefined) throw new TypeError(`${typeof value} is not JSON`);
  return Buffer.from(text, "utf8");
}

/** A header that must be an AMQP integer (amqplib decodes every integer type to a Number);
 * a string, float, boolean, void or absent value counts as not set. */
function integerHeader(value) {
  return Number.isInteger(value) ? value : null;
}

/** amqplib's error for a publisher nack (the broker got the message and refused it), as
 * opposed to "channel closed" or a throw from publish on a closed channel. */
function isNack(error) {
  return error instanceof Error && error.message === "message nacked";
}

// Main

const worker = new Worker(readConfig(process.argv.slice(2), process.env));
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    worker.shutdown(signal).catch((e) => {
      log(`Shutdown failed: ${e?.stack ?? e}`);
      process.exit(1);
    });
  });
}
// Worded so that the test harness (which looks for "Unhandled error") notices it.
process.on("unhandledRejection", (reason) =>
  log(`Unhandled error (a promise rejection): ${reason?.stack ?? reason}`));
worker.start();

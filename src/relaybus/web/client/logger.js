/**
 * Page logs shipped to the gateway as batched `client-log` frames, within the gateway's limits:
 * a token bucket below its per-connection rate, messages of at most 8192 characters, contexts
 * of at most 16 KiB, frames within maxMessageBytes. Entries wait (bounded, oldest dropped first)
 * while the socket is down or the bucket is empty; drops are reported by a synthetic
 * "N log entries dropped" entry as soon as one can be sent.
 */

import { redactTokenShapes, State, utf8Length } from "./websocketClient.js";

export const LOG_LEVELS = Object.freeze(["debug", "info", "warn", "error"]);
export const MAX_LOG_MESSAGE_LENGTH = 8192;
export const MAX_LOG_CONTEXT_BYTES = 16384;

export const LOGGER_DEFAULTS = Object.freeze({
  level: "info",
  flushIntervalMs: 1000,
  maxBatchEntries: 50,
  maxBufferEntries: 1000,
  captureGlobalErrors: false,
});

// The gateway's defaults, for a client that has not had a hello yet (docs/protocol.md).
const GATEWAY_LOG_PER_SECOND = 20;
const GATEWAY_LOG_BURST = 100;
const GATEWAY_LOG_ENTRIES_PER_FRAME = 50;
// The bucket keeps a tenth of the gateway's burst in reserve: frames bunched up in transit
// then still find tokens in the gateway's own bucket.
const BURST_SHARE = 0.9;
const FRAME_OVERHEAD_BYTES = utf8Length(JSON.stringify({ type: "client-log", entries: [] }));

/** JSON text of a context value: Errors become {name, message, stack}; cycles and BigInts are named. */
function encodeContext(context) {
  const seen = new WeakSet();
  return JSON.stringify(context, (key, value) => {
    if (typeof value === "bigint") return value.toString();
    if (value instanceof Error) {
      return { name: value.name, message: value.message, stack: value.stack };
    }
    if (value !== null && typeof value === "object") {
      if (seen.has(value)) return "[circular]";
      seen.add(value);
    }
    return value;
  });
}

/**
 * The context as the gateway accepts it: an object of at most 16 KiB, or a summary of it,
 * with the client's tokens redacted.
 */
function boundedContext(context, redact) {
  let text;
  try {
    text = redact(encodeContext(context));
  } catch (error) {
    return { contextError: redact(`the context could not be encoded: ${error}`) };
  }
  const bytes = utf8Length(text);
  if (bytes <= MAX_LOG_CONTEXT_BYTES) {
    try {
      return JSON.parse(text);
    } catch { // a token that spanned JSON syntax was cut out
      return { contextRedacted: true };
    }
  }
  return {
    contextTruncated: true,
    contextBytes: bytes,
    keys: Object.keys(context).slice(0, 20).map((key) => redact(key.slice(0, 100))),
  };
}

function truncateMessage(message) {
  if (message.length <= MAX_LOG_MESSAGE_LENGTH) return message;
  let end = MAX_LOG_MESSAGE_LENGTH - 1; // room for the ellipsis
  const last = message.charCodeAt(end - 1);
  if (last >= 0xd800 && last <= 0xdbff) end -= 1; // never split a surrogate pair
  return `${message.slice(0, end)}…`;
}

function describe(value) {
  if (value instanceof Error) return `${value.name}: ${value.message}`;
  try {
    return typeof value === "string" ? value : String(value);
  } catch {
    return Object.prototype.toString.call(value);
  }
}

const noRedaction = (text) => text;

/** One entry, measured once: `size` is its encoded length in a frame's `entries` list. */
function makeEntry(level, message, context, redact = noRedaction) {
  const entry = { level, message: truncateMessage(redact(describe(message))),
    timestamp: Date.now() };
  if (context !== undefined) entry.context = context;
  return { entry, size: utf8Length(JSON.stringify(entry)) };
}

/**
 * @param {import("./websocketClient.js").RelaybusClient} client
 * @param {object} [options] see docs/client-js.md
 */
export function createLogger(client, options = {}) {
  return new RelaybusLogger(client, options);
}

export class RelaybusLogger {
  constructor(client, options = {}) {
    this.options = { ...LOGGER_DEFAULTS, ...options };
    this._client = client;
    // No token leaves in a log entry (it would reach the gateway's log): those the client knows,
    // and anything shaped like one (a token the token function has not returned yet, say).
    this._redact = typeof client.redact === "function" ? (text) => client.redact(text)
      : redactTokenShapes;
    this.level = this.options.level;
    this._context = options.context;
    this._queue = [];
    this._unreported = 0; // dropped entries not yet announced to the gateway
    this._droppedTotal = 0;
    this._sentTotal = 0;
    this._tokens = null; // full on first use
    this._refilledAt = Date.now();
    this._timer = null;
    this._disposed = false;
    const flushOnOpen = () => this.flush();
    client.addEventListener("open", flushOnOpen);
    const unsubscribe = client.subscribe((frame) => {
      // The gateway dropped some of ours (its bucket ran dry): wait for ours to refill.
      if (frame.type === "error" && frame.requestId === null
          && frame.error?.code === "overloaded") {
        this._tokens = 0;
      }
    });
    this._detach = [() => client.removeEventListener("open", flushOnOpen), unsubscribe];
    if (this.options.captureGlobalErrors) this._captureGlobalErrors(options.globalTarget);
  }

  get level() {
    return this._level;
  }

  set level(level) {
    if (!LOG_LEVELS.includes(level)) {
      throw new TypeError(`level must be one of ${LOG_LEVELS.join(", ")}`);
    }
    this._level = level;
  }

  debug(message, context) {
    this.log("debug", message, context);
  }

  info(message, context) {
    this.log("info", message, context);
  }

  warn(message, context) {
    this.log("warn", message, context);
  }

  error(message, context) {
    this.log("error", message, context);
  }

  /** Queue one entry (if `level` passes the filter); it is sent with the next batch. */
  log(level, message, context) {
    if (!LOG_LEVELS.includes(level)) {
      throw new TypeError(`level must be one of ${LOG_LEVELS.join(", ")}`);
    }
    if (this._disposed || LOG_LEVELS.indexOf(level) < LOG_LEVELS.indexOf(this._level)) return;
    this._queue.push(makeEntry(level, message, this._mergedContext(context), this._redact));
    if (this._queue.length > this.options.maxBufferEntries) {
      this._queue.shift();
      this._dropped(1);
    }
    if (this._queue.length >= this._maxEntriesPerFrame()) this.flush();
    else this._schedule();
  }

  /** Send what the rate limit allows now; the rest goes with a later flush. */
  flush() {
    while (this._client.state === State.OPEN && this._sendBatch()) {
      // one frame per turn, until the queue, the bucket or the connection runs out
    }
    this._schedule();
  }

  /** How many entries wait, were dropped in all, and were sent in all. */
  get stats() {
    return { queued: this._queue.length, dropped: this._droppedTotal, sent: this._sentTotal };
  }

  /** Remove the global error handlers and stop listening to the client; sends what it can. */
  dispose() {
    if (this._disposed) return;
    this.flush();
    this._disposed = true;
    clearTimeout(this._timer);
    this._timer = null;
    for (const detach of this._detach.splice(0)) detach();
  }

  // Internals

  _mergedContext(context) {
    if (context === undefined && this._context === undefined) return undefined;
    const own = context === undefined || (typeof context === "object" && context !== null
      && !Array.isArray(context)) ? context : { value: context };
    return boundedContext({ ...this._context, ...own }, this._redact);
  }

  _dropped(count) {
    this._unreported += count;
    this._droppedTotal += count;
  }

  _maxEntriesPerFrame() {
    return Math.min(this.options.maxBatchEntries,
      this._client.limits?.maxLogEntriesPerFrame ?? GATEWAY_LOG_ENTRIES_PER_FRAME);
  }

  _refill() {
    const limits = this._client.limits ?? {};
    const rate = this.options.ratePerSecond ?? limits.clientLogPerSecond ?? GATEWAY_LOG_PER_SECOND;
    const burst = this.options.burst ?? Math.max(1,
      Math.floor(BURST_SHARE * (limits.clientLogBurst ?? GATEWAY_LOG_BURST)));
    const now = Date.now();
    const elapsedMs = Math.max(0, now - this._refilledAt);
    this._refilledAt = now;
    this._tokens = Math.min(burst, this._tokens === null ? burst
      : this._tokens + (elapsedMs * rate) / 1000);
  }

  /** Send one frame; false when nothing could be sent. */
  _sendBatch() {
    if (this._queue.length === 0 && this._unreported === 0) return false;
    this._refill();
    const maxBytes = this._client.limits?.maxMessageBytes || Infinity;
    const maxEntries = Math.min(this._maxEntriesPerFrame(), Math.floor(this._tokens));
    const reported = maxEntries > 0 ? this._unreported : 0;
    const notice = reported === 0 ? null : makeEntry("warn",
      `${reported} log ${reported === 1 ? "entry" : "entries"} dropped`,
      { droppedEntries: reported });
    const taken = [];
    let bytes = FRAME_OVERHEAD_BYTES + (notice?.size ?? 0);
    let count = notice === null ? 0 : 1;
    while (this._queue.length > 0 && count < maxEntries) {
      const { size } = this._queue[0];
      if (FRAME_OVERHEAD_BYTES + size > maxBytes) { // can never fit in a frame
        this._queue.shift();
        this._dropped(1);
        continue;
      }
      const added = size + (count > 0 ? 1 : 0);
      if (bytes + added > maxBytes) break;
      taken.push(this._queue.shift());
      bytes += added;
      count += 1;
    }
    if (count === 0) return false;
    const entries = taken.map((item) => item.entry);
    if (notice !== null) entries.unshift(notice.entry);
    try {
      this._client.send({ type: "client-log", entries });
    } catch {
      this._queue.unshift(...taken); // the socket went away under us: keep them for the next open
      return false;
    }
    this._tokens -= count;
    this._sentTotal += taken.length;
    this._unreported -= reported;
    return true;
  }

  _schedule() {
    if (this._timer !== null || this._disposed) return;
    if (this._queue.length === 0 && this._unreported === 0) return;
    if (this._client.state !== State.OPEN) return; // the open event flushes
    this._timer = setTimeout(() => {
      this._timer = null;
      this.flush();
    }, this.options.flushIntervalMs);
  }

  _captureGlobalErrors(target = globalThis) {
    if (typeof target?.addEventListener !== "function") {
      throw new TypeError("captureGlobalErrors needs an EventTarget such as window: pass "
        + "options.globalTarget");
    }
    const onError = (event) => {
      this.error(`uncaught ${describe(event.error ?? event.message)}`, {
        source: "error",
        filename: event.filename,
        lineno: event.lineno,
        colno: event.colno,
        stack: event.error?.stack,
      });
    };
    const onRejection = (event) => {
      this.error(`unhandled rejection: ${describe(event.reason)}`, {
        source: "unhandledrejection",
        stack: event.reason?.stack,
      });
    };
    target.addEventListener("error", onError);
    target.addEventListener("unhandledrejection", onRejection);
    this._detach.push(
      () => target.removeEventListener("error", onError),
      () => target.removeEventListener("unhandledrejection", onRejection));
  }
}

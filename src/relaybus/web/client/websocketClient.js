/**
 * One persistent WebSocket to a relaybus gateway, reconnecting on its own.
 *
 * States: `connecting` (a socket is being opened; the gateway has not said hello yet), `open`
 * (hello received: `limits` and `connectionId` are set), `reconnecting` (the socket dropped;
 * waiting out the backoff delay), `closed` (closed on purpose with `close()`, or dropped with
 * `reconnect: false`; nothing happens until `connect()`).
 */

import { ErrorCode, RelaybusError } from "./errors.js";

export const State = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  CLOSED: "closed",
});

export const CLIENT_DEFAULTS = Object.freeze({
  reconnect: true,
  initialDelayMs: 250,
  maxDelayMs: 10_000,
  jitter: "full",
  connectTimeoutMs: 10_000,
});

const JITTERS = ["full", "decorrelated", "none"];
const encoder = new TextEncoder();

/** Bytes of `text` encoded as UTF-8: what the gateway's maxMessageBytes counts. */
export function utf8Length(text) {
  return encoder.encode(text).byteLength;
}

/**
 * The frame as JSON text, refused locally (RelaybusError) when it cannot be encoded
 * (`bad_request`) or is bigger than the gateway accepts (`payload_too_large`: the gateway would
 * close the whole connection with 1009).
 */
export function encodeFrame(frame, maxMessageBytes) {
  const requestId = typeof frame?.requestId === "string" ? frame.requestId : null;
  let text;
  try {
    text = JSON.stringify(frame);
  } catch (error) {
    throw new RelaybusError(ErrorCode.BAD_REQUEST, `the frame cannot be encoded as JSON: ${error}`,
      { requestId, cause: error });
  }
  if (maxMessageBytes) {
    const size = utf8Length(text);
    if (size > maxMessageBytes) {
      throw new RelaybusError(ErrorCode.PAYLOAD_TOO_LARGE,
        `the message is ${size} bytes; the gateway accepts at most ${maxMessageBytes}`,
        { requestId });
    }
  }
  return text;
}

/** `ws(s)://<this page's host>/ws`, the gateway that served the page. */
export function defaultUrl() {
  const location = globalThis.location;
  if (!location) throw new TypeError("createClient needs a URL outside a browser page");
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
}

function isPromiseLike(value) {
  return typeof value?.then === "function";
}

function buildUrl(url, params) {
  const built = new URL(String(url), globalThis.location?.href);
  if (built.protocol === "http:") built.protocol = "ws:";
  if (built.protocol === "https:") built.protocol = "wss:";
  for (const [name, value] of Object.entries(params ?? {})) {
    if (value !== undefined && value !== null) built.searchParams.set(name, String(value));
  }
  return built.href;
}

function reportListenerError(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else console.error("relaybus: a message subscriber threw", error);
}

/**
 * @param {string | URL | (() => string | URL | Promise<string | URL>)} [url] the gateway's
 *   WebSocket URL, or a function (possibly async) called before every connection attempt; a
 *   relative or http(s) URL is turned into ws(s). Default: `/ws` on the page's own host.
 * @param {object} [options] see docs/client-js.md
 */
export function createClient(url = defaultUrl(), options = {}) {
  return new RelaybusClient(url, options);
}

export class RelaybusClient extends EventTarget {
  constructor(url = defaultUrl(), options = {}) {
    super();
    this.options = { ...CLIENT_DEFAULTS, ...options };
    if (!JITTERS.includes(this.options.jitter)) {
      throw new TypeError(`jitter must be one of ${JITTERS.join(", ")}`);
    }
    this._url = url;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError("no WebSocket implementation here: pass options.WebSocket");
    }
    this._random = options.random ?? Math.random;
    this._subscribers = new Set();
    this._socket = null;
    this._generation = 0; // bumped per attempt and on close(): stale async steps check it
    this._failures = 0; // attempts since the last open; the backoff grows with it
    this._previousDelayMs = this.options.initialDelayMs;
    this._reconnectTimer = null;
    this._helloTimer = null;
    this._closing = false; // close() was called: drops end in `closed`, not `reconnecting`
    /** The gateway's limits from its latest hello (kept across reconnects), or null. */
    this.limits = null;
    /** This connection's id from the gateway's hello, or null while not open. */
    this.connectionId = null;
    this.state = State.CONNECTING;
    this._connect();
  }

  /**
   * Send one frame (an object; it is JSON-encoded here). Throws RelaybusError: `disconnected`
   * when not open, `payload_too_large` over the gateway's maxMessageBytes, `bad_request` when
   * it is not JSON-encodable.
   */
  send(frame) {
    if (this.state !== State.OPEN || this._socket === null) {
      throw new RelaybusError(ErrorCode.DISCONNECTED,
        this.state === State.CLOSED ? "the client is closed" : "not connected to the gateway",
        { requestId: typeof frame?.requestId === "string" ? frame.requestId : null });
    }
    this._socket.send(encodeFrame(frame, this.limits?.maxMessageBytes));
  }

  /** Call `listener(frame)` for every frame from the gateway; returns the unsubscribe function. */
  subscribe(listener) {
    const entry = (frame) => listener(frame);
    this._subscribers.add(entry);
    return () => this._subscribers.delete(entry);
  }

  /**
   * Connect now: after `close()` (or a drop with `reconnect: false`) it starts again; while
   * `reconnecting` it skips the rest of the backoff delay. Otherwise it does nothing.
   */
  connect() {
    if (this.state === State.CLOSED) {
      this._closing = false;
      this._failures = 0;
      this._previousDelayMs = this.options.initialDelayMs;
      this._connect();
    } else if (this.state === State.RECONNECTING) {
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
      this._connect();
    }
  }

  /**
   * Close on purpose: no more reconnects; requests in flight fail with `disconnected`.
   * Resolves once the socket has closed.
   */
  close(code = 1000, reason = "") {
    this._closing = true;
    this._generation += 1;
    clearTimeout(this._reconnectTimer);
    clearTimeout(this._helloTimer);
    this._reconnectTimer = null;
    const socket = this._socket;
    this._socket = null;
    this.connectionId = null;
    let closed = Promise.resolve();
    if (socket !== null && socket.readyState !== 3 /* CLOSED */) {
      closed = new Promise((resolve) => socket.addEventListener("close", () => resolve(),
        { once: true }));
      socket.close(code, reason);
    }
    if (this.state !== State.CLOSED) this._setState(State.CLOSED, { code, reason });
    return closed;
  }

  // Internals

  _setState(state, detail = {}) {
    const previous = this.state;
    this.state = state;
    const full = { state, previous, ...detail };
    this.dispatchEvent(new CustomEvent("state", { detail: full }));
    this.dispatchEvent(new CustomEvent(state, { detail: full }));
  }

  _connect() {
    const generation = ++this._generation;
    this._setState(State.CONNECTING, { retry: this._failures });
    if (this._generation !== generation) return; // a state listener closed or reconnected
    let target;
    try {
      target = this._target();
    } catch (error) {
      this._attemptFailed(generation, error);
      return;
    }
    if (isPromiseLike(target)) {
      target.then((url) => this._open(generation, url),
        (error) => this._attemptFailed(generation, error));
    } else {
      this._open(generation, target);
    }
  }

  _target() {
    const url = typeof this._url === "function" ? this._url() : this._url;
    const params = this.options.params ? this.options.params() : null;
    if (isPromiseLike(url) || isPromiseLike(params)) {
      return Promise.all([url, params]).then(([u, p]) => buildUrl(u, p));
    }
    return buildUrl(url, params);
  }

  _open(generation, url) {
    if (generation !== this._generation) return;
    let socket;
    try {
      socket = new this._WebSocket(url);
    } catch (error) {
      this._attemptFailed(generation, error);
      return;
    }
    this._socket = socket;
    socket.addEventListener("message", (event) => {
      if (this._socket === socket) this._received(event.data);
    });
    socket.addEventListener("close", (event) => {
      if (this._socket === socket) this._socketGone(event.code, event.reason);
    });
    // Browsers follow an error with a close; Node 20's WebSocket does not when the connection
    // is refused. Either way the socket is done: its close event, if any, is ignored.
    // (Forget the socket before closing it: Node's close() fires `error` again, synchronously.)
    socket.addEventListener("error", () => {
      if (this._socket !== socket) return;
      this._socketGone(1006, "the connection failed");
      if (socket.readyState <= 1 /* CONNECTING or OPEN */) socket.close();
    });
    this._helloTimer = setTimeout(() => {
      if (this._socket !== socket) return;
      this._socketGone(null, `no hello from the gateway within ${this.options.connectTimeoutMs} ms`);
      socket.close();
    }, this.options.connectTimeoutMs);
  }

  _attemptFailed(generation, error) {
    if (generation !== this._generation) return;
    this._socketGone(null, String(error?.message ?? error), error);
  }

  _received(data) {
    if (typeof data !== "string") return; // the gateway sends text frames only
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame === null || typeof frame !== "object" || Array.isArray(frame)) return;
    if (frame.type === "hello") {
      this.limits = { ...frame.limits };
      this.connectionId = frame.connectionId ?? null;
      if (this.state !== State.OPEN) {
        clearTimeout(this._helloTimer);
        this._failures = 0;
        this._previousDelayMs = this.options.initialDelayMs;
        this._setState(State.OPEN, { connectionId: this.connectionId });
      }
    }
    for (const subscriber of [...this._subscribers]) {
      try {
        subscriber(frame);
      } catch (error) {
        reportListenerError(error);
      }
    }
    this.dispatchEvent(new CustomEvent("message", { detail: frame }));
  }

  _socketGone(code, reason, error) {
    clearTimeout(this._helloTimer);
    this._socket = null;
    this.connectionId = null;
    const detail = { code, reason, ...(error === undefined ? {} : { error }) };
    if (this._closing || !this.options.reconnect) {
      this._setState(State.CLOSED, detail);
      return;
    }
    const delayMs = this._nextDelayMs();
    this._failures += 1;
    const generation = this._generation;
    this._setState(State.RECONNECTING, { ...detail, delayMs, retry: this._failures });
    if (generation !== this._generation) return; // a state listener called close() or connect()
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      this._connect();
    }, delayMs);
  }

  /** Exponential backoff with jitter; `_failures` counts attempts since the last open. */
  _nextDelayMs() {
    const { initialDelayMs, maxDelayMs, jitter } = this.options;
    if (jitter === "decorrelated") {
      // AWS's "decorrelated jitter": random between the base and three times the last delay.
      const upper = Math.max(initialDelayMs, this._previousDelayMs * 3);
      this._previousDelayMs = Math.min(maxDelayMs,
        initialDelayMs + this._random() * (upper - initialDelayMs));
      return this._previousDelayMs;
    }
    const ceiling = Math.min(maxDelayMs, initialDelayMs * 2 ** this._failures);
    return jitter === "none" ? ceiling : this._random() * ceiling;
  }
}

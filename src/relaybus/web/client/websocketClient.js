/**
 * One persistent WebSocket to a relaybus gateway, reconnecting on its own, optionally
 * authenticated with a bearer token (a string, or a function asked at each attempt and again
 * ahead of the token's expiry, refreshed in-band with `auth` frames).
 *
 * States: `connecting` (a socket is being opened; the gateway has not said hello yet), `open`
 * (hello received: `limits` and `connectionId` are set), `reconnecting` (the socket dropped;
 * waiting out the backoff delay), `unauthorized` (the gateway does not take the token: no
 * socket is opened until the token source yields another one, `setToken()` or `connect()`),
 * `closed` (closed on purpose with `close()`, or dropped with `reconnect: false`; nothing
 * happens until `connect()`).
 */

import { ErrorCode, RelaybusError } from "./errors.js";

export const State = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  UNAUTHORIZED: "unauthorized",
  CLOSED: "closed",
});

export const CLIENT_DEFAULTS = Object.freeze({
  reconnect: true,
  initialDelayMs: 250,
  maxDelayMs: 10_000,
  jitter: "full",
  connectTimeoutMs: 10_000,
  // A token function that has not answered by then is given up: that attempt (or refresh) failed.
  tokenTimeoutMs: 10_000,
  refreshAheadMs: 60_000,
  unauthorizedAfter: 2,
  // ... and over at least this long: a network blip of a second is not the gateway's 401.
  unauthorizedAfterMs: 5_000,
  // A token given up as refused (not one that expired) is tried once more after this long:
  // a page opened during an outage must not stay `unauthorized` for good.
  refusedRetryMs: 60_000,
});

/** The subprotocol the gateway echoes; offered beside the bearer entry. */
export const SUBPROTOCOL = "relaybus.v1";
export const BEARER_SUBPROTOCOL_PREFIX = "base64url.bearer.relaybus.";
/** The close code of a connection whose token expired without a refresh (docs/protocol.md). */
export const CLOSE_TOKEN_EXPIRED = 4401;
/** The gateway refuses longer tokens (HTTP 401 `token too large`): refused here first. */
export const MAX_TOKEN_BYTES = 8192;

const JITTERS = ["full", "decorrelated", "none"];
const encoder = new TextEncoder();
const MIN_REFRESH_GAP_MS = 1000; // between two refreshes, whatever the clocks say
const MAX_TIMER_MS = 2 ** 31 - 1; // setTimeout fires at once beyond this
const REFUSED_TOKENS_KEPT = 8;
const NO_ATTEMPT = Symbol("no socket was opened");
const decoder = new TextDecoder("utf-8", { fatal: true });
// What the gateway redacts from its own logs (admission.py's _SECRETS_IN_TEXT): a query-string
// token, a bearer subprotocol entry, a `Bearer` value, and a JWS in compact form (its header is
// base64url JSON, so it starts with "eyJ"; the signature may be empty).
const SECRET_PATTERNS = [
  /(access_token=)[^&\s"']*/gi,
  /(base64url\.bearer\.relaybus\.)[A-Za-z0-9_-]*/gi,
  /(bearer\s+)[A-Za-z0-9._~+/=-]+/gi,
  /()eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*/g,
];

/** Bytes of `text` encoded as UTF-8: what the gateway's maxMessageBytes counts. */
export function utf8Length(text) {
  return encoder.encode(text).byteLength;
}

/** Unpadded base64url of the text's UTF-8 bytes (browsers refuse `=` and `/` in subprotocols). */
export function base64url(text) {
  const bytes = encoder.encode(text);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * `text` with every token-looking value replaced by `[redacted]`, whoever's it is: a JWT, a
 * bearer subprotocol entry, a `Bearer` value, an `access_token=` parameter.
 */
export function redactTokenShapes(text) {
  let result = String(text);
  for (const pattern of SECRET_PATTERNS) result = result.replace(pattern, "$1[redacted]");
  return result;
}

/**
 * The `sub` claim of a JWT's payload, or null: read WITHOUT checking the signature (only the
 * gateway can). Enough to tell that a token names another principal than the connection's.
 */
function unverifiedSub(token) {
  const payload = typeof token === "string" ? token.split(".")[1] : undefined;
  if (!payload) return null;
  try {
    const binary = atob(payload.replace(/-/g, "+").replace(/_/g, "/"));
    const claims = JSON.parse(decoder.decode(Uint8Array.from(binary, (c) => c.charCodeAt(0))));
    return typeof claims?.sub === "string" ? claims.sub : null;
  } catch {
    return null;
  }
}

/** The subprotocol list a handshake with `token` offers; the gateway echoes `relaybus.v1`. */
export function bearerSubprotocols(token) {
  return [SUBPROTOCOL, BEARER_SUBPROTOCOL_PREFIX + base64url(token)];
}

/** Why `token` cannot be sent (a sentence without the token), or null; null/undefined: none. */
export function tokenProblem(token) {
  if (token === null || token === undefined) return null;
  if (typeof token !== "string") return `a token must be a string, not ${typeof token}`;
  if (token.length === 0) return "a token must not be empty";
  if (utf8Length(token) > MAX_TOKEN_BYTES) {
    return `the token is longer than the gateway accepts (${MAX_TOKEN_BYTES} bytes)`;
  }
  return null;
}

function checkTokenSource(token) {
  if (typeof token === "function") return;
  const problem = tokenProblem(token);
  if (problem !== null) throw new TypeError(`options.token: ${problem}`);
}

/** A hello's or auth-ok's expiresAt when it is a usable time in ms; otherwise null. */
function expiryOf(expiresAt) {
  return typeof expiresAt === "number" && Number.isFinite(expiresAt) ? expiresAt : null;
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

function isPlainObject(value) {
  if (value === null || typeof value !== "object") return false;
  const prototype = Object.getPrototypeOf(value);
  return prototype === Object.prototype || prototype === null;
}

function reportListenerError(error) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(error);
  else console.error("relaybus: a message subscriber threw", error);
}

/**
 * `createClient({url, token, ...options})`, or `createClient(url, options)`.
 *
 * @param {string | URL | (() => string | URL | Promise<string | URL>) | object} [url] the
 *   gateway's WebSocket URL, or a function (possibly async) called before every connection
 *   attempt; a relative or http(s) URL is turned into ws(s). Default: `/ws` on the page's own
 *   host. A plain object is the options, its `url` the URL.
 * @param {object} [options] see docs/client-js.md
 */
export function createClient(url, options = {}) {
  if (isPlainObject(url)) {
    const { url: own, ...rest } = url;
    return new RelaybusClient(own ?? defaultUrl(), { ...rest, ...options });
  }
  return new RelaybusClient(url ?? defaultUrl(), options);
}

export class RelaybusClient extends EventTarget {
  constructor(url = defaultUrl(), options = {}) {
    super();
    this.options = { ...CLIENT_DEFAULTS, ...options };
    if (!JITTERS.includes(this.options.jitter)) {
      throw new TypeError(`jitter must be one of ${JITTERS.join(", ")}`);
    }
    if (!(Number.isInteger(this.options.unauthorizedAfter) && this.options.unauthorizedAfter > 0)) {
      throw new TypeError("unauthorizedAfter must be a positive integer");
    }
    for (const name of ["unauthorizedAfterMs", "refusedRetryMs"]) {
      const value = this.options[name];
      if (!(Number.isFinite(value) && value >= 0)) {
        throw new TypeError(`${name} must be a number of milliseconds >= 0`);
      }
    }
    const { tokenTimeoutMs } = this.options;
    if (!(Number.isFinite(tokenTimeoutMs) && tokenTimeoutMs > 0)) {
      throw new TypeError("tokenTimeoutMs must be a number of milliseconds > 0");
    }
    checkTokenSource(options.token);
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
    // Authentication (all unused without options.token)
    this._tokenSource = options.token ?? null; // string, function, or null: no auth
    this._attemptToken = NO_ATTEMPT; // what the current socket's handshake offered
    this._opened = false; // the current socket fired `open`: its handshake was accepted
    this._connectionToken = null; // the token the open connection holds (handshake or auth)
    this._accepted = null; // {token, until}: the gateway took this token, valid until (ms)
    this._suspect = null; // {token, failures}: handshakes failed in a row with this token
    this._refused = []; // [{token, reason}]: tokens the gateway surely does not take
    this._forceRefresh = false; // the next ask says the last token may be stale
    this._refreshTimer = null;
    this._refreshDueAt = null;
    this._refreshPending = null; // {token, timer}: a refresh from the ask to the answer
    this._refreshRefused = null; // the token this connection's gateway refused in-band
    this._refreshFailures = 0;
    this._refreshQueued = false; // setToken() while a refresh was under way
    this._lastRefreshAt = null;
    /** The gateway's limits from its latest hello (kept across reconnects), or null. */
    this.limits = null;
    /** This connection's id from the gateway's hello, or null while not open. */
    this.connectionId = null;
    /** Who the token proved ({sub, expiresAt}) from hello and auth-ok, or null. */
    this.principal = null;
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
   * `reconnecting` it skips the rest of the backoff delay; while `unauthorized` it tries once
   * more with whatever the token source gives, refused tokens included. Otherwise it does
   * nothing.
   */
  connect() {
    if (this.state === State.CLOSED || this.state === State.UNAUTHORIZED) {
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
      this._closing = false;
      if (this.state === State.CLOSED) { // from `unauthorized` the backoff goes on: no storm
        this._failures = 0;
        this._previousDelayMs = this.options.initialDelayMs;
      }
      this._refused = [];
      this._suspect = null;
      this._connect();
    } else if (this.state === State.RECONNECTING) {
      clearTimeout(this._reconnectTimer);
      this._reconnectTimer = null;
      this._connect();
    }
  }

  /**
   * Replace the token source (a string, a function, or null for none). While open, the new
   * token is sent at once as an in-band refresh when it names the connection's `sub`;
   * otherwise (another `sub`, no token, a token whose `sub` cannot be read) the client
   * reconnects with it, so that the gateway's principal is the one the token proves. While
   * `connecting`, the attempt starts again with it; while `reconnecting` or `unauthorized`,
   * the client connects with it now.
   */
  setToken(token) {
    checkTokenSource(token);
    const same = (token ?? null) === this._tokenSource;
    this._tokenSource = token ?? null;
    // The same refused token: no storm; the attempt under way offers it already.
    if (same && (this.state === State.UNAUTHORIZED || this.state === State.CONNECTING)) return;
    this._refused = [];
    this._suspect = null;
    this._refreshRefused = null;
    if (this.state === State.OPEN && this.principal !== null) { // the gateway authenticates
      if (this._authInFlight !== null) {
        this._refreshQueued = true; // answers come in order: send it after this one's
      } else {
        this._refreshPending = null; // a token still being asked is the old source's: dropped
        this._refreshNow();
      }
    } else if (this.state === State.CONNECTING) {
      this._restart(undefined, "the token changed");
    } else if (this.state === State.UNAUTHORIZED || this.state === State.RECONNECTING) {
      this.connect();
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
    this._stopRefreshing();
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

  /**
   * `text` with every token this client knows replaced by `[redacted]`, and anything shaped
   * like a token (redactTokenShapes): a JWT the token source has not handed over yet, or one
   * the client no longer holds, is a JWT still. The logger ships nothing through it that would
   * show one.
   */
  redact(text) {
    let result = String(text);
    for (const token of this._knownTokens()) {
      for (const form of [token, base64url(token), JSON.stringify(token).slice(1, -1)]) {
        if (form.length > 0) result = result.split(form).join("[redacted]");
      }
    }
    return redactTokenShapes(result);
  }

  // Internals

  get _authenticating() {
    return this._tokenSource !== null;
  }

  _knownTokens() {
    const tokens = new Set([this._tokenSource, this._attemptToken, this._connectionToken,
      this._accepted?.token, this._suspect?.token, this._refreshPending?.token,
      this._refreshRefused, ...this._refused.map((entry) => entry.token)]);
    return [...tokens].filter((token) => typeof token === "string" && token.length > 0);
  }

  _setState(state, detail = {}) {
    const previous = this.state;
    this.state = state;
    const full = { state, previous, ...detail };
    this.dispatchEvent(new CustomEvent("state", { detail: full }));
    this.dispatchEvent(new CustomEvent(state, { detail: full }));
  }

  /**
   * Ask the token source (a string is its own answer); may return a promise, which rejects
   * when the function has not answered within tokenTimeoutMs (its late answer is dropped).
   */
  _askToken(reason) {
    const source = this._tokenSource;
    if (typeof source !== "function") return source;
    const answer = source({ forceRefresh: reason !== "connect" || this._forceRefresh, reason });
    if (!isPromiseLike(answer)) return answer;
    const { tokenTimeoutMs } = this.options;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new RelaybusError(ErrorCode.TIMEOUT,
        `the token function did not answer within ${tokenTimeoutMs} ms`)), tokenTimeoutMs);
      Promise.resolve(answer).then((token) => {
        clearTimeout(timer);
        resolve(token);
      }, (error) => {
        clearTimeout(timer);
        reject(error);
      });
    });
  }

  /**
   * Why `token` is not offered again ("expired", "refused"), or null: it expired on a
   * connection (4401), or its handshakes failed `unauthorizedAfter` times in a row while
   * nothing said it was good (see _judgeDrop).
   */
  _verdict(token) {
    const refused = this._refused.find((entry) => entry.token === token);
    if (refused === undefined) return null;
    if (refused.reason === "refused" && Date.now() - refused.at >= this.options.refusedRetryMs) {
      this._refused = this._refused.filter((entry) => entry !== refused);
      // Worth one more try (the refusals may have been an outage); one more failure gives it
      // up again.
      this._suspect = { token, failures: this.options.unauthorizedAfter - 1, since: -Infinity };
      return null;
    }
    return refused.reason;
  }

  _remember(token, reason) {
    this._refused = this._refused.filter((entry) => entry.token !== token);
    this._refused.push({ token, reason, at: Date.now() });
    if (this._refused.length > REFUSED_TOKENS_KEPT) this._refused.shift();
  }

  _isKnownGood(token) {
    return this._accepted !== null && this._accepted.token === token
      && this._accepted.until > Date.now();
  }

  _connect(preset, detail = {}) {
    const generation = ++this._generation;
    this._attemptToken = NO_ATTEMPT;
    this._setState(State.CONNECTING, { retry: this._failures, ...detail });
    if (this._generation !== generation) return; // a state listener closed or reconnected
    let target;
    try {
      target = this._target(preset);
    } catch (error) {
      this._attemptFailed(generation, error);
      return;
    }
    if (isPromiseLike(target)) {
      target.then((resolved) => this._begin(generation, resolved),
        (error) => this._attemptFailed(generation, error));
    } else {
      this._begin(generation, target);
    }
  }

  _target(preset) {
    const url = typeof this._url === "function" ? this._url() : this._url;
    const params = this.options.params ? this.options.params() : null;
    const token = preset !== undefined ? preset.token
      : this._authenticating ? this._askToken("connect") : null;
    if (isPromiseLike(url) || isPromiseLike(params) || isPromiseLike(token)) {
      return Promise.all([url, params, token]).then(([u, p, t]) => ({ url: buildUrl(u, p),
        token: t }));
    }
    return { url: buildUrl(url, params), token };
  }

  _begin(generation, { url, token }) {
    if (generation !== this._generation) return;
    if (this._authenticating) {
      const problem = tokenProblem(token);
      if (problem !== null) {
        this._unauthorized("invalid", `the token source gave an unusable token: ${problem}`);
        return;
      }
      const verdict = this._verdict(token ?? null);
      if (verdict !== null) {
        this._unauthorized(verdict, verdict === "expired"
          ? "the token expired (close code 4401) and the token source gave no new one"
          : `the gateway refused this token at ${this.options.unauthorizedAfter} handshakes `
            + "in a row (browsers hide the HTTP status; a 401 is the likely cause)");
        return;
      }
    }
    this._open(generation, url, this._authenticating ? token ?? null : undefined);
  }

  _open(generation, url, token) {
    if (generation !== this._generation) return;
    const protocols = typeof token === "string" ? bearerSubprotocols(token) : null;
    let socket;
    try {
      socket = protocols === null ? new this._WebSocket(url) : new this._WebSocket(url, protocols);
    } catch (error) {
      // A browser's message may quote the subprotocols, the token's base64url with them.
      this._attemptFailed(generation, protocols === null ? error
        : new Error(`the WebSocket could not be created (${error?.name ?? "Error"})`));
      return;
    }
    this._socket = socket;
    this._attemptToken = token;
    this._opened = false;
    socket.addEventListener("open", () => {
      if (this._socket !== socket) return;
      this._opened = true;
      this._suspect = null; // the handshake took the token
    });
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
      this._attemptToken = NO_ATTEMPT; // a timeout is no refusal: a 401 comes at once
      this._socketGone(null, `no hello from the gateway within ${this.options.connectTimeoutMs} ms`);
      socket.close();
    }, this.options.connectTimeoutMs);
  }

  /**
   * Drop the socket on purpose (no failure: no backoff, nothing concluded about its token) and
   * connect again at once, with `preset.token` when given, else with what the source gives.
   */
  _restart(preset, reason) {
    const socket = this._socket;
    clearTimeout(this._helloTimer);
    this._stopRefreshing();
    this._socket = null;
    this.connectionId = null;
    this._opened = false;
    this._connectionToken = null;
    if (socket !== null && socket.readyState <= 1 /* CONNECTING or OPEN */) {
      socket.close(1000, reason);
    }
    this._connect(preset, { code: 1000, reason });
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
        this._helloReceived(frame.principal);
        this._setState(State.OPEN, { connectionId: this.connectionId });
      }
    } else if (frame.type === "auth-ok") {
      this._refreshAccepted(frame.expiresAt);
    } else if (frame.type === "error" && frame.requestId == null
               && frame.error?.code === ErrorCode.UNAUTHORIZED) {
      this._refreshRefusedBy(frame.error);
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
    this._stopRefreshing();
    const opened = this._opened;
    // What the connection held last: the handshake's token, or the one an auth-ok took.
    const token = opened && this._connectionToken !== null ? this._connectionToken
      : this._attemptToken;
    this._socket = null;
    this.connectionId = null;
    this._attemptToken = NO_ATTEMPT;
    this._opened = false;
    this._connectionToken = null;
    if (this._authenticating && token !== NO_ATTEMPT) this._judgeDrop(token, opened, code);
    const detail = { code, reason, ...(error === undefined ? {} : { error }) };
    if (this._closing || !this.options.reconnect) {
      this._setState(State.CLOSED, detail);
      return;
    }
    this._scheduleAttempt(State.RECONNECTING, detail, () => this._connect());
  }

  /** What a dropped socket says about the token it offered. */
  _judgeDrop(token, opened, code) {
    if (code === CLOSE_TOKEN_EXPIRED) {
      this._remember(token, "expired");
      if (this._accepted?.token === token) this._accepted = null;
      this._forceRefresh = true;
    } else if (!opened) {
      // Refused at the handshake, or never reached the gateway: browsers do not say which.
      this._forceRefresh = true;
      if (this._isKnownGood(token)) return; // taken before and unexpired: the network, likely
      if (token === null) return; // anonymous: there is no token to give up
      const same = this._suspect?.token === token;
      const failures = same ? this._suspect.failures + 1 : 1;
      const since = same ? this._suspect.since : Date.now();
      this._suspect = { token, failures, since };
      if (failures >= this.options.unauthorizedAfter
          && Date.now() - since >= this.options.unauthorizedAfterMs) {
        this._suspect = null;
        this._remember(token, "refused");
      }
    }
  }

  /** Enter `state` and run `next` after the backoff delay (unless a listener intervened). */
  _scheduleAttempt(state, detail, next) {
    const delayMs = this._nextDelayMs();
    this._failures += 1;
    const generation = this._generation;
    this._setState(state, { ...detail, delayMs, retry: this._failures });
    if (generation !== this._generation) return; // a state listener called close() or connect()
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      next();
    }, delayMs);
  }

  /**
   * The token is not taken: no socket until the token source yields another (a function is
   * asked again at the backoff cadence), `setToken()` or `connect()`.
   */
  _unauthorized(reason, message) {
    const detail = { reason, message };
    if (typeof this._tokenSource !== "function") {
      const wasUnauthorized = this.state === State.UNAUTHORIZED;
      if (!wasUnauthorized) this._setState(State.UNAUTHORIZED, detail);
      if (reason === "refused" && this.state === State.UNAUTHORIZED) {
        clearTimeout(this._reconnectTimer); // one slow retry of the same string, then again
        this._reconnectTimer = setTimeout(() => {
          this._reconnectTimer = null;
          this._connect();
        }, this.options.refusedRetryMs);
      }
      return;
    }
    if (this.state === State.UNAUTHORIZED) { // still the same answer: keep polling quietly
      const delayMs = this._nextDelayMs();
      this._failures += 1;
      this._reconnectTimer = setTimeout(() => this._pollToken(), delayMs);
      return;
    }
    this._scheduleAttempt(State.UNAUTHORIZED, detail, () => this._pollToken());
  }

  /** While `unauthorized`: connect only when the token source gives a token worth trying. */
  _pollToken() {
    this._reconnectTimer = null;
    const generation = ++this._generation;
    const retry = () => {
      if (generation === this._generation) this._unauthorized();
    };
    let token;
    try {
      token = this._askToken("unauthorized");
    } catch {
      retry();
      return;
    }
    Promise.resolve(token).then((value) => {
      if (generation !== this._generation) return;
      if (tokenProblem(value) !== null || this._verdict(value ?? null) !== null) retry();
      else this._connect({ token: value });
    }, retry);
  }

  // The in-band refresh

  _helloReceived(principal) {
    this._connectionToken = this._attemptToken === NO_ATTEMPT ? null : this._attemptToken;
    this.principal = isPlainObject(principal) ? { ...principal } : null;
    if (!this._authenticating) return;
    this._forceRefresh = false;
    this._suspect = null;
    const expiresAt = expiryOf(this.principal?.expiresAt);
    this._accepted = { token: this._connectionToken, until: expiresAt ?? Infinity };
    this._refused = this._refused.filter((entry) => entry.token !== this._connectionToken);
    this._refreshFailures = 0;
    this._scheduleRefresh(expiresAt);
  }

  /** Refresh when `refreshAheadMs` is left, but not before half the remaining lifetime. */
  _scheduleRefresh(expiresAt) {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (expiresAt === null || typeof this._tokenSource !== "function") return;
    const now = Date.now();
    const remaining = expiresAt - now;
    let dueAt = now + Math.max(remaining - this.options.refreshAheadMs, remaining / 2, 0);
    if (this._lastRefreshAt !== null) dueAt = Math.max(dueAt, this._lastRefreshAt + MIN_REFRESH_GAP_MS);
    this._refreshAt(dueAt);
  }

  _refreshAt(dueAt) {
    clearTimeout(this._refreshTimer);
    this._refreshDueAt = dueAt;
    this._refreshTimer = setTimeout(() => {
      this._refreshTimer = null;
      if (Date.now() < this._refreshDueAt) this._refreshAt(this._refreshDueAt); // capped timer
      else this._refreshNow();
    }, Math.min(MAX_TIMER_MS, Math.max(0, dueAt - Date.now())));
  }

  /**
   * Nothing new to send: ask again later, backing off up to maxDelayMs. Only a function can
   * give something new: a string (or no token) is not asked again, and its connection ends
   * with 4401 at the token's expiry.
   */
  _refreshLater() {
    if (typeof this._tokenSource !== "function") return;
    const { initialDelayMs, maxDelayMs } = this.options;
    const delayMs = Math.min(maxDelayMs, initialDelayMs * 2 ** this._refreshFailures);
    this._refreshFailures += 1;
    this._refreshAt(Date.now() + Math.max(delayMs, MIN_REFRESH_GAP_MS));
  }

  _refreshNow() {
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    const socket = this._socket;
    if (this.state !== State.OPEN || socket === null || this._refreshPending !== null) return;
    // One refresh at a time, from the ask to the answer: an answer is always this one's.
    const pending = { token: null, timer: null };
    this._refreshPending = pending;
    const current = () => this._socket === socket && this._refreshPending === pending;
    let token;
    try {
      token = this._askToken("refresh");
    } catch {
      this._refreshEnded();
      return;
    }
    Promise.resolve(token).then((value) => {
      if (current()) this._offerToken(pending, socket, value ?? null);
    }, () => {
      if (current()) this._refreshEnded();
    });
  }

  /** The source's answer on an open connection: an `auth` frame, a new connection, or nothing. */
  _offerToken(pending, socket, token) {
    if (tokenProblem(token) !== null || token === this._connectionToken
        || (token !== null && token === this._refreshRefused)) {
      this._refreshEnded();
      return;
    }
    if (this._namesAnotherPrincipal(token)) {
      this._restart({ token }, "the token changed to another principal");
      return;
    }
    this._lastRefreshAt = Date.now();
    try {
      this.send({ type: "auth", token });
    } catch {
      this._refreshEnded();
      return;
    }
    pending.token = token;
    pending.timer = setTimeout(() => {
      if (this._refreshPending !== pending) return;
      // The gateway's answers name no auth frame: a late one would be taken for the next
      // token's. A new connection leaves no doubt about which token it holds.
      this._socketGone(null,
        `no answer to an auth frame within ${this.options.connectTimeoutMs} ms`);
      socket.close();
    }, this.options.connectTimeoutMs);
  }

  /**
   * Whether `token` (not the one the connection holds) may prove someone else than this
   * connection's principal: no token, a token on an anonymous connection, or one whose
   * payload's `sub` (read unverified) is not the connection's. The gateway refuses a refresh
   * with another `sub`: only a new connection can hold it.
   */
  _namesAnotherPrincipal(token) {
    if (token === null || this._connectionToken === null) return true;
    return unverifiedSub(token) !== this.principal.sub;
  }

  /** The refresh ended without an `auth` frame in flight: the queued one, or a later one. */
  _refreshEnded() {
    this._refreshPending = null;
    this._refreshLater();
    this._sendQueuedRefresh();
  }

  /** The auth frame in flight, or null (none was sent, or its token is still being asked). */
  get _authInFlight() {
    const pending = this._refreshPending;
    return pending !== null && pending.timer !== null ? pending : null;
  }

  _refreshAccepted(rawExpiresAt) {
    const pending = this._authInFlight;
    if (pending === null) return;
    clearTimeout(pending.timer);
    this._refreshPending = null;
    this._refreshFailures = 0;
    const expiresAt = expiryOf(rawExpiresAt);
    this._connectionToken = pending.token;
    this._accepted = { token: pending.token, until: expiresAt ?? Infinity };
    if (this.principal !== null) this.principal = { ...this.principal, expiresAt };
    this.dispatchEvent(new CustomEvent("auth", { detail: { ok: true, expiresAt } }));
    this._scheduleRefresh(expiresAt);
    this._sendQueuedRefresh();
  }

  _sendQueuedRefresh() {
    if (!this._refreshQueued || this.state !== State.OPEN) return;
    this._refreshQueued = false;
    this._refreshNow();
  }

  _refreshRefusedBy(error) {
    const pending = this._authInFlight;
    if (pending === null) return;
    clearTimeout(pending.timer);
    this._refreshPending = null;
    this._refreshRefused = pending.token;
    const message = this.redact(String(error?.message ?? ""));
    this.dispatchEvent(new CustomEvent("auth", {
      detail: { ok: false, code: ErrorCode.UNAUTHORIZED, message } }));
    this._refreshLater();
    this._sendQueuedRefresh();
  }

  _stopRefreshing() {
    clearTimeout(this._refreshTimer);
    clearTimeout(this._refreshPending?.timer);
    this._refreshTimer = null;
    this._refreshPending = null;
    this._refreshRefused = null;
    this._refreshFailures = 0;
    this._refreshQueued = false;
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

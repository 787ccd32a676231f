/**
 * One request to the workers behind the gateway: a Promise of the final response's data that
 * is also an async iterator of its chunks.
 *
 * Every request ends exactly once, locally too: with the gateway's response or error, or with
 * `cancelled` (cancel()/abort), `timeout` (no answer by timeoutMs + grace), `disconnected`
 * (the socket dropped, or did not come back within waitMs) or `overloaded` (no free slot under
 * maxInFlight within waitMs).
 */

import { ErrorCode, RelaybusError } from "./errors.js";
import { State } from "./websocketClient.js";

export const REQUEST_DEFAULTS = Object.freeze({
  waitMs: 10_000,
  localGraceMs: 2_000,
});

let fallbackCounter = 0;

/** A requestId unique on this page: a random UUID, or a counter plus random bits. */
export function newRequestId() {
  const crypto = globalThis.crypto;
  if (typeof crypto?.randomUUID === "function") return crypto.randomUUID();
  fallbackCounter += 1;
  const random = typeof crypto?.getRandomValues === "function"
    ? Array.from(crypto.getRandomValues(new Uint32Array(2)), (n) => n.toString(36)).join("")
    : Math.random().toString(36).slice(2);
  return `r-${Date.now().toString(36)}-${fallbackCounter.toString(36)}-${random}`;
}

/**
 * Per client: the requests waiting to be sent (FIFO) and those in flight (by requestId), with
 * one frame subscription for all of them.
 */
class Dispatcher {
  constructor(client) {
    this.client = client;
    this.waiting = [];
    this.inFlight = new Map();
    this.pumping = false;
    client.subscribe((frame) => {
      if (typeof frame.requestId === "string") this.inFlight.get(frame.requestId)?._frame(frame);
    });
    client.addEventListener("state", (event) => this._stateChanged(event.detail));
  }

  enqueue(request) {
    this.waiting.push(request);
    this.pump();
  }

  remove(request) {
    if (this.inFlight.get(request.requestId) === request) {
      this.inFlight.delete(request.requestId);
      this.pump();
    } else {
      const index = this.waiting.indexOf(request);
      if (index !== -1) this.waiting.splice(index, 1);
    }
  }

  /** Send waiting requests while the client is open and maxInFlight allows. */
  pump() {
    if (this.pumping) return;
    this.pumping = true;
    try {
      const maxInFlight = this.client.limits?.maxInFlight || Infinity;
      while (this.waiting.length > 0 && this.client.state === State.OPEN
             && this.inFlight.size < maxInFlight) {
        const request = this.waiting.shift();
        if (request._transmit()) this.inFlight.set(request.requestId, request);
      }
    } finally {
      this.pumping = false;
    }
  }

  _stateChanged({ state, code, reason }) {
    if (state === State.OPEN) {
      this.pump();
      return;
    }
    for (const request of [...this.inFlight.values()]) {
      request._finish(new RelaybusError(ErrorCode.DISCONNECTED,
        `the connection closed (${code ?? "no code"}${reason ? `: ${reason}` : ""}) `
        + "before the request ended", { requestId: request.requestId }));
    }
    if (state === State.CLOSED) {
      for (const request of [...this.waiting]) {
        request._finish(new RelaybusError(ErrorCode.DISCONNECTED, "the client was closed",
          { requestId: request.requestId }));
      }
    } else if (state === State.UNAUTHORIZED) {
      for (const request of [...this.waiting]) request._finish(unauthorized(request.requestId));
    }
  }
}

function unauthorized(requestId) {
  return new RelaybusError(ErrorCode.UNAUTHORIZED,
    "the gateway does not take the client's token (its state is `unauthorized`)", { requestId });
}

const dispatchers = new WeakMap();

function dispatcherFor(client) {
  let dispatcher = dispatchers.get(client);
  if (dispatcher === undefined) {
    dispatcher = new Dispatcher(client);
    dispatchers.set(client, dispatcher);
  }
  return dispatcher;
}

/**
 * Send a request; returns a BackendRequest (await it, or `for await` its chunks).
 *
 * @param {import("./websocketClient.js").RelaybusClient} client
 * @param {string} requestType
 * @param {unknown} [payload]
 * @param {{timeoutMs?: number, onChunk?: (data: unknown, seq: number) => void,
 *          signal?: AbortSignal, waitMs?: number, localGraceMs?: number}} [options]
 */
export function makeBackendRequest(client, requestType, payload = null, options = {}) {
  return new BackendRequest(client, requestType, payload, options);
}

export class BackendRequest {
  constructor(client, requestType, payload, options = {}) {
    const { timeoutMs, onChunk, signal } = options;
    this.requestId = newRequestId();
    this._client = client;
    this._frameToSend = { type: "request", requestId: this.requestId, requestType, payload };
    if (timeoutMs !== undefined) this._frameToSend.timeoutMs = timeoutMs;
    this._timeoutMs = timeoutMs;
    this._localGraceMs = options.localGraceMs ?? REQUEST_DEFAULTS.localGraceMs;
    this._onChunk = onChunk ?? null;
    this._signal = signal ?? null;
    this._dispatcher = dispatcherFor(client);
    this._sent = false;
    this._done = false;
    this._error = null;
    this._nextSeq = 0;
    this._early = new Map(); // chunks that arrived ahead of their turn, by seq
    this._chunks = []; // for the iterator (only when there is no onChunk)
    this._readers = []; // pending iterator next() calls
    this._timer = null;
    this._promise = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    // A rejection reaches whoever awaits the request or iterates it; one that nobody asked
    // for (fire-and-forget, or iterating only) is not an unhandled rejection.
    this._promise.catch(() => {});
    this._abort = () => this._cancel("the request was aborted", this._signal.reason);

    if (timeoutMs !== undefined && !(Number.isInteger(timeoutMs) && timeoutMs > 0)) {
      this._finish(new RelaybusError(ErrorCode.BAD_REQUEST, "timeoutMs must be a positive integer",
        { requestId: this.requestId }));
      return;
    }
    if (this._signal?.aborted) {
      this._finish(new RelaybusError(ErrorCode.CANCELLED, "the request was aborted before it started",
        { requestId: this.requestId, cause: this._signal.reason }));
      return;
    }
    if (client.state === State.CLOSED) {
      this._finish(new RelaybusError(ErrorCode.DISCONNECTED, "the client is closed",
        { requestId: this.requestId }));
      return;
    }
    if (client.state === State.UNAUTHORIZED) {
      this._finish(unauthorized(this.requestId));
      return;
    }
    this._signal?.addEventListener("abort", this._abort, { once: true });
    const waitMs = Math.min(options.waitMs ?? REQUEST_DEFAULTS.waitMs, timeoutMs ?? Infinity);
    this._timer = setTimeout(() => this._waitedTooLong(waitMs), waitMs);
    this._dispatcher.enqueue(this);
  }

  then(onFulfilled, onRejected) {
    return this._promise.then(onFulfilled, onRejected);
  }

  catch(onRejected) {
    return this._promise.catch(onRejected);
  }

  finally(onFinally) {
    return this._promise.finally(onFinally);
  }

  get [Symbol.toStringTag]() {
    return "BackendRequest";
  }

  /** Stop the request: sends `cancel` if it was sent, and rejects at once with `cancelled`. */
  cancel() {
    this._cancel("the request was cancelled");
  }

  /**
   * The chunks' data in seq order; ends after the response, throws the request's error.
   * Chunks are kept from the start until read. Leaving the loop early cancels the request.
   * Not available when the request was made with onChunk.
   */
  [Symbol.asyncIterator]() {
    if (this._onChunk !== null) {
      throw new TypeError("this request delivers its chunks to onChunk; iterate one made without");
    }
    const iterator = {
      next: () => this._read(),
      return: () => {
        this.cancel();
        return Promise.resolve({ done: true, value: undefined });
      },
      [Symbol.asyncIterator]: () => iterator,
    };
    return iterator;
  }

  // Internals (called by the Dispatcher)

  /** Send the request frame; true when it is now in flight. */
  _transmit() {
    try {
      this._client.send(this._frameToSend);
    } catch (error) {
      this._finish(error instanceof RelaybusError ? error : new RelaybusError(
        ErrorCode.BAD_REQUEST, String(error), { requestId: this.requestId, cause: error }));
      return false;
    }
    this._sent = true;
    this._frameToSend = null;
    clearTimeout(this._timer);
    const deadlineMs = this._timeoutMs ?? this._client.limits?.defaultTimeoutMs;
    if (deadlineMs) {
      this._timer = setTimeout(() => this._timedOut(deadlineMs), deadlineMs + this._localGraceMs);
    }
    return true;
  }

  _frame(frame) {
    if (this._done) return;
    if (frame.type === "chunk") {
      this._chunk(frame.seq, frame.data);
    } else if (frame.type === "response") {
      this._finish(null, frame.data);
    } else if (frame.type === "error") {
      const error = frame.error ?? {};
      // Rule 3 of the protocol: it is about another frame that reused this id; ours goes on.
      if (error.code === ErrorCode.DUPLICATE_REQUEST_ID) return;
      this._finish(new RelaybusError(String(error.code), String(error.message ?? ""),
        { requestId: this.requestId }));
    }
  }

  _chunk(seq, data) {
    if (!Number.isInteger(seq) || seq < this._nextSeq || this._early.has(seq)) return;
    this._early.set(seq, data);
    while (!this._done && this._early.has(this._nextSeq)) {
      const next = this._nextSeq;
      const chunk = this._early.get(next);
      this._early.delete(next);
      this._nextSeq += 1;
      this._deliver(chunk, next);
    }
  }

  _deliver(data, seq) {
    if (this._onChunk === null) {
      const reader = this._readers.shift();
      if (reader) reader.resolve({ done: false, value: data });
      else this._chunks.push(data);
      return;
    }
    try {
      this._onChunk(data, seq);
    } catch (error) {
      // The caller's bug ends this request only, as in the Python client.
      this._cancel(`onChunk threw ${error}; the request was cancelled`, error);
    }
  }

  _read() {
    if (this._chunks.length > 0) {
      return Promise.resolve({ done: false, value: this._chunks.shift() });
    }
    if (this._done) {
      return this._error ? Promise.reject(this._error)
        : Promise.resolve({ done: true, value: undefined });
    }
    return new Promise((resolve, reject) => this._readers.push({ resolve, reject }));
  }

  _cancel(message, cause) {
    if (this._done) return;
    this._sendCancel();
    this._finish(new RelaybusError(ErrorCode.CANCELLED, message,
      { requestId: this.requestId, ...(cause === undefined ? {} : { cause }) }));
  }

  _sendCancel() {
    if (!this._sent) return;
    try {
      this._client.send({ type: "cancel", requestId: this.requestId });
    } catch {
      // Not connected: the gateway cancelled it when the connection closed.
    }
  }

  _waitedTooLong(waitMs) {
    const open = this._client.state === State.OPEN;
    this._finish(new RelaybusError(open ? ErrorCode.OVERLOADED : ErrorCode.DISCONNECTED, open
      ? `no free slot under the gateway's maxInFlight (${this._client.limits?.maxInFlight}) `
        + `within ${waitMs} ms`
      : `not connected to the gateway within ${waitMs} ms`, { requestId: this.requestId }));
  }

  _timedOut(deadlineMs) {
    if (this._done) return;
    this._sendCancel();
    this._finish(new RelaybusError(ErrorCode.TIMEOUT,
      `no answer from the gateway within ${deadlineMs} ms (+ ${this._localGraceMs} ms grace)`,
      { requestId: this.requestId }));
  }

  /** The one way out: settles the promise and the iterator, frees the slot. */
  _finish(error, data) {
    if (this._done) return;
    this._done = true;
    this._error = error;
    clearTimeout(this._timer);
    this._signal?.removeEventListener("abort", this._abort);
    this._early.clear();
    this._dispatcher?.remove(this);
    const readers = this._readers.splice(0);
    if (error) {
      this._reject(error);
      for (const reader of readers) reader.reject(error);
    } else {
      this._resolve(data);
      for (const reader of readers) reader.resolve({ done: true, value: undefined });
    }
  }
}

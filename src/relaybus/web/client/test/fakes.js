/**
 * Test doubles: a scriptable WebSocket (the test plays the gateway) and helpers shared by the
 * test files. Loaded by `node --test` as a file too; it defines no tests.
 */

import { createClient } from "../relaybus.js";

export const LIMITS = Object.freeze({
  maxMessageBytes: 1_048_576,
  maxInFlight: 100,
  defaultTimeoutMs: 30_000,
  maxTimeoutMs: 300_000,
  clientLogPerSecond: 20,
  clientLogBurst: 100,
  maxLogEntriesPerFrame: 50,
});

/** Like the browser's WebSocket; the test drives the server side with open/hello/receive/drop. */
export class FakeWebSocket extends EventTarget {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;

  constructor(url, protocols) {
    super();
    this.url = url;
    this.protocols = protocols; // undefined when the client offered none (one argument)
    this.argumentCount = arguments.length;
    this.readyState = FakeWebSocket.CONNECTING;
    this.sent = [];
    this.closedWith = null;
    this.constructor.instances.push(this);
  }

  /** Each test gets a class of its own, so instance lists never leak between tests. */
  static fresh() {
    return class extends FakeWebSocket {
      static instances = [];
    };
  }

  send(text) {
    if (this.readyState === FakeWebSocket.CONNECTING) throw new Error("InvalidStateError");
    if (this.readyState === FakeWebSocket.OPEN) this.sent.push(JSON.parse(text));
  }

  close(code = 1000, reason = "") {
    if (this.readyState >= FakeWebSocket.CLOSING) return;
    const connecting = this.readyState === FakeWebSocket.CONNECTING;
    this.readyState = FakeWebSocket.CLOSING;
    // As Node's WebSocket does: closing before the open fails the connection, at once.
    if (connecting) this.dispatchEvent(new Event("error"));
    this.closedWith = { code, reason };
    queueMicrotask(() => this.drop(code, reason));
  }

  // The gateway's side

  open() {
    this.readyState = FakeWebSocket.OPEN;
    this.dispatchEvent(new Event("open"));
  }

  hello(limits = {}, connectionId = "conn-1") {
    if (this.readyState === FakeWebSocket.CONNECTING) this.open();
    this.receive({ type: "hello", connectionId, protocol: 1, limits: { ...LIMITS, ...limits } });
  }

  receive(frame) {
    const event = new Event("message");
    event.data = typeof frame === "string" ? frame : JSON.stringify(frame);
    this.dispatchEvent(event);
  }

  drop(code = 1006, reason = "") {
    if (this.readyState === FakeWebSocket.CLOSED) return;
    this.readyState = FakeWebSocket.CLOSED;
    const event = new Event("close");
    Object.assign(event, { code, reason, wasClean: code !== 1006 });
    this.dispatchEvent(event);
  }

  /** The connection failed: an error event, without the close event browsers add. */
  fail() {
    this.dispatchEvent(new Event("error"));
  }

  sentOfType(type) {
    return this.sent.filter((frame) => frame.type === type);
  }
}

/** A client on a fresh fake socket class; `sockets` lists every socket it opened. */
export function fakeClient(options = {}) {
  const Socket = FakeWebSocket.fresh();
  const client = createClient("ws://gateway.test/ws", { WebSocket: Socket, ...options });
  return { client, sockets: Socket.instances, socket: () => Socket.instances.at(-1) };
}

/** A client that has had its hello. */
export function openClient(limits = {}, options = {}) {
  const fake = fakeClient(options);
  fake.socket().hello(limits);
  return fake;
}

/** Let pending promise callbacks run (setImmediate is not faked by the tests' mock timers). */
export function settle() {
  return new Promise((resolve) => setImmediate(resolve));
}

/** The promise's outcome without waiting for it: {status: "pending"|"fulfilled"|"rejected"}. */
export async function peek(promise) {
  const pending = { status: "pending" };
  return Promise.race([
    Promise.resolve(promise).then((value) => ({ status: "fulfilled", value }),
      (reason) => ({ status: "rejected", reason })),
    settle().then(() => pending),
  ]);
}

/** Record the client's `state` events as a list of state names. */
export function recordStates(client) {
  const states = [];
  client.addEventListener("state", (event) => states.push(event.detail.state));
  return states;
}

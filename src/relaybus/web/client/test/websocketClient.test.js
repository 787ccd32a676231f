import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, mock, test } from "node:test";

import { createClient, ErrorCode, RelaybusError, State } from "../relaybus.js";
import { FakeWebSocket, fakeClient, openClient, recordStates, settle } from "./fakes.js";

beforeEach(() => mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 }));
afterEach(() => mock.timers.reset());

describe("connecting", () => {
  test("opens a socket at once and is open after the gateway's hello", () => {
    const { client, sockets, socket } = fakeClient();
    const states = recordStates(client);
    assert.equal(sockets.length, 1);
    assert.equal(socket().url, "ws://gateway.test/ws");
    assert.equal(client.state, State.CONNECTING);
    socket().open();
    assert.equal(client.state, State.CONNECTING, "open without hello is not open yet");
    socket().hello({ maxMessageBytes: 500 }, "abc");
    assert.equal(client.state, State.OPEN);
    assert.equal(client.connectionId, "abc");
    assert.equal(client.limits.maxMessageBytes, 500);
    assert.equal(client.limits.maxInFlight, 100);
    assert.deepEqual(states, [State.OPEN]);
  });

  test("each state change fires `state` and an event named after the state, in order", () => {
    const { client, socket } = fakeClient({ random: () => 1 });
    const states = recordStates(client);
    const named = [];
    for (const name of Object.values(State)) {
      client.addEventListener(name, (event) => named.push(`${name}<-${event.detail.previous}`));
    }
    socket().hello();
    socket().drop(1006);
    mock.timers.tick(250);
    socket().hello();
    client.close();
    assert.deepEqual(states, ["open", "reconnecting", "connecting", "open", "closed"]);
    assert.deepEqual(named, ["open<-connecting", "reconnecting<-open", "connecting<-reconnecting",
      "open<-connecting", "closed<-open"]);
  });

  test("the URL function (possibly async) and params are asked again on every attempt", async () => {
    const Socket = FakeWebSocket.fresh();
    let token = 0;
    const client = createClient(async () => "http://gateway.test/ws?v=1", {
      WebSocket: Socket,
      params: () => ({ token: `t${++token}`, absent: undefined }),
      random: () => 1,
    });
    await settle();
    assert.equal(Socket.instances[0].url, "ws://gateway.test/ws?v=1&token=t1");
    Socket.instances[0].drop();
    mock.timers.tick(250);
    await settle();
    assert.equal(Socket.instances[1].url, "ws://gateway.test/ws?v=1&token=t2");
    client.close();
  });

  test("a URL function that fails counts as a failed attempt and is retried", async () => {
    const Socket = FakeWebSocket.fresh();
    let calls = 0;
    const client = createClient(() => {
      calls += 1;
      if (calls === 1) throw new Error("no token yet");
      return "wss://gateway.test/ws";
    }, { WebSocket: Socket, random: () => 1 });
    assert.equal(client.state, State.RECONNECTING);
    assert.equal(Socket.instances.length, 0);
    mock.timers.tick(250);
    assert.equal(Socket.instances[0].url, "wss://gateway.test/ws");
    client.close();
  });

  test("a socket that opens but gets no hello within connectTimeoutMs is dropped", () => {
    const { client, sockets, socket } = fakeClient({ connectTimeoutMs: 3000, random: () => 1 });
    socket().open();
    mock.timers.tick(2999);
    assert.equal(client.state, State.CONNECTING);
    mock.timers.tick(1);
    assert.equal(client.state, State.RECONNECTING);
    assert.equal(sockets[0].readyState, FakeWebSocket.CLOSING);
    mock.timers.tick(250);
    assert.equal(sockets.length, 2);
    client.close();
  });

  test("a socket that never opens is given up after connectTimeoutMs, once", () => {
    const { client, sockets, socket } = fakeClient({ connectTimeoutMs: 3000, random: () => 1 });
    const reasons = [];
    client.addEventListener("reconnecting", (event) => reasons.push(event.detail.reason));
    mock.timers.tick(3000);
    assert.deepEqual(reasons, ["no hello from the gateway within 3000 ms"]);
    assert.equal(socket().readyState, FakeWebSocket.CLOSING);
    mock.timers.tick(250);
    assert.equal(sockets.length, 2);
    client.close();
  });

  test("an unknown jitter and a missing WebSocket are refused at once", () => {
    assert.throws(() => createClient("ws://x/ws", { WebSocket: FakeWebSocket.fresh(),
      jitter: "some" }), TypeError);
    assert.throws(() => createClient("ws://x/ws", { WebSocket: null }), TypeError);
  });
});

describe("reconnecting", () => {
  /** Drop the current socket before it opens; returns the announced delay. */
  function failAttempt(client, socket) {
    let delayMs;
    client.addEventListener("reconnecting", (event) => { delayMs = event.detail.delayMs; },
      { once: true });
    socket().drop(1006);
    return delayMs;
  }

  test("full jitter: a random share of an exponential ceiling, capped", () => {
    const { client, sockets, socket } = fakeClient({ random: () => 0.5 });
    const delays = [];
    for (let i = 0; i < 8; i += 1) {
      const delay = failAttempt(client, socket);
      delays.push(delay);
      mock.timers.tick(delay - 1);
      assert.equal(sockets.length, i + 1, "no new attempt before the delay");
      mock.timers.tick(1);
      assert.equal(sockets.length, i + 2);
    }
    assert.deepEqual(delays, [125, 250, 500, 1000, 2000, 4000, 5000, 5000]);
    client.close();
  });

  test("no jitter: the exponential ceiling itself, from initialDelayMs up to maxDelayMs", () => {
    const { client, socket } = fakeClient({ jitter: "none", initialDelayMs: 100, maxDelayMs: 700 });
    const delays = [];
    for (let i = 0; i < 5; i += 1) {
      delays.push(failAttempt(client, socket));
      mock.timers.tick(delays.at(-1));
    }
    assert.deepEqual(delays, [100, 200, 400, 700, 700]);
    client.close();
  });

  test("decorrelated jitter: between the base and three times the last delay, capped", () => {
    const randoms = [1, 1, 0, 1, 1, 1, 1];
    const { client, socket } = fakeClient({ jitter: "decorrelated", random: () => randoms.shift() });
    const delays = [];
    for (let i = 0; i < 7; i += 1) {
      delays.push(failAttempt(client, socket));
      mock.timers.tick(delays.at(-1));
    }
    assert.deepEqual(delays, [750, 2250, 250, 750, 2250, 6750, 10000]);
    client.close();
  });

  test("the backoff starts over after a successful open", () => {
    for (const jitter of ["full", "decorrelated"]) {
      const { client, socket } = fakeClient({ jitter, random: () => 1 });
      const first = failAttempt(client, socket);
      mock.timers.tick(first);
      const second = failAttempt(client, socket);
      mock.timers.tick(second);
      assert.ok(second > first, `${jitter}: the delay grows while attempts fail`);
      socket().hello();
      assert.equal(failAttempt(client, socket), first, `${jitter}: reset by the open`);
      client.close();
    }
  });

  test("reports the close code and reason of the drop", () => {
    const { client, socket } = openClient({}, { random: () => 1 });
    let detail;
    client.addEventListener("reconnecting", (event) => { detail = event.detail; });
    socket().drop(1001, "going away");
    assert.equal(detail.code, 1001);
    assert.equal(detail.reason, "going away");
    assert.equal(detail.previous, State.OPEN);
    assert.equal(client.connectionId, null);
    client.close();
  });

  test("connect() while reconnecting skips the rest of the delay", () => {
    const { client, sockets, socket } = openClient({}, { jitter: "none", initialDelayMs: 5000 });
    socket().drop();
    assert.equal(client.state, State.RECONNECTING);
    client.connect();
    assert.equal(client.state, State.CONNECTING);
    assert.equal(sockets.length, 2);
    mock.timers.tick(5000);
    assert.equal(sockets.length, 2, "the skipped timer does not open another");
    client.close();
  });

  test("an error event ends the attempt even when no close event follows", () => {
    const { client, sockets, socket } = fakeClient({ random: () => 1 });
    const details = [];
    client.addEventListener("reconnecting", (event) => details.push(event.detail));
    socket().fail();
    assert.equal(client.state, State.RECONNECTING);
    assert.equal(details.length, 1, "one drop, however many error events closing it fires");
    assert.equal(details[0].code, 1006);
    assert.equal(sockets[0].readyState, FakeWebSocket.CLOSING, "closed on our side");
    mock.timers.tick(250);
    assert.equal(sockets.length, 2);
    client.close();
  });

  test("reconnect: false ends in closed after a drop", () => {
    const { client, sockets, socket } = openClient({}, { reconnect: false });
    socket().drop(1006);
    assert.equal(client.state, State.CLOSED);
    mock.timers.tick(60_000);
    assert.equal(sockets.length, 1);
  });
});

describe("closing on purpose", () => {
  test("close() closes the socket with 1000 and never reconnects", async () => {
    const { client, sockets, socket } = openClient();
    const closed = client.close();
    assert.equal(client.state, State.CLOSED);
    assert.deepEqual(socket().closedWith, { code: 1000, reason: "" });
    await closed;
    assert.equal(socket().readyState, FakeWebSocket.CLOSED);
    mock.timers.tick(60_000);
    assert.equal(sockets.length, 1);
    assert.equal(client.state, State.CLOSED);
  });

  test("close() during the backoff delay cancels the pending attempt", () => {
    const { client, sockets, socket } = openClient({}, { random: () => 1 });
    socket().drop();
    client.close();
    mock.timers.tick(60_000);
    assert.equal(sockets.length, 1);
    assert.equal(client.state, State.CLOSED);
  });

  test("close() while an async URL is pending opens nothing", async () => {
    const Socket = FakeWebSocket.fresh();
    const client = createClient(async () => "ws://gateway.test/ws", { WebSocket: Socket });
    client.close();
    await settle();
    assert.equal(Socket.instances.length, 0);
    assert.equal(client.state, State.CLOSED);
  });

  test("connect() after close() starts again with a fresh backoff", () => {
    const { client, sockets } = openClient({}, { jitter: "none" });
    client.close();
    client.connect();
    assert.equal(client.state, State.CONNECTING);
    assert.equal(sockets.length, 2);
    sockets[1].hello();
    assert.equal(client.state, State.OPEN);
    client.close();
  });
});

describe("sending and receiving", () => {
  test("send() refuses a frame bigger than the hello's maxMessageBytes, counting UTF-8 bytes", () => {
    const { client, socket } = openClient({ maxMessageBytes: 41 });
    // {"type":"x","p":""} is 19 bytes; each "é" adds 2 (one character in JavaScript).
    const frameOfBytes = (n) => ({ type: "x", p: "é".repeat((n - 19) / 2) });
    client.send(frameOfBytes(41));
    assert.equal(socket().sent.length, 1);
    assert.throws(() => client.send(frameOfBytes(43)), (error) => {
      assert.ok(error instanceof RelaybusError);
      assert.equal(error.code, ErrorCode.PAYLOAD_TOO_LARGE);
      assert.match(error.message, /43 bytes.*at most 41/);
      return true;
    });
    assert.equal(socket().sent.length, 1, "nothing over the limit reaches the socket");
  });

  test("send() refuses when not open, and a frame that is not JSON", () => {
    const { client, socket } = fakeClient();
    assert.throws(() => client.send({ type: "x" }), { code: ErrorCode.DISCONNECTED });
    socket().hello();
    assert.throws(() => client.send({ type: "x", n: 1n }), { code: ErrorCode.BAD_REQUEST });
    client.close();
    assert.throws(() => client.send({ type: "x" }), { code: ErrorCode.DISCONNECTED,
      message: "the client is closed" });
  });

  test("subscribers and `message` listeners get every JSON object frame", () => {
    const { client, socket } = fakeClient();
    const seen = [];
    const events = [];
    const unsubscribe = client.subscribe((frame) => seen.push(frame.type));
    client.addEventListener("message", (event) => events.push(event.detail.type));
    socket().hello();
    socket().receive({ type: "chunk", requestId: "r", seq: 0, data: 1 });
    socket().receive("not json");
    socket().receive("[1, 2]");
    unsubscribe();
    socket().receive({ type: "response", requestId: "r", data: 1 });
    assert.deepEqual(seen, ["hello", "chunk"]);
    assert.deepEqual(events, ["hello", "chunk", "response"]);
  });

  test("a subscriber that throws is reported and does not stop the others", () => {
    const reported = mock.method(console, "error", () => {});
    const { client, socket } = fakeClient();
    const seen = [];
    client.subscribe(() => { throw new Error("subscriber bug"); });
    client.subscribe((frame) => seen.push(frame.type));
    socket().hello();
    assert.deepEqual(seen, ["hello"]);
    assert.equal(reported.mock.callCount(), 1);
    assert.equal(reported.mock.calls[0].arguments[1].message, "subscriber bug");
    reported.mock.restore();
  });
});

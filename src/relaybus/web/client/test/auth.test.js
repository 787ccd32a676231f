import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, mock, test } from "node:test";

import {
  BEARER_SUBPROTOCOL_PREFIX, CLOSE_TOKEN_EXPIRED, createClient, createLogger, ErrorCode,
  makeBackendRequest, MAX_TOKEN_BYTES, State, SUBPROTOCOL,
} from "../relaybus.js";
import { FakeWebSocket, LIMITS, peek, recordStates, settle } from "./fakes.js";

const NOW = 1_000_000;

beforeEach(() => mock.timers.enable({ apis: ["setTimeout", "Date"], now: NOW }));
afterEach(() => mock.timers.reset());

/** A client with `token` (and options) on a fresh fake socket class. */
function authClient(token, options = {}) {
  const Socket = FakeWebSocket.fresh();
  const client = createClient({ url: "ws://gateway.test/ws", token, WebSocket: Socket,
    random: () => 1, ...options });
  return { client, sockets: Socket.instances, socket: () => Socket.instances.at(-1) };
}

/** A JWS-shaped token for `sub` (nothing here checks its signature: the tests play the gateway). */
function jwt(sub, tag = "") {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  return `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub, jti: tag })}.`
    + Buffer.from(`signature ${tag}`).toString("base64url");
}

const [A1, A2, A3] = ["1", "2", "3"].map((tag) => jwt("alice", tag));

/** A token function that answers from `tokens` (the last one sticks) and records its calls. */
function tokenFunction(...tokens) {
  const calls = [];
  const next = async (hint) => {
    calls.push(hint);
    return tokens.length > 1 ? tokens.shift() : tokens[0];
  };
  next.calls = calls;
  next.give = (...more) => tokens.splice(0, tokens.length, ...more);
  return next;
}

/** The token a socket's handshake offered, decoded from its bearer subprotocol. */
function offeredToken(socket) {
  const entry = socket.protocols?.find((p) => p.startsWith(BEARER_SUBPROTOCOL_PREFIX));
  if (entry === undefined) return null;
  return Buffer.from(entry.slice(BEARER_SUBPROTOCOL_PREFIX.length), "base64url").toString();
}

/** A promise and its resolve function: a token function's answer the test gives when it likes. */
function deferred() {
  let resolve;
  const promise = new Promise((r) => { resolve = r; });
  return { promise, resolve };
}

/** Counts the timers armed from now on (wrapping the mocked setTimeout); `stop()` unwraps. */
function countTimers() {
  const original = globalThis.setTimeout;
  const counter = { armed: 0, stop: () => { globalThis.setTimeout = original; } };
  globalThis.setTimeout = (...args) => {
    counter.armed += 1;
    return original(...args);
  };
  return counter;
}

function helloAs(socket, principal = { sub: "alice", expiresAt: NOW + 3_600_000 }) {
  socket.open();
  socket.receive({ type: "hello", connectionId: "conn-1", protocol: 1, limits: LIMITS,
    principal });
}

function authEvents(client) {
  const events = [];
  client.addEventListener("auth", (event) => events.push(event.detail));
  return events;
}

function unauthorizedEvents(client) {
  const events = [];
  client.addEventListener("unauthorized", (event) => events.push(event.detail));
  return events;
}

describe("the token at the handshake", () => {
  test("a string token travels as the bearer subprotocol beside relaybus.v1, not in the URL", () => {
    const token = "eyJhbGciOi.héllo-wörld.✓"; // UTF-8 bytes, and lengths that would need padding
    const { client, socket } = authClient(token);
    assert.equal(socket().url, "ws://gateway.test/ws");
    assert.deepEqual(socket().protocols, [SUBPROTOCOL,
      BEARER_SUBPROTOCOL_PREFIX + Buffer.from(token, "utf8").toString("base64url")]);
    assert.doesNotMatch(socket().protocols[1], /[=+/]/);
    assert.equal(offeredToken(socket()), token);
    client.close();
  });

  test("without a token the socket is opened as before: no subprotocol at all", () => {
    for (const token of [undefined, null]) {
      const { client, socket } = authClient(token);
      assert.equal(socket().argumentCount, 1);
      assert.equal(socket().protocols, undefined);
      client.close();
    }
  });

  test("createClient({url, ...options}) and createClient(url, options) are the same", () => {
    const Socket = FakeWebSocket.fresh();
    const one = createClient({ url: "http://gateway.test/ws", token: "t", WebSocket: Socket });
    const two = createClient("http://gateway.test/ws", { token: "t", WebSocket: Socket });
    const three = createClient(new URL("http://gateway.test/ws"), { token: "t", WebSocket: Socket });
    assert.deepEqual(Socket.instances.map((s) => [s.url, offeredToken(s)]),
      Array(3).fill(["ws://gateway.test/ws", "t"]));
    assert.equal("url" in one.options, false);
    for (const client of [one, two, three]) client.close();
  });

  test("a token function (async) is asked at every attempt; forceRefresh after a failed one", async () => {
    const token = tokenFunction("t1", "t2", "t3");
    const { client, sockets, socket } = authClient(token);
    await settle();
    assert.equal(offeredToken(socket()), "t1");
    helloAs(socket());
    socket().drop(1006); // a drop after the open: the token is not in doubt
    mock.timers.tick(250);
    await settle();
    assert.equal(offeredToken(socket()), "t2");
    socket().drop(1006); // failed before the open: refused, or never reached the gateway
    mock.timers.tick(500);
    await settle();
    assert.equal(offeredToken(socket()), "t3");
    assert.deepEqual(token.calls, [
      { forceRefresh: false, reason: "connect" },
      { forceRefresh: false, reason: "connect" },
      { forceRefresh: true, reason: "connect" },
    ]);
    assert.equal(sockets.length, 3);
    client.close();
  });

  test("a token function that throws counts as a failed attempt and is asked again", async () => {
    let calls = 0;
    const { client, sockets } = authClient(() => {
      calls += 1;
      if (calls === 1) throw new Error("the login service is down");
      return "t";
    });
    assert.equal(client.state, State.RECONNECTING);
    assert.equal(sockets.length, 0);
    mock.timers.tick(250);
    assert.equal(offeredToken(sockets[0]), "t");
    client.close();
  });
});

describe("refreshing the token in-band", () => {
  test("ahead of hello's expiresAt; auth-ok moves the schedule on", async () => {
    const token = tokenFunction(A1, A2, A3);
    const { client, socket } = authClient(token, { refreshAheadMs: 60_000 });
    const auth = authEvents(client);
    await settle();
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 600_000 });
    assert.deepEqual(client.principal, { sub: "alice", expiresAt: NOW + 600_000 });
    mock.timers.tick(539_999);
    await settle();
    assert.equal(token.calls.length, 1);
    mock.timers.tick(1);
    await settle();
    assert.deepEqual(token.calls[1], { forceRefresh: true, reason: "refresh" });
    assert.deepEqual(socket().sentOfType("auth"), [{ type: "auth", token: A2 }]);

    const renewedUntil = Date.now() + 600_000;
    socket().receive({ type: "auth-ok", expiresAt: renewedUntil });
    assert.deepEqual(auth, [{ ok: true, expiresAt: renewedUntil }]);
    assert.equal(client.principal.expiresAt, renewedUntil);
    mock.timers.tick(539_999);
    await settle();
    assert.equal(socket().sentOfType("auth").length, 1, "the new expiry sets the next refresh");
    mock.timers.tick(1);
    await settle();
    assert.deepEqual(socket().sentOfType("auth").at(-1), { type: "auth", token: A3 });
    assert.equal(client.state, State.OPEN);
    client.close();
  });

  test("a short-lived token is refreshed at half its remaining lifetime", async () => {
    const token = tokenFunction(A1, A2);
    const { client, socket } = authClient(token);
    await settle();
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 4000 });
    mock.timers.tick(1999);
    await settle();
    assert.equal(socket().sentOfType("auth").length, 0);
    mock.timers.tick(1);
    await settle();
    assert.deepEqual(socket().sentOfType("auth"), [{ type: "auth", token: A2 }]);
    client.close();
  });

  test("the token the connection holds already is not sent again; it is asked again later", async () => {
    const token = tokenFunction(A1);
    const { client, socket } = authClient(token);
    await settle();
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 4000 });
    mock.timers.tick(2000);
    await settle();
    assert.equal(token.calls.length, 2);
    assert.equal(socket().sentOfType("auth").length, 0);
    mock.timers.tick(999);
    await settle();
    assert.equal(token.calls.length, 2, "at most one ask a second");
    token.give(A2);
    mock.timers.tick(1);
    await settle();
    assert.deepEqual(socket().sentOfType("auth"), [{ type: "auth", token: A2 }]);
    client.close();
  });

  test("a refused refresh: an `auth` event, the connection goes on, the refused token is not resent", async () => {
    const token = tokenFunction(A1, A2);
    const { client, socket } = authClient(token);
    const auth = authEvents(client);
    const unauthorized = unauthorizedEvents(client);
    await settle();
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 4000 });
    mock.timers.tick(2000);
    await settle();
    socket().receive({ type: "error", requestId: null,
      error: { code: "unauthorized", message: "bad signature" } });
    assert.deepEqual(auth, [{ ok: false, code: ErrorCode.UNAUTHORIZED,
      message: "bad signature" }]);
    assert.equal(client.state, State.OPEN);
    assert.deepEqual(unauthorized, [], "the client did not stop: no `unauthorized` state");
    mock.timers.tick(1000);
    await settle();
    assert.equal(socket().sentOfType("auth").length, 1, "the refused token is not sent again");
    token.give(A3);
    mock.timers.tick(2000);
    await settle();
    assert.deepEqual(socket().sentOfType("auth").at(-1), { type: "auth", token: A3 });
    client.close();
  });

  test("an auth frame without an answer in connectTimeoutMs: a new connection; a late auth-ok is credited to nothing", async () => {
    const token = tokenFunction(A1, A2, A3);
    const { client, sockets, socket } = authClient(token, { connectTimeoutMs: 3000 });
    const auth = authEvents(client);
    await settle();
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 20_000 });
    mock.timers.tick(10_000);
    await settle();
    const first = socket();
    assert.deepEqual(first.sentOfType("auth").map((f) => f.token), [A2]);
    mock.timers.tick(2999);
    assert.equal(client.state, State.OPEN);
    mock.timers.tick(1); // no answer: the gateway's answers name no auth frame, so no guessing
    assert.equal(client.state, State.RECONNECTING);
    assert.deepEqual(first.closedWith, { code: 1000, reason: "" });
    mock.timers.tick(250);
    await settle();
    assert.equal(sockets.length, 2);
    assert.equal(offeredToken(socket()), A3);
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 600_000 });
    first.receive({ type: "auth-ok", expiresAt: NOW + 900_000 }); // A2's answer, late
    assert.deepEqual(auth, []);
    assert.equal(client.principal.expiresAt, NOW + 600_000);
    mock.timers.tick(1000);
    await settle();
    assert.deepEqual(first.sentOfType("auth").map((f) => f.token), [A2], "nothing more on it");
    assert.deepEqual(socket().sentOfType("auth"), []);
    client.close();
  });

  test("setToken() while open sends the new token at once", async () => {
    const { client, socket } = authClient(A1);
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 600_000 });
    client.setToken(A2);
    await settle();
    assert.deepEqual(socket().sentOfType("auth"), [{ type: "auth", token: A2 }]);
    socket().receive({ type: "auth-ok", expiresAt: NOW + 900_000 });
    assert.equal(client.principal.expiresAt, NOW + 900_000);
    client.close();
  });

  test("setToken() while a refresh awaits its answer sends the new token after that answer", async () => {
    const token = tokenFunction(A1, A2);
    const { client, socket } = authClient(token);
    await settle();
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 4000 });
    mock.timers.tick(2000);
    await settle();
    assert.deepEqual(socket().sentOfType("auth").map((f) => f.token), [A2]);
    client.setToken(A3);
    await settle();
    assert.equal(socket().sentOfType("auth").length, 1, "one auth frame at a time");
    socket().receive({ type: "auth-ok", expiresAt: NOW + 600_000 });
    await settle();
    assert.deepEqual(socket().sentOfType("auth").map((f) => f.token), [A2, A3]);
    client.close();
  });

  test("no refresh without an expiry: a gateway without keys, and hostile expiresAt values", async () => {
    for (const principal of [null, { sub: "a", expiresAt: null }, { sub: "a", expiresAt: "soon" },
      { sub: "a", expiresAt: Number.NaN }, { sub: "a", expiresAt: 1e300 }, "alice", [1]]) {
      const token = tokenFunction(A1, A2);
      const { client, socket } = authClient(token);
      await settle();
      helloAs(socket(), principal);
      mock.timers.tick(86_400_000);
      await settle();
      assert.equal(token.calls.length, 1, JSON.stringify(principal));
      assert.equal(socket().sentOfType("auth").length, 0, JSON.stringify(principal));
      assert.equal(client.state, State.OPEN);
      client.close();
    }
  });

  test("auth-ok and unauthorized errors nobody asked for are ignored", () => {
    const { client, socket } = authClient(A1);
    const auth = authEvents(client);
    helloAs(socket());
    socket().receive({ type: "auth-ok", expiresAt: 1 });
    socket().receive({ type: "error", requestId: null, error: { code: "unauthorized" } });
    assert.deepEqual(auth, []);
    assert.equal(client.principal.expiresAt, NOW + 3_600_000);
    client.close();
  });
});

describe("the unauthorized state", () => {
  test("4401 with a string token: `unauthorized` (expired) and no socket until setToken()", () => {
    const { client, sockets, socket } = authClient("t1");
    const states = recordStates(client);
    const unauthorized = unauthorizedEvents(client);
    helloAs(socket());
    socket().drop(CLOSE_TOKEN_EXPIRED, "the token expired");
    mock.timers.tick(250);
    assert.deepEqual(states, ["open", "reconnecting", "connecting", "unauthorized"]);
    assert.equal(unauthorized.length, 1);
    assert.equal(unauthorized[0].reason, "expired");
    mock.timers.tick(600_000);
    assert.equal(sockets.length, 1, "nothing is retried with the expired token");
    client.setToken("t2");
    assert.equal(sockets.length, 2);
    assert.equal(offeredToken(socket()), "t2");
    helloAs(socket());
    assert.equal(client.state, State.OPEN);
    client.close();
  });

  test("4401 with a token function that has a new token: reconnects with it", async () => {
    const token = tokenFunction("t1", "t2");
    const { client, sockets, socket } = authClient(token);
    await settle();
    helloAs(socket());
    socket().drop(CLOSE_TOKEN_EXPIRED, "the token expired");
    mock.timers.tick(250);
    await settle();
    assert.equal(sockets.length, 2);
    assert.equal(offeredToken(socket()), "t2");
    assert.deepEqual(token.calls.at(-1), { forceRefresh: true, reason: "connect" });
    client.close();
  });

  test("the same token failing at the handshake: `unauthorized`, no reconnect storm, a new token resumes", async () => {
    const token = tokenFunction("bad");
    const { client, sockets, socket } = authClient(token, { maxDelayMs: 5000,
      unauthorizedAfterMs: 0 }); // the count alone here; the time span is tested below
    const unauthorized = unauthorizedEvents(client);
    await settle();
    socket().drop(1006); // what a browser shows for a 401: no open, 1006
    mock.timers.tick(250);
    await settle();
    socket().fail(); // error without close: the same for the library
    mock.timers.tick(500);
    await settle();
    assert.equal(client.state, State.UNAUTHORIZED);
    assert.equal(unauthorized.length, 1);
    assert.equal(unauthorized[0].reason, "refused");
    assert.match(unauthorized[0].message, /2 handshakes in a row/);
    assert.equal(sockets.length, 2);

    const asked = token.calls.length;
    for (let i = 0; i < 11; i += 1) {
      mock.timers.tick(5000);
      await settle();
    }
    assert.equal(sockets.length, 2, "no socket for the same token within refusedRetryMs");
    assert.ok(token.calls.length >= asked + 9, "the token function is polled at the backoff cadence");
    assert.ok(token.calls.slice(asked).every((c) => c.forceRefresh && c.reason === "unauthorized"));
    assert.equal(unauthorized.length, 1, "polling does not repeat the event");

    token.give("good");
    mock.timers.tick(5000);
    await settle();
    assert.equal(sockets.length, 3);
    assert.equal(offeredToken(socket()), "good");
    helloAs(socket());
    assert.equal(client.state, State.OPEN);
    client.close();
  });

  test("a string token failing at the handshake stops, retried once a minute or on connect()", () => {
    const { client, sockets, socket } = authClient("bad", { unauthorizedAfter: 3 });
    for (let i = 0; i < 3; i += 1) {
      socket().drop(1006);
      mock.timers.tick(10_000);
    }
    assert.equal(client.state, State.UNAUTHORIZED);
    assert.equal(sockets.length, 3);
    mock.timers.tick(59_000);
    assert.equal(sockets.length, 3, "no storm: nothing within the minute");
    mock.timers.tick(1_000);
    assert.equal(sockets.length, 4, "one slow retry: the refusals may have been an outage");
    socket().drop(1006); // refused again at once: given up for another minute
    mock.timers.tick(10_000);
    assert.equal(client.state, State.UNAUTHORIZED);
    assert.equal(sockets.length, 4);
    client.connect();
    assert.equal(sockets.length, 5);
    assert.equal(client.state, State.CONNECTING);
    client.close();
  });

  test("a blip before the first hello is no refusal: the failures must span unauthorizedAfterMs", () => {
    const { client, sockets, socket } = authClient("good");
    socket().drop(1006);
    mock.timers.tick(1);
    mock.timers.tick(250);
    socket().drop(1006); // twice within a second: the network, not the gateway
    mock.timers.tick(1_000);
    assert.notEqual(client.state, State.UNAUTHORIZED);
    assert.equal(sockets.length, 3);
    helloAs(socket());
    assert.equal(client.state, State.OPEN);
    client.close();
  });

  test("anonymous attempts (a function returning null) are never given up", async () => {
    const token = tokenFunction(null);
    const { client, sockets, socket } = authClient(token, { unauthorizedAfterMs: 0 });
    for (let i = 0; i < 5; i += 1) {
      await settle();
      socket().drop(1006);
      mock.timers.tick(10_000);
    }
    await settle();
    assert.notEqual(client.state, State.UNAUTHORIZED);
    assert.equal(sockets.length, 6);
    client.close();
  });

  test("setToken() with the same refused token does not start a handshake storm", () => {
    const { client, sockets, socket } = authClient("bad", { unauthorizedAfterMs: 0 });
    socket().drop(1006);
    mock.timers.tick(10_000);
    socket().drop(1006);
    mock.timers.tick(10_000);
    assert.equal(client.state, State.UNAUTHORIZED);
    const before = sockets.length;
    for (let i = 0; i < 20; i += 1) client.setToken("bad");
    mock.timers.tick(1_000);
    assert.equal(sockets.length, before);
    client.setToken("new");
    assert.equal(sockets.length, before + 1);
    client.close();
  });

  test("a token the gateway took, still unexpired, is not given up when the network fails", () => {
    const { client, sockets, socket } = authClient("good");
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 3_600_000 });
    socket().drop(1006); // the gateway restarts: refused connections for a while
    for (let i = 0; i < 6; i += 1) {
      mock.timers.tick(10_000);
      socket().drop(1006);
    }
    assert.equal(client.state, State.RECONNECTING);
    assert.equal(sockets.length, 7);
    mock.timers.tick(10_000);
    helloAs(socket());
    assert.equal(client.state, State.OPEN);
    client.close();
  });

  test("a socket that never answers (connect timeout) is no refusal", () => {
    const { client, sockets } = authClient("t1", { connectTimeoutMs: 1000 });
    for (let i = 0; i < 4; i += 1) {
      mock.timers.tick(1000); // the attempt times out...
      mock.timers.tick(10_000); // ...and the next one starts after the delay
    }
    assert.notEqual(client.state, State.UNAUTHORIZED);
    assert.ok(sockets.length >= 4);
    client.close();
  });

  test("requests waiting fail with `unauthorized`; new ones fail at once", async () => {
    const { client, socket } = authClient("bad", { unauthorizedAfter: 1, unauthorizedAfterMs: 0 });
    const waiting = makeBackendRequest(client, "echo", 1);
    socket().drop(1006);
    mock.timers.tick(250);
    assert.equal(client.state, State.UNAUTHORIZED);
    const outcome = await peek(waiting);
    assert.equal(outcome.status, "rejected");
    assert.equal(outcome.reason.code, ErrorCode.UNAUTHORIZED);
    const late = await peek(makeBackendRequest(client, "echo", 2));
    assert.equal(late.reason.code, ErrorCode.UNAUTHORIZED);
    client.close();
  });

  test("hostile token values: refused at once as options, `unauthorized` from a function", async () => {
    const huge = "x".repeat(MAX_TOKEN_BYTES + 1);
    for (const bad of [42, "", huge, {}, ["t"], true]) {
      assert.throws(() => authClient(bad), TypeError);
    }
    assert.doesNotThrow(() => authClient("é".repeat(MAX_TOKEN_BYTES / 2)).client.close());
    for (const bad of [42, "", huge, { token: "t" }]) {
      const { client, sockets } = authClient(async () => bad);
      const unauthorized = unauthorizedEvents(client);
      await settle();
      assert.equal(client.state, State.UNAUTHORIZED, String(bad).slice(0, 20));
      assert.equal(unauthorized[0].reason, "invalid");
      assert.ok(!unauthorized[0].message.includes(huge));
      assert.equal(sockets.length, 0);
      client.close();
    }
    assert.throws(() => authClient("t", { unauthorizedAfter: 0 }), TypeError);
    const { client } = authClient("t");
    assert.throws(() => client.setToken(7), TypeError);
    client.close();
  });

  test("a function that returns null connects without a token (for --allow-anonymous)", async () => {
    const { client, socket } = authClient(async () => null);
    await settle();
    assert.equal(socket().argumentCount, 1);
    helloAs(socket(), { sub: "anonymous", expiresAt: null });
    assert.equal(client.state, State.OPEN);
    client.close();
  });
});

describe("a token function that does not answer", () => {
  test("is given up after tokenTimeoutMs (10 s): a failed attempt, retried; its late answer is not used", async () => {
    const answers = [deferred(), deferred()];
    const calls = [];
    const source = (hint) => {
      calls.push(hint);
      return answers[calls.length - 1]?.promise ?? Promise.resolve(A3);
    };
    const { client, sockets, socket } = authClient(source);
    const reconnecting = [];
    client.addEventListener("reconnecting", (event) => reconnecting.push(event.detail));
    mock.timers.tick(9_999);
    await settle();
    assert.equal(client.state, State.CONNECTING);
    mock.timers.tick(1);
    await settle();
    assert.equal(client.state, State.RECONNECTING);
    assert.equal(reconnecting[0].error.code, ErrorCode.TIMEOUT);
    assert.equal(reconnecting[0].reason, "the token function did not answer within 10000 ms");
    mock.timers.tick(250);
    await settle();
    assert.equal(calls.length, 2, "asked again after the backoff delay");
    answers[0].resolve(A1); // the abandoned call answers while the next one is under way
    await settle();
    assert.equal(sockets.length, 0, "a late answer opens no socket");
    answers[1].resolve(A2);
    await settle();
    assert.equal(sockets.length, 1);
    assert.equal(offeredToken(socket()), A2);
    helloAs(socket());
    assert.equal(client.state, State.OPEN);
    client.close();
  });

  test("while refreshing: given up, asked again later; its late token is not sent", async () => {
    const refresh = deferred();
    const calls = [];
    const source = async (hint) => {
      calls.push(hint);
      return [A1, refresh.promise, A2][calls.length - 1] ?? A2;
    };
    const { client, socket } = authClient(source, { tokenTimeoutMs: 5000 });
    await settle();
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 600_000 });
    mock.timers.tick(540_000);
    await settle();
    assert.equal(calls.length, 2);
    mock.timers.tick(5000); // given up...
    await settle();
    mock.timers.tick(1000); // ...and asked again a second later
    await settle();
    assert.equal(calls.length, 3);
    assert.deepEqual(socket().sentOfType("auth").map((f) => f.token), [A2]);
    refresh.resolve(A3);
    await settle();
    assert.deepEqual(socket().sentOfType("auth").map((f) => f.token), [A2]);
    client.close();
  });

  test("while `unauthorized`: the poll is given up and polling goes on", async () => {
    const poll = deferred();
    const calls = [];
    const source = async (hint) => {
      calls.push(hint);
      return [42, poll.promise][calls.length - 1] ?? A1;
    };
    const { client, sockets, socket } = authClient(source, { tokenTimeoutMs: 5000 });
    await settle();
    assert.equal(client.state, State.UNAUTHORIZED);
    mock.timers.tick(250);
    await settle();
    assert.equal(calls.length, 2);
    mock.timers.tick(5000);
    await settle();
    mock.timers.tick(500);
    await settle();
    assert.equal(calls.length, 3);
    assert.equal(offeredToken(socket()), A1);
    poll.resolve(A2);
    await settle();
    assert.equal(sockets.length, 1);
    client.close();
  });

  test("tokenTimeoutMs must be a positive number of milliseconds", () => {
    for (const bad of [0, -1, Number.NaN, Infinity, "10"]) {
      assert.throws(() => authClient(A1, { tokenTimeoutMs: bad }), TypeError);
    }
  });
});

describe("a token for another principal, or none", () => {
  test("setToken(null) on an authenticated connection reconnects without a token", async () => {
    const { client, sockets, socket } = authClient(A1);
    const states = recordStates(client);
    helloAs(socket());
    const first = socket();
    const inFlight = makeBackendRequest(client, "echo", 1);
    client.setToken(null);
    await settle();
    assert.deepEqual(first.sentOfType("auth"), []);
    assert.deepEqual(first.closedWith, { code: 1000, reason: "the token changed to another principal" });
    assert.deepEqual(states, ["open", "connecting"], "on purpose: no backoff delay");
    assert.equal(sockets.length, 2);
    assert.equal(socket().argumentCount, 1, "no subprotocol: no token");
    const outcome = await peek(inFlight);
    assert.equal(outcome.reason.code, ErrorCode.DISCONNECTED);
    helloAs(socket(), { sub: "anonymous", expiresAt: null });
    assert.deepEqual(client.principal, { sub: "anonymous", expiresAt: null });
    client.close();
  });

  test("setToken() with another sub reconnects with it; the same sub is refreshed in-band", async () => {
    const bob = jwt("bob", "1");
    const { client, sockets, socket } = authClient(A1);
    helloAs(socket());
    client.setToken(A2);
    await settle();
    assert.deepEqual(socket().sentOfType("auth").map((f) => f.token), [A2]);
    socket().receive({ type: "auth-ok", expiresAt: NOW + 900_000 });
    client.setToken(bob);
    await settle();
    assert.deepEqual(sockets[0].sentOfType("auth").map((f) => f.token), [A2]);
    assert.equal(sockets.length, 2);
    assert.equal(offeredToken(socket()), bob);
    helloAs(socket(), { sub: "bob", expiresAt: NOW + 600_000 });
    assert.equal(client.principal.sub, "bob");
    client.close();
  });

  test("a token whose sub cannot be read is not sent in-band: a new connection decides", async () => {
    for (const token of ["opaque", "a.b.c", `${A1.split(".")[0]}.bm90IGpzb24.x`,
      jwt(42), `${A1.split(".")[0]}.${Buffer.from('{"name":"alice"}').toString("base64url")}.x`]) {
      const { client, sockets, socket } = authClient(A1);
      helloAs(socket());
      client.setToken(token);
      await settle();
      assert.deepEqual(sockets[0].sentOfType("auth"), [], token);
      assert.equal(offeredToken(socket()), token, token);
      client.close();
    }
  });

  test("a token function giving another sub at a refresh: reconnects with that token", async () => {
    const bob = jwt("bob", "1");
    const token = tokenFunction(A1, bob);
    const { client, sockets, socket } = authClient(token);
    await settle();
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 4000 });
    mock.timers.tick(2000);
    await settle();
    assert.deepEqual(sockets[0].sentOfType("auth"), []);
    assert.equal(sockets.length, 2);
    assert.equal(offeredToken(socket()), bob);
    assert.equal(token.calls.length, 2, "the token it gave is used, not asked again");
    client.close();
  });

  test("a token on an anonymous connection reconnects with it (the refresh is for the same sub)", async () => {
    const token = tokenFunction(null);
    const { client, sockets, socket } = authClient(token);
    await settle();
    helloAs(socket(), { sub: "anonymous", expiresAt: null });
    token.give(A1);
    client.setToken(token); // the same function: asked again
    await settle();
    assert.equal(sockets.length, 2);
    assert.equal(offeredToken(socket()), A1);
    client.close();
  });

  test("setToken() while connecting starts the attempt again with the new token", async () => {
    const { client, sockets, socket } = authClient(A1);
    const first = socket();
    client.setToken(A1);
    assert.equal(sockets.length, 1, "the same token: the attempt goes on");
    client.setToken(jwt("bob"));
    assert.equal(first.readyState, FakeWebSocket.CLOSING);
    assert.equal(sockets.length, 2);
    assert.equal(offeredToken(socket()), jwt("bob"));
    helloAs(first); // too late: that socket is forgotten
    assert.equal(client.state, State.CONNECTING);
    helloAs(socket(), { sub: "bob", expiresAt: NOW + 600_000 });
    assert.equal(client.principal.sub, "bob");
    client.close();
  });

  test("setToken() while a refresh still waits for the token function: the new source wins at once", async () => {
    const slow = deferred();
    const calls = [];
    const source = async () => {
      calls.push(1);
      return calls.length === 1 ? A1 : slow.promise;
    };
    const { client, sockets, socket } = authClient(source);
    await settle();
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 4000 });
    mock.timers.tick(2000);
    await settle();
    assert.equal(calls.length, 2, "the refresh is asking");
    client.setToken(null); // a logout
    await settle();
    assert.equal(sockets.length, 2);
    assert.equal(socket().argumentCount, 1);
    slow.resolve(A2);
    await settle();
    assert.deepEqual(sockets[0].sentOfType("auth"), [], "the old source's late token is dropped");
    client.close();
  });

  test("a gateway without keys (no principal): setToken() changes nothing on the open connection", async () => {
    const { client, sockets, socket } = authClient(A1);
    helloAs(socket(), null);
    client.setToken(null);
    client.setToken(jwt("bob"));
    await settle();
    assert.equal(sockets.length, 1);
    assert.deepEqual(socket().sentOfType("auth"), []);
    assert.equal(client.state, State.OPEN);
    client.close();
  });
});

describe("a token that cannot change", () => {
  test("setToken() with a string bringing nothing new re-arms nothing", async () => {
    const { client, socket } = authClient(A1);
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 600_000 });
    const timers = countTimers();
    try {
      client.setToken(A1); // an app that sets its token again on every render
      await settle();
      client.setToken(A2); // a refresh the gateway refuses
      await settle();
      socket().receive({ type: "error", requestId: null,
        error: { code: "unauthorized", message: "bad signature" } });
      const armed = timers.armed; // the auth frame's answer timer
      assert.equal(armed, 1);
      for (let i = 0; i < 60; i += 1) {
        mock.timers.tick(10_000);
        await settle();
      }
      assert.equal(timers.armed, armed, "nothing new can come from a string: no timer");
      assert.deepEqual(socket().sentOfType("auth").map((f) => f.token), [A2]);
      assert.equal(client.state, State.OPEN);
    } finally {
      timers.stop();
    }
    client.close();
  });

  test("a string token at its expiry: 4401, one `unauthorized` (expired), then nothing", async () => {
    const { client, sockets, socket } = authClient(A1);
    const unauthorized = unauthorizedEvents(client);
    const states = recordStates(client);
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 4000 });
    client.setToken(A1);
    await settle();
    mock.timers.tick(4000);
    const timers = countTimers();
    try {
      socket().drop(CLOSE_TOKEN_EXPIRED, "the token expired");
      for (let i = 0; i < 360; i += 1) {
        mock.timers.tick(10_000);
        await settle();
      }
      assert.equal(timers.armed, 1, "the reconnect's delay, then no timer at all");
    } finally {
      timers.stop();
    }
    assert.deepEqual(unauthorized.map((u) => u.reason), ["expired"]);
    assert.deepEqual(states, ["open", "reconnecting", "connecting", "unauthorized"]);
    assert.equal(sockets.length, 1);
    client.close();
  });
});

describe("the token stays out of logs", () => {
  test("the logger redacts the client's tokens and any bearer subprotocol entry", async () => {
    const token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";
    const { client, socket } = authClient(token);
    helloAs(socket());
    const logger = createLogger(client);
    const entry = socket().protocols[1];
    logger.error(new Error(`handshake with ${entry} failed for ${token}`),
      { token, nested: { quoted: `"${token}"` }, [token]: 1 });
    logger.warn(`wrapped: ${JSON.stringify({ protocols: socket().protocols })}`);
    logger.flush();
    const shipped = JSON.stringify(socket().sentOfType("client-log"));
    assert.ok(shipped.includes("[redacted]"), shipped);
    assert.ok(!shipped.includes(token), shipped);
    assert.ok(!shipped.includes(entry.slice(BEARER_SUBPROTOCOL_PREFIX.length)), shipped);
    assert.ok(!shipped.includes(Buffer.from(token).toString("base64url")), shipped);
    client.close();
  });

  test("a token logged before the token function returned it, and after a refresh and a reconnect", async () => {
    const minted = [A1, A2, A3];
    let logger = null;
    const source = async () => {
      await null; // (the logger is created just after the client)
      const token = minted[0];
      if (minted.length > 1) minted.shift();
      logger.info(`minted ${token}`, { token }); // the client does not know it yet
      return token;
    };
    const { client, socket } = authClient(source);
    logger = createLogger(client);
    await settle();
    helloAs(socket(), { sub: "alice", expiresAt: NOW + 4000 });
    mock.timers.tick(2000); // refreshed in-band with A2...
    await settle();
    socket().receive({ type: "auth-ok", expiresAt: NOW + 600_000 });
    logger.warn(`the old one was ${A1}`);
    logger.flush();
    const shipped = [socket().sentOfType("client-log")];
    socket().drop(1006); // ...then a new connection, with A3
    mock.timers.tick(250);
    await settle();
    helloAs(socket());
    logger.flush();
    shipped.push(socket().sentOfType("client-log"));
    const text = JSON.stringify(shipped);
    assert.equal(shipped.flat().flatMap((frame) => frame.entries).length, 4, text);
    for (const token of [A1, A2, A3]) {
      assert.ok(!text.includes(token) && !text.includes(token.split(".")[2]), text);
    }
    assert.match(text, /minted \[redacted\]/);
    client.close();
  });

  test("token shapes are redacted whoever's they are; ordinary text is left alone", () => {
    const { client } = authClient(null);
    const other = jwt("someone-else");
    assert.equal(client.redact(`a ${other}, and ${other.slice(0, -3)}`), "a [redacted], and [redacted]");
    assert.equal(client.redact("Authorization: Bearer abc.def-ghi"), "Authorization: Bearer [redacted]");
    assert.equal(client.redact("GET /ws?access_token=abc&x=1"), "GET /ws?access_token=[redacted]&x=1");
    assert.equal(client.redact("base64url.bearer.relaybus.ZXlKaGJH"), "base64url.bearer.relaybus.[redacted]");
    for (const plain of ["the eye.of.a needle", "version 1.2.3", "eyJ. nothing", "Bearer"]) {
      assert.equal(client.redact(plain), plain);
    }
    client.close();
  });

  test("a WebSocket constructor error that quotes the subprotocols is not passed on", () => {
    class Throwing extends FakeWebSocket.fresh() {
      constructor(url, protocols) {
        throw new SyntaxError(`The subprotocol '${protocols?.[1]}' is invalid.`);
      }
    }
    const token = "a-token-that-must-not-show";
    const details = [];
    const client = createClient({ url: "ws://gateway.test/ws", token, WebSocket: Throwing });
    client.addEventListener("reconnecting", (event) => details.push(event.detail));
    mock.timers.tick(250);
    assert.ok(details.length >= 1);
    const text = JSON.stringify(details.map((d) => ({ ...d, error: String(d.error) })));
    assert.ok(!text.includes("base64url.bearer"), text);
    assert.match(text, /the WebSocket could not be created \(SyntaxError\)/);
    client.close();
  });
});

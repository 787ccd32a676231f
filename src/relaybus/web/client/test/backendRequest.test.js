import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, mock, test } from "node:test";

import { BackendRequest, ErrorCode, makeBackendRequest, RelaybusError } from "../relaybus.js";
import { fakeClient, openClient, peek, settle } from "./fakes.js";

beforeEach(() => mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 }));
afterEach(() => mock.timers.reset());

/** The gateway's side of one request. */
function gatewayFor(socket, request) {
  const requestId = request.requestId;
  return {
    chunk: (seq, data) => socket().receive({ type: "chunk", requestId, seq, data }),
    respond: (data) => socket().receive({ type: "response", requestId, data }),
    fail: (code, message = "it failed") =>
      socket().receive({ type: "error", requestId, error: { code, message } }),
  };
}

async function rejection(request) {
  const outcome = await peek(request);
  assert.equal(outcome.status, "rejected", `expected a rejection, got ${outcome.status}`);
  assert.ok(outcome.reason instanceof RelaybusError);
  assert.equal(outcome.reason.requestId, request.requestId);
  return outcome.reason;
}

describe("a request", () => {
  test("sends one request frame and resolves with the response's data", async () => {
    const { client, socket } = openClient();
    const request = makeBackendRequest(client, "echo", { text: "hi" }, { timeoutMs: 5000 });
    assert.ok(request instanceof BackendRequest);
    assert.deepEqual(socket().sent, [{ type: "request", requestId: request.requestId,
      requestType: "echo", payload: { text: "hi" }, timeoutMs: 5000 }]);
    assert.equal((await peek(request)).status, "pending");
    gatewayFor(socket, request).respond({ text: "hi" });
    assert.deepEqual(await request, { text: "hi" });
  });

  test("without timeoutMs the frame names none and the payload defaults to null", () => {
    const { client, socket } = openClient();
    makeBackendRequest(client, "echo");
    assert.deepEqual(Object.keys(socket().sent[0]).sort(),
      ["payload", "requestId", "requestType", "type"]);
    assert.equal(socket().sent[0].payload, null);
  });

  test("requestIds are unique", () => {
    const { client } = openClient();
    const ids = new Set(Array.from({ length: 200 }, () => makeBackendRequest(client, "echo").requestId));
    assert.equal(ids.size, 200);
  });

  test("a gateway error rejects with its code, message and requestId", async () => {
    const { client, socket } = openClient();
    const request = makeBackendRequest(client, "nothing");
    gatewayFor(socket, request).fail(ErrorCode.NO_HANDLER, "no worker for nothing");
    const error = await rejection(request);
    assert.equal(error.code, ErrorCode.NO_HANDLER);
    assert.equal(error.message, "no worker for nothing");
  });

  test("duplicate_request_id is about another frame: the request goes on", async () => {
    const { client, socket } = openClient();
    const request = makeBackendRequest(client, "echo");
    gatewayFor(socket, request).fail(ErrorCode.DUPLICATE_REQUEST_ID);
    assert.equal((await peek(request)).status, "pending");
    gatewayFor(socket, request).respond(7);
    assert.equal(await request, 7);
  });

  test("a payload over maxMessageBytes is refused locally and nothing is sent", async () => {
    const { client, socket } = openClient({ maxMessageBytes: 100 });
    const request = makeBackendRequest(client, "echo", "x".repeat(100));
    assert.equal((await rejection(request)).code, ErrorCode.PAYLOAD_TOO_LARGE);
    assert.deepEqual(socket().sent, []);
  });

  test("a timeoutMs that is not a positive integer is refused locally", async () => {
    const { client, socket } = openClient();
    for (const timeoutMs of [0, -1, 1.5, "10"]) {
      const request = makeBackendRequest(client, "echo", null, { timeoutMs });
      assert.equal((await rejection(request)).code, ErrorCode.BAD_REQUEST);
    }
    assert.deepEqual(socket().sent, []);
  });
});

describe("chunks", () => {
  test("go to onChunk in seq order, however they arrive; duplicates are ignored", async () => {
    const { client, socket } = openClient();
    const seen = [];
    const request = makeBackendRequest(client, "testRequest", { count: 4 },
      { onChunk: (data, seq) => seen.push([seq, data]) });
    const gateway = gatewayFor(socket, request);
    gateway.chunk(2, "c");
    gateway.chunk(1, "b");
    assert.deepEqual(seen, [], "held until seq 0 arrives");
    gateway.chunk(0, "a");
    gateway.chunk(1, "b again");
    gateway.chunk(3, "d");
    gateway.chunk("4", "not a seq");
    assert.deepEqual(seen, [[0, "a"], [1, "b"], [2, "c"], [3, "d"]]);
    gateway.respond({ chunks: 4 });
    assert.deepEqual(await request, { chunks: 4 });
  });

  test("never after the terminal frame, not even ones held back for a gap", async () => {
    const { client, socket } = openClient();
    const seen = [];
    const request = makeBackendRequest(client, "testRequest", null,
      { onChunk: (data) => seen.push(data) });
    const gateway = gatewayFor(socket, request);
    gateway.chunk(0, "a");
    gateway.chunk(2, "c");
    gateway.respond("done");
    gateway.chunk(1, "b");
    assert.deepEqual(seen, ["a"]);
    assert.equal(await request, "done");
  });

  test("an onChunk that throws cancels that request", async () => {
    const { client, socket } = openClient();
    const request = makeBackendRequest(client, "testRequest", null,
      { onChunk: () => { throw new Error("page bug"); } });
    gatewayFor(socket, request).chunk(0, "a");
    const error = await rejection(request);
    assert.equal(error.code, ErrorCode.CANCELLED);
    assert.equal(error.cause.message, "page bug");
    assert.deepEqual(socket().sentOfType("cancel"), [{ type: "cancel", requestId: request.requestId }]);
  });
});

describe("async iteration", () => {
  test("yields every chunk in order, including those that came before the loop", async () => {
    const { client, socket } = openClient();
    const request = makeBackendRequest(client, "testRequest", { count: 3 });
    const gateway = gatewayFor(socket, request);
    gateway.chunk(1, "b");
    gateway.chunk(0, "a");
    const seen = [];
    const loop = (async () => {
      for await (const chunk of request) seen.push(chunk);
    })();
    await settle();
    gateway.chunk(2, "c");
    gateway.respond({ chunks: 3 });
    await loop;
    assert.deepEqual(seen, ["a", "b", "c"]);
    assert.deepEqual(await request, { chunks: 3 });
  });

  test("throws the request's error after the chunks that came before it", async () => {
    const { client, socket } = openClient();
    const request = makeBackendRequest(client, "testRequest");
    const gateway = gatewayFor(socket, request);
    gateway.chunk(0, "a");
    gateway.fail(ErrorCode.HANDLER_ERROR);
    const seen = [];
    await assert.rejects(async () => {
      for await (const chunk of request) seen.push(chunk);
    }, { code: ErrorCode.HANDLER_ERROR });
    assert.deepEqual(seen, ["a"]);
  });

  test("leaving the loop early cancels the request", async () => {
    const { client, socket } = openClient();
    const request = makeBackendRequest(client, "testRequest", { count: 100 });
    gatewayFor(socket, request).chunk(0, "a");
    for await (const chunk of request) {
      assert.equal(chunk, "a");
      break;
    }
    assert.equal(socket().sentOfType("cancel").length, 1);
    assert.equal((await rejection(request)).code, ErrorCode.CANCELLED);
  });

  test("is refused for a request that has an onChunk", () => {
    const { client } = openClient();
    const request = makeBackendRequest(client, "testRequest", null, { onChunk() {} });
    assert.throws(() => request[Symbol.asyncIterator](), TypeError);
  });
});

describe("cancelling", () => {
  test("aborting the signal sends cancel and rejects at once with cancelled", async () => {
    const { client, socket } = openClient();
    const controller = new AbortController();
    const request = makeBackendRequest(client, "testRequest", null, { signal: controller.signal });
    controller.abort(new Error("user left"));
    assert.deepEqual(socket().sentOfType("cancel"), [{ type: "cancel", requestId: request.requestId }]);
    const error = await rejection(request);
    assert.equal(error.code, ErrorCode.CANCELLED);
    assert.equal(error.cause.message, "user left");
    gatewayFor(socket, request).fail(ErrorCode.CANCELLED, "the gateway's answer to the cancel");
    assert.equal((await rejection(request)).message, "the request was aborted");
  });

  test("an already aborted signal sends nothing at all", async () => {
    const { client, socket } = openClient();
    const request = makeBackendRequest(client, "echo", null, { signal: AbortSignal.abort() });
    assert.equal((await rejection(request)).code, ErrorCode.CANCELLED);
    assert.deepEqual(socket().sent, []);
  });

  test("cancel() sends cancel once and rejects with cancelled", async () => {
    const { client, socket } = openClient();
    const request = makeBackendRequest(client, "testRequest");
    request.cancel();
    request.cancel();
    assert.equal(socket().sentOfType("cancel").length, 1);
    assert.equal((await rejection(request)).code, ErrorCode.CANCELLED);
  });

  test("cancelling a request that was never sent sends nothing", async () => {
    const { client, socket } = fakeClient();
    const request = makeBackendRequest(client, "echo");
    request.cancel();
    socket().hello();
    assert.deepEqual(socket().sent, []);
    assert.equal((await rejection(request)).code, ErrorCode.CANCELLED);
  });
});

describe("local timeout", () => {
  test("rejects with timeout and sends cancel when the gateway is silent past timeoutMs + grace",
    async () => {
      const { client, socket } = openClient();
      const request = makeBackendRequest(client, "testRequest", null, { timeoutMs: 1000 });
      mock.timers.tick(1000 + 2000 - 1);
      assert.equal((await peek(request)).status, "pending");
      mock.timers.tick(1);
      assert.equal((await rejection(request)).code, ErrorCode.TIMEOUT);
      assert.deepEqual(socket().sentOfType("cancel"), [{ type: "cancel", requestId: request.requestId }]);
    });

  test("without timeoutMs the hello's defaultTimeoutMs is the deadline", async () => {
    const { client } = openClient({ defaultTimeoutMs: 500 });
    const request = makeBackendRequest(client, "testRequest", null, { localGraceMs: 100 });
    mock.timers.tick(599);
    assert.equal((await peek(request)).status, "pending");
    mock.timers.tick(1);
    assert.equal((await rejection(request)).code, ErrorCode.TIMEOUT);
  });

  test("the gateway's own timeout error wins when it comes first", async () => {
    const { client, socket } = openClient();
    const request = makeBackendRequest(client, "testRequest", null, { timeoutMs: 1000 });
    mock.timers.tick(1000);
    gatewayFor(socket, request).fail(ErrorCode.TIMEOUT, "from the gateway");
    mock.timers.tick(5000);
    assert.equal((await rejection(request)).message, "from the gateway");
    assert.deepEqual(socket().sentOfType("cancel"), []);
  });
});

describe("connection trouble", () => {
  test("requests in flight reject with disconnected when the socket drops", async () => {
    const { client, socket } = openClient({}, { random: () => 1 });
    const requests = [makeBackendRequest(client, "a"), makeBackendRequest(client, "b")];
    socket().drop(1006);
    for (const request of requests) {
      const error = await rejection(request);
      assert.equal(error.code, ErrorCode.DISCONNECTED);
      assert.match(error.message, /1006/);
    }
    client.close();
  });

  test("a request made while reconnecting is sent once the connection is back", async () => {
    const { client, socket } = openClient({}, { random: () => 1 });
    socket().drop();
    const request = makeBackendRequest(client, "echo", 1);
    mock.timers.tick(250);
    socket().hello();
    assert.equal(socket().sentOfType("request")[0].requestId, request.requestId);
    gatewayFor(socket, request).respond(1);
    assert.equal(await request, 1);
  });

  test("the wait for the connection is bounded by waitMs", async () => {
    const { client, socket } = fakeClient();
    const request = makeBackendRequest(client, "echo", null, { waitMs: 3000 });
    mock.timers.tick(2999);
    assert.equal((await peek(request)).status, "pending");
    mock.timers.tick(1);
    const error = await rejection(request);
    assert.equal(error.code, ErrorCode.DISCONNECTED);
    assert.match(error.message, /within 3000 ms/);
    socket().hello();
    assert.deepEqual(socket().sent, [], "a request that gave up is never sent");
  });

  test("... and by timeoutMs when that is shorter", async () => {
    const { client } = fakeClient();
    const request = makeBackendRequest(client, "echo", null, { timeoutMs: 700 });
    mock.timers.tick(700);
    assert.equal((await rejection(request)).code, ErrorCode.DISCONNECTED);
  });

  test("a closed client fails new requests at once, and close() fails the waiting ones", async () => {
    const { client } = fakeClient();
    const waiting = makeBackendRequest(client, "echo");
    client.close();
    assert.equal((await rejection(waiting)).message, "the client was closed");
    const late = makeBackendRequest(client, "echo");
    assert.equal((await rejection(late)).message, "the client is closed");
  });
});

describe("maxInFlight", () => {
  test("requests beyond the limit wait in order for a free slot", async () => {
    const { client, socket } = openClient({ maxInFlight: 2 });
    const [a, b, c, d] = ["a", "b", "c", "d"].map((type) => makeBackendRequest(client, type));
    assert.deepEqual(socket().sent.map((frame) => frame.requestType), ["a", "b"]);
    gatewayFor(socket, b).respond(null);
    assert.deepEqual(socket().sent.map((frame) => frame.requestType), ["a", "b", "c"]);
    a.cancel();
    assert.deepEqual(socket().sentOfType("request").map((frame) => frame.requestType),
      ["a", "b", "c", "d"]);
    gatewayFor(socket, c).respond("c");
    gatewayFor(socket, d).respond("d");
    assert.deepEqual([await c, await d], ["c", "d"]);
  });

  test("a request that finds no free slot within waitMs fails with overloaded", async () => {
    const { client, socket } = openClient({ maxInFlight: 1 });
    makeBackendRequest(client, "busy");
    const request = makeBackendRequest(client, "echo", null, { waitMs: 1000 });
    mock.timers.tick(1000);
    assert.equal((await rejection(request)).code, ErrorCode.OVERLOADED);
    assert.equal(socket().sent.length, 1);
  });
});

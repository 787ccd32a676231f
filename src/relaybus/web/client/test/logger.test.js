import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, mock, test } from "node:test";

import { createLogger, MAX_LOG_CONTEXT_BYTES, MAX_LOG_MESSAGE_LENGTH } from "../relaybus.js";
import { fakeClient, openClient } from "./fakes.js";

const NOW = 1_000_000;

beforeEach(() => mock.timers.enable({ apis: ["setTimeout", "Date"], now: NOW }));
afterEach(() => mock.timers.reset());

/** Every entry the gateway received, in order, and the number of frames they came in. */
function shipped(socket) {
  const frames = socket().sentOfType("client-log");
  for (const frame of frames) assert.deepEqual(Object.keys(frame).sort(), ["entries", "type"]);
  return { frames: frames.length, entries: frames.flatMap((frame) => frame.entries) };
}

describe("batching", () => {
  test("entries go out together after flushIntervalMs, in the batch form", () => {
    const { client, socket } = openClient();
    const logger = createLogger(client, { flushIntervalMs: 500 });
    logger.info("one");
    mock.timers.tick(100);
    logger.warn("two", { step: 2 });
    logger.error("three");
    mock.timers.tick(399);
    assert.equal(shipped(socket).frames, 0);
    mock.timers.tick(1);
    assert.deepEqual(shipped(socket), { frames: 1, entries: [
      { level: "info", message: "one", timestamp: NOW },
      { level: "warn", message: "two", context: { step: 2 }, timestamp: NOW + 100 },
      { level: "error", message: "three", timestamp: NOW + 100 },
    ] });
    assert.deepEqual(logger.stats, { queued: 0, dropped: 0, sent: 3 });
  });

  test("a full batch goes out at once", () => {
    const { client, socket } = openClient();
    const logger = createLogger(client, { maxBatchEntries: 3 });
    logger.info("1");
    logger.info("2");
    assert.equal(shipped(socket).frames, 0);
    logger.info("3");
    assert.deepEqual(shipped(socket).entries.map((entry) => entry.message), ["1", "2", "3"]);
  });

  test("a batch never exceeds the hello's maxLogEntriesPerFrame", () => {
    const { client, socket } = openClient({ maxLogEntriesPerFrame: 4 });
    const logger = createLogger(client);
    for (let i = 0; i < 10; i += 1) logger.info(`m${i}`);
    mock.timers.runAll();
    const frames = socket().sentOfType("client-log");
    assert.deepEqual(frames.map((frame) => frame.entries.length), [4, 4, 2]);
  });

  test("frames stay within maxMessageBytes; an entry that can never fit is dropped and counted",
    () => {
      const { client, socket } = openClient({ maxMessageBytes: 300 });
      const logger = createLogger(client);
      logger.info("a".repeat(50));
      logger.info("b".repeat(50));
      logger.info("c".repeat(400));
      logger.info("d".repeat(50));
      logger.flush();
      const frames = socket().sentOfType("client-log");
      for (const frame of frames) assert.ok(JSON.stringify(frame).length <= 300);
      const short = (message) => (message.length === 50 ? message[0] : message);
      assert.deepEqual(frames.map((frame) => frame.entries.map((entry) => short(entry.message))),
        [["a", "b"], ["1 log entry dropped", "d"]]);
      assert.equal(logger.stats.dropped, 1);
    });

  test("levels below the logger's level are dropped; the level can change", () => {
    const { client, socket } = openClient();
    const logger = createLogger(client, { level: "warn" });
    logger.debug("d");
    logger.info("i");
    logger.warn("w");
    logger.level = "debug";
    logger.debug("d2");
    assert.throws(() => { logger.level = "verbose"; }, TypeError);
    assert.throws(() => logger.log("fatal", "x"), TypeError);
    logger.flush();
    assert.deepEqual(shipped(socket).entries.map((entry) => entry.message), ["w", "d2"]);
  });

  test("the logger's context is merged under each entry's own", () => {
    const { client, socket } = openClient();
    const logger = createLogger(client, { context: { page: "/demo", user: "u1" } });
    logger.info("a");
    logger.info("b", { user: "u2", step: 3 });
    logger.info("c", "not an object");
    logger.flush();
    assert.deepEqual(shipped(socket).entries.map((entry) => entry.context), [
      { page: "/demo", user: "u1" },
      { page: "/demo", user: "u2", step: 3 },
      { page: "/demo", user: "u1", value: "not an object" },
    ]);
  });
});

describe("rate limit", () => {
  test("a token bucket below the gateway's: 90% of its burst at once, then its rate", () => {
    const { client, socket } = openClient({ clientLogPerSecond: 10, clientLogBurst: 20 });
    const logger = createLogger(client, { flushIntervalMs: 1000 });
    for (let i = 0; i < 40; i += 1) logger.info(`m${i}`);
    logger.flush();
    assert.equal(shipped(socket).entries.length, 18);
    mock.timers.tick(1000);
    assert.equal(shipped(socket).entries.length, 28);
    mock.timers.tick(1000);
    assert.equal(shipped(socket).entries.length, 38);
    mock.timers.tick(1000);
    const { entries } = shipped(socket);
    assert.deepEqual(entries.map((entry) => entry.message),
      Array.from({ length: 40 }, (_, i) => `m${i}`), "every entry, in order, none twice");
    assert.equal(logger.stats.queued, 0);
  });

  test("explicit ratePerSecond and burst override the hello's", () => {
    const { client, socket } = openClient();
    const logger = createLogger(client, { ratePerSecond: 2, burst: 3 });
    for (let i = 0; i < 10; i += 1) logger.info(`m${i}`);
    logger.flush();
    assert.equal(shipped(socket).entries.length, 3);
    mock.timers.tick(1000);
    assert.equal(shipped(socket).entries.length, 5);
  });

  test("a frame-level overloaded error from the gateway empties the bucket", () => {
    const { client, socket } = openClient({ clientLogPerSecond: 10 });
    const logger = createLogger(client);
    socket().receive({ type: "error", requestId: null,
      error: { code: "overloaded", message: "client-log rate exceeded: 5 entries dropped" } });
    logger.info("held");
    logger.flush();
    assert.equal(shipped(socket).frames, 0);
    mock.timers.tick(1000);
    assert.deepEqual(shipped(socket).entries.map((entry) => entry.message), ["held"]);
  });
});

describe("size limits", () => {
  test("a long message is cut to 8192 characters, never inside a surrogate pair", () => {
    const { client, socket } = openClient();
    const logger = createLogger(client);
    logger.info("x".repeat(20_000));
    logger.info(`${"y".repeat(MAX_LOG_MESSAGE_LENGTH - 2)}😀tail`);
    logger.flush();
    const [long, emoji] = shipped(socket).entries.map((entry) => entry.message);
    assert.equal(long.length, MAX_LOG_MESSAGE_LENGTH);
    assert.ok(long.endsWith("x…"));
    assert.ok(emoji.length <= MAX_LOG_MESSAGE_LENGTH);
    assert.equal(emoji, `${"y".repeat(MAX_LOG_MESSAGE_LENGTH - 2)}…`);
    assert.ok(emoji.isWellFormed());
  });

  test("a context over 16 KiB encoded is replaced by a summary", () => {
    const { client, socket } = openClient();
    const logger = createLogger(client);
    logger.info("big", { blob: "é".repeat(MAX_LOG_CONTEXT_BYTES / 2), other: 1 });
    logger.info("fits", { blob: "é".repeat(MAX_LOG_CONTEXT_BYTES / 2 - 10) });
    logger.flush();
    const [big, fits] = shipped(socket).entries.map((entry) => entry.context);
    assert.deepEqual(big, { contextTruncated: true, contextBytes: MAX_LOG_CONTEXT_BYTES + 21,
      keys: ["blob", "other"] });
    assert.equal(fits.blob.length, MAX_LOG_CONTEXT_BYTES / 2 - 10);
  });

  test("errors, cycles and BigInts in a context are encoded, not thrown", () => {
    const { client, socket } = openClient();
    const logger = createLogger(client);
    const cyclic = { name: "loop" };
    cyclic.self = cyclic;
    logger.error(new TypeError("bad input"), { error: new RangeError("out"), cyclic, big: 10n });
    logger.flush();
    const [entry] = shipped(socket).entries;
    assert.equal(entry.message, "TypeError: bad input");
    assert.equal(entry.context.error.name, "RangeError");
    assert.equal(entry.context.error.message, "out");
    assert.match(entry.context.error.stack, /RangeError: out/);
    assert.deepEqual(entry.context.cyclic, { name: "loop", self: "[circular]" });
    assert.equal(entry.context.big, "10");
  });
});

describe("while disconnected", () => {
  test("entries wait in a bounded buffer, oldest dropped first, and the drop is reported",
    () => {
      const { client, socket } = fakeClient();
      const logger = createLogger(client, { maxBufferEntries: 5 });
      for (let i = 0; i < 12; i += 1) logger.info(`m${i}`);
      mock.timers.tick(5000);
      assert.deepEqual(logger.stats, { queued: 5, dropped: 7, sent: 0 });
      socket().hello();
      const { frames, entries } = shipped(socket);
      assert.equal(frames, 1, "flushed as soon as the connection opens");
      assert.deepEqual(entries.map((entry) => entry.message),
        ["7 log entries dropped", "m7", "m8", "m9", "m10", "m11"]);
      assert.deepEqual(entries[0].context, { droppedEntries: 7 });
      assert.equal(entries[0].level, "warn");
      assert.deepEqual(logger.stats, { queued: 0, dropped: 7, sent: 5 });
    });

  test("entries queued before a drop go out after the reconnect", () => {
    const { client, socket } = openClient({}, { random: () => 1 });
    const logger = createLogger(client);
    socket().drop();
    logger.info("while away");
    mock.timers.tick(250);
    socket().hello();
    assert.deepEqual(shipped(socket).entries.map((entry) => entry.message), ["while away"]);
  });

  test("the drop report waits for a token too", () => {
    const { client, socket } = fakeClient();
    const logger = createLogger(client, { maxBufferEntries: 2, ratePerSecond: 1, burst: 1 });
    for (let i = 0; i < 4; i += 1) logger.info(`m${i}`);
    socket().hello();
    assert.deepEqual(shipped(socket).entries.map((entry) => entry.message),
      ["2 log entries dropped"]);
    mock.timers.tick(1000);
    mock.timers.tick(1000);
    assert.deepEqual(shipped(socket).entries.map((entry) => entry.message),
      ["2 log entries dropped", "m2", "m3"]);
  });
});

describe("global errors", () => {
  function errorEvent(fields) {
    return Object.assign(new Event("error"), fields);
  }

  test("captureGlobalErrors logs uncaught errors and unhandled rejections until dispose()", () => {
    const { client, socket } = openClient();
    const window = new EventTarget();
    const logger = createLogger(client, { captureGlobalErrors: true, globalTarget: window });
    const error = new Error("boom");
    window.dispatchEvent(errorEvent({ message: "Uncaught Error: boom", error,
      filename: "https://app/page.js", lineno: 3, colno: 7 }));
    window.dispatchEvent(Object.assign(new Event("unhandledrejection"),
      { reason: new TypeError("nope") }));
    logger.flush();
    const [uncaught, rejected] = shipped(socket).entries;
    assert.equal(uncaught.level, "error");
    assert.equal(uncaught.message, "uncaught Error: boom");
    assert.deepEqual({ ...uncaught.context, stack: undefined }, { source: "error",
      filename: "https://app/page.js", lineno: 3, colno: 7, stack: undefined });
    assert.match(uncaught.context.stack, /Error: boom/);
    assert.equal(rejected.message, "unhandled rejection: TypeError: nope");
    assert.equal(rejected.context.source, "unhandledrejection");

    logger.dispose();
    window.dispatchEvent(errorEvent({ message: "after dispose" }));
    mock.timers.runAll();
    assert.equal(shipped(socket).entries.length, 2);
  });

  test("captureGlobalErrors without an EventTarget to listen on is refused", () => {
    const { client } = openClient();
    assert.throws(() => createLogger(client, { captureGlobalErrors: true, globalTarget: {} }),
      /needs an EventTarget/);
  });

  test("without captureGlobalErrors nothing is listened to", () => {
    const { client, socket } = openClient();
    const window = new EventTarget();
    createLogger(client, { globalTarget: window });
    window.dispatchEvent(errorEvent({ message: "ignored" }));
    mock.timers.runAll();
    assert.equal(shipped(socket).frames, 0);
  });

  test("dispose() sends what it can and stops listening to the client", () => {
    const { client, socket } = openClient({}, { random: () => 1 });
    const logger = createLogger(client);
    logger.info("last words");
    logger.dispose();
    assert.equal(shipped(socket).entries.length, 1);
    logger.info("ignored");
    socket().drop();
    mock.timers.tick(250);
    socket().hello();
    assert.equal(shipped(socket).frames, 0);
  });
});

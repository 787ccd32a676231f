// The four standard request types of the relaybus conformance kit (docs/workers-any-language.md),
// for this worker: `relaybus conformance --broker URL` checks a worker that serves them.
//
//   conformance.echo    any JSON payload: the response is the payload unchanged, no chunks.
//   conformance.stream  {"count": N, "delayMs": D}: N chunks {"index": i} D ms apart (the first at
//                       once), then {"count": N}.
//   conformance.fail    {"code": C, "message": M}: an error reply with that code and message.
//   conformance.slow    {} or {"chunkEveryMs": D}: runs (a chunk {"index": i} every D ms) until it
//                       is cancelled or its deadline passes; the worker then replies cancelled or
//                       timeout.
//
// None is idempotent: a redelivered request gets worker_lost. `RequestError` is the worker's
// error class (an Error with a `code`), passed in so that this file has no import of worker.js.

import { setTimeout as sleep } from "node:timers/promises";

const MAX_STREAM_COUNT = 1000;
const MAX_DELAY_MS = 10_000;
const MAX_CODE_LENGTH = 64;
const MAX_MESSAGE_LENGTH = 1024;

export function conformanceHandlers(RequestError) {
  const object = (payload) => {
    if (payload === null) return {};
    if (typeof payload !== "object" || Array.isArray(payload)) {
      throw new RequestError("bad_request", "payload must be an object");
    }
    return payload;
  };
  const integer = (payload, field, min, max, fallback) => {
    const value = payload[field] ?? fallback;
    if (!Number.isInteger(value) || value < min || value > max) {
      throw new RequestError("bad_request", `${field} must be an integer in ${min}..${max}`);
    }
    return value;
  };
  const string = (payload, field, max) => {
    const value = payload[field];
    if (typeof value !== "string" || value.length > max) {
      throw new RequestError("bad_request", `${field} must be a string of at most ${max} ` +
                             "characters");
    }
    return value;
  };
  // Resolves never; rejects once the request is stopped (cancel notice, deadline, shutdown).
  const stopped = (signal) => new Promise((_resolve, reject) => {
    if (signal.aborted) reject(signal.reason);
    else signal.addEventListener("abort", () => reject(signal.reason), { once: true });
  });

  return {
    "conformance.echo": {
      idempotent: false,
      async handle(payload) {
        return payload;
      },
    },
    "conformance.stream": {
      idempotent: false,
      async handle(payload, stream) {
        const fields = object(payload);
        const count = integer(fields, "count", 0, MAX_STREAM_COUNT);
        const delayMs = integer(fields, "delayMs", 0, MAX_DELAY_MS, 0);
        for (let index = 0; index < count; index++) {
          if (index > 0 && delayMs > 0) {
            await sleep(delayMs, undefined, { signal: stream.signal });
          }
          await stream.sendChunk({ index });
        }
        return { count };
      },
    },
    "conformance.fail": {
      idempotent: false,
      async handle(payload) {
        const fields = object(payload);
        const code = string(fields, "code", MAX_CODE_LENGTH);
        const message = string(fields, "message", MAX_MESSAGE_LENGTH);
        throw new RequestError(code, message);
      },
    },
    "conformance.slow": {
      idempotent: false,
      async handle(payload, stream) {
        const fields = object(payload);
        if (fields.chunkEveryMs === undefined) {
          await stopped(stream.signal);
          return null;
        }
        const everyMs = integer(fields, "chunkEveryMs", 1, MAX_DELAY_MS);
        for (let index = 0; ; index++) {
          await sleep(everyMs, undefined, { signal: stream.signal });
          await stream.sendChunk({ index });
        }
      },
    },
  };
}

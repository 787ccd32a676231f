/**
 * The browser tests' page script: loads the library the gateway serves and keeps what it
 * observes on `window.harness`, where the tests read it with bounded waits. Nothing here
 * awaits on the tests' behalf (page.evaluate has no timeout of its own).
 */

import * as relaybus from "/client/relaybus.js";

const harness = {
  relaybus,
  client: null,
  states: [], // every state the client went through, in order: {state, code}
  runs: {}, // name -> what one request observed
  controllers: {}, // name -> its AbortController

  token: null, // what the token function gives (the tests set it)
  tokenCalls: [], // each call's {forceRefresh, reason}
  authEvents: [], // each `auth` event's detail: {ok, expiresAt} or {ok, code, message}
  unauthorized: [], // each `unauthorized` event's {reason, message}

  /** Open the client (URL: /ws on this page's own host, the library's default). */
  connect(options = {}) {
    this.client = relaybus.createClient(undefined, options);
    this.states.push({ state: this.client.state, code: null });
    this.client.addEventListener("state", (event) => {
      this.states.push({ state: event.detail.state, code: event.detail.code ?? null });
    });
    this.client.addEventListener("auth", (event) => this.authEvents.push(event.detail));
    this.client.addEventListener("unauthorized", (event) => {
      this.unauthorized.push({ reason: event.detail.reason, message: event.detail.message });
    });
    return this.client.state;
  },

  /** Open the client with createClient({token}): an async function that gives `harness.token`. */
  connectWithToken(options = {}) {
    return this.connect({
      ...options,
      token: async (hint) => {
        this.tokenCalls.push(hint);
        return this.token;
      },
    });
  },

  /** Send a request that records its chunks (with their seq) and how it ended. */
  start(name, requestType, payload, options = {}) {
    const controller = new AbortController();
    const run = { requestId: null, seqs: [], chunks: [], done: false, data: null, error: null };
    const request = relaybus.makeBackendRequest(this.client, requestType, payload, {
      ...options,
      signal: controller.signal,
      onChunk: (data, seq) => {
        run.seqs.push(seq);
        run.chunks.push(data);
      },
    });
    run.requestId = request.requestId;
    this.runs[name] = run;
    this.controllers[name] = controller;
    request.then(
      (data) => Object.assign(run, { done: true, data }),
      (error) => Object.assign(run, { done: true, error: describeError(error) }));
    return run.requestId;
  },

  /** Send a request and read its chunks with `for await`, as an application would. */
  iterate(name, requestType, payload, options = {}) {
    const run = { requestId: null, chunks: [], done: false, data: null, error: null };
    const request = relaybus.makeBackendRequest(this.client, requestType, payload, options);
    run.requestId = request.requestId;
    this.runs[name] = run;
    (async () => {
      try {
        for await (const chunk of request) run.chunks.push(chunk);
        run.data = await request;
      } catch (error) {
        run.error = describeError(error);
      }
      run.done = true;
    })();
    return run.requestId;
  },
};

function describeError(error) {
  return {
    isRelaybusError: error instanceof relaybus.RelaybusError,
    code: error?.code ?? null,
    message: String(error?.message ?? error),
  };
}

window.harness = harness;

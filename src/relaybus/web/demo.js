/**
 * The relaybus demo page (served at `/`), and the hooks its browser tests rely on. Keep these
 * ids and globals stable:
 *
 *   window.relaybus         the library's module exports (/client/relaybus.js)
 *   window.relaybusClient   this page's client: createClient() on /ws of the page's own host
 *   window.relaybusLogger   this page's logger (it also reports uncaught errors to the gateway)
 *
 *   #state            the client's state as text and as data-state:
 *                     connecting | open | reconnecting | unauthorized | closed
 *   #connection-id    the connectionId from the gateway's hello; empty while not open
 *   #count, #delay    the testRequest payload {count, delayMs}
 *   #timeout          its timeoutMs (empty: the gateway's default)
 *   #send             send a testRequest; disabled while one is running
 *   #cancel           abort the running request (AbortController); enabled only while one runs
 *   #chunks           one <li data-seq="N"> per chunk, the chunk's data as JSON, in seq order
 *   #result           the last request's outcome: data-outcome = running | response | error,
 *                     data-code = the error's code (errors only); text = the response's data as
 *                     JSON, or "code: message"
 *   #events           what happened, newest last: <li data-kind="state|response|error|log">
 *   #log-level, #log-message, #log-send
 *                     send one log line through the logger (flushed at once); the line is
 *                     noted in #events as data-kind="log"
 */

import * as relaybus from "/client/relaybus.js";

const $ = (id) => document.getElementById(id);

const client = relaybus.createClient();
const logger = relaybus.createLogger(client, {
  context: { page: location.pathname },
  captureGlobalErrors: true,
});
window.relaybus = relaybus;
window.relaybusClient = client;
window.relaybusLogger = logger;

let running = null; // the AbortController of the request in progress

function note(kind, text) {
  const item = document.createElement("li");
  item.dataset.kind = kind;
  item.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("events").append(item);
  item.scrollIntoView({ block: "nearest" });
}

function showState() {
  $("state").textContent = client.state;
  $("state").dataset.state = client.state;
  $("connection-id").textContent = client.connectionId ?? "";
}

function setResult(outcome, text, code) {
  const result = $("result");
  result.dataset.outcome = outcome;
  if (code === undefined) delete result.dataset.code;
  else result.dataset.code = code;
  result.textContent = text;
}

function optionalInteger(input) {
  return input.value === "" ? undefined : Number(input.value);
}

client.addEventListener("state", (event) => {
  const { state, code, delayMs } = event.detail;
  showState();
  const details = [code ? `close code ${code}` : "", delayMs === undefined ? ""
    : `next attempt in ${Math.round(delayMs)} ms`].filter(Boolean).join(", ");
  note("state", details ? `${state} (${details})` : state);
});

$("send").addEventListener("click", async () => {
  const controller = new AbortController();
  running = controller;
  $("send").disabled = true;
  $("cancel").disabled = false;
  $("chunks").replaceChildren();
  setResult("running", "running…");
  const payload = { count: Number($("count").value), delayMs: Number($("delay").value) };
  try {
    const data = await relaybus.makeBackendRequest(client, "testRequest", payload, {
      timeoutMs: optionalInteger($("timeout")),
      signal: controller.signal,
      onChunk: (chunk, seq) => {
        const item = document.createElement("li");
        item.dataset.seq = String(seq);
        item.textContent = JSON.stringify(chunk);
        $("chunks").append(item);
      },
    });
    setResult("response", JSON.stringify(data));
    note("response", `response ${JSON.stringify(data)}`);
  } catch (error) {
    const code = error instanceof relaybus.RelaybusError ? error.code : "exception";
    setResult("error", `${code}: ${error.message}`, code);
    note("error", `error ${code}: ${error.message}`);
  } finally {
    if (running === controller) running = null;
    $("send").disabled = false;
    $("cancel").disabled = true;
  }
});

$("cancel").addEventListener("click", () => running?.abort());

$("log-send").addEventListener("click", () => {
  const level = $("log-level").value;
  const message = $("log-message").value;
  logger.log(level, message, { source: "demo form" });
  logger.flush();
  note("log", `log ${level}: ${message}`);
});

showState();
note("state", client.state);  // the first state came before the listener was added

/**
 * The one error type the library rejects with, and every code it uses.
 *
 * Codes from the gateway (docs/protocol.md, section 2) arrive unchanged; the library adds
 * `disconnected` (the socket dropped, or never came back in time) and raises some gateway codes
 * locally too (`payload_too_large`, `timeout`, `cancelled`, `overloaded`, `bad_request`).
 */

export const ErrorCode = Object.freeze({
  BAD_REQUEST: "bad_request",
  DUPLICATE_REQUEST_ID: "duplicate_request_id",
  PAYLOAD_TOO_LARGE: "payload_too_large",
  NO_HANDLER: "no_handler",
  TIMEOUT: "timeout",
  CANCELLED: "cancelled",
  OVERLOADED: "overloaded",
  UNAVAILABLE: "unavailable",
  HANDLER_ERROR: "handler_error",
  WORKER_LOST: "worker_lost",
  SHUTTING_DOWN: "shutting_down",
  UNAUTHORIZED: "unauthorized",
  DISCONNECTED: "disconnected",
});

export class RelaybusError extends Error {
  /**
   * @param {string} code one of ErrorCode's values (or a newer code from the gateway)
   * @param {string} message for humans; program against `code`
   * @param {{requestId?: string|null, cause?: unknown}} [details]
   */
  constructor(code, message, details = {}) {
    super(message, "cause" in details ? { cause: details.cause } : undefined);
    this.name = "RelaybusError";
    this.code = code;
    this.requestId = details.requestId ?? null;
  }
}

/**
 * The relaybus browser client: `import { createClient, makeBackendRequest, createLogger,
 * RelaybusError } from "/client/relaybus.js"`. See docs/client-js.md.
 */

export { ErrorCode, RelaybusError } from "./errors.js";
export {
  BEARER_SUBPROTOCOL_PREFIX,
  CLIENT_DEFAULTS,
  CLOSE_TOKEN_EXPIRED,
  createClient,
  MAX_TOKEN_BYTES,
  RelaybusClient,
  State,
  SUBPROTOCOL,
} from "./websocketClient.js";
export {
  BackendRequest,
  makeBackendRequest,
  REQUEST_DEFAULTS,
} from "./backendRequest.js";
export {
  createLogger,
  LOG_LEVELS,
  LOGGER_DEFAULTS,
  MAX_LOG_CONTEXT_BYTES,
  MAX_LOG_MESSAGE_LENGTH,
  RelaybusLogger,
} from "./logger.js";

"""Command-line options of `twistd relaybus` and `twistd relaybus-worker`, and their environment
variable twins for relaybus.tac (RELAYBUS_<OPTION>, e.g. RELAYBUS_MAX_IN_FLIGHT)."""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from typing import Any

from twisted.python import usage

from relaybus.amqp.link import validateBrokerURL
from relaybus.authorization import Authorizer
from relaybus.config import GatewayConfig, Limits, WorkerConfig, newGatewayId
from relaybus.handlers import registerHandlers
from relaybus.handlerworlds import (
    DEFAULT_THREADS,
    HandlerWorldError,
    checkWorlds,
    installedReactor,
)
from relaybus.identity import JWTChecker, JWTSettings, loadChecker
from relaybus.interfaces import IRequestHandler
from relaybus.jwks import DEFAULT_REFRESH_S
from relaybus.listener import ListenError, checkListen

MAX_NAME_LENGTH = 64
MAX_THREADS = 256  # each blocking handler thread costs a stack (8 MiB of address space)
_LIMITS = Limits()
_GATEWAY = GatewayConfig(gatewayId="defaults")


def _positiveInt(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError(f"must be a positive integer, not {value}")
    return number


def _positiveFloat(value: str) -> float:
    number = float(value)
    if not 0 < number < math.inf:  # NaN and infinity too: "never" would turn a defence off
        raise ValueError(f"must be a finite positive number, not {value}")
    return number


_positiveInt.coerceDoc = "A positive integer."  # type: ignore[attr-defined]
_positiveFloat.coerceDoc = "A finite positive number of seconds."  # type: ignore[attr-defined]


def _checkBroker(broker: str) -> None:
    if broker != "memory":
        try:
            validateBrokerURL(broker)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def _resolveHandlers(modules: tuple[str, ...], command: str) -> dict[str, IRequestHandler]:
    """Import the handler modules, once per process: a bad --handlers, or a handler that
    cannot run on this process's reactor, is a usage error before anything starts."""
    try:
        registry = registerHandlers(*modules)
    except ImportError as e:
        raise usage.UsageError(f"--handlers: cannot import {e.name or e}") from None
    except (ValueError, TypeError) as e:
        raise usage.UsageError(f"--handlers: {e}") from None
    try:
        checkWorlds(registry, installedReactor(), command)
    except HandlerWorldError as e:
        raise usage.UsageError(str(e)) from None
    return registry


def _threadCount(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= MAX_THREADS:
        raise ValueError(f"must be an integer in 1..{MAX_THREADS}, not {value[:40]!r}")
    return number


_threadCount.coerceDoc = f"An integer in 1..{MAX_THREADS}."  # type: ignore[attr-defined]


def checkName(option: str, value: str) -> None:
    """Ids and prefixes end up in AMQP queue names (at most 255 bytes, with a requestType)."""
    if len(value) > MAX_NAME_LENGTH or not all(c.isascii() and (c.isalnum() or c in "-_.")
                                              for c in value):
        raise usage.UsageError(f"{option} must be at most {MAX_NAME_LENGTH} characters of "
                               "letters, digits, '-', '_' and '.'")


def _nonNegativeInt(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"must be 0 or a positive integer, not {value}")
    return number


_nonNegativeInt.coerceDoc = "0 or a positive integer."  # type: ignore[attr-defined]


def _nonNegativeFloat(value: str) -> float:
    number = float(value)
    if not 0 <= number < math.inf:
        raise ValueError(f"must be a finite number, 0 or more, not {value}")
    return number


_nonNegativeFloat.coerceDoc = "A finite number of seconds, 0 or more."  # type: ignore[attr-defined]


def _commaList(value: str | None) -> tuple[str, ...]:
    return tuple(filter(None, (item.strip() for item in (value or "").split(","))))


class _ReactorClock:
    """The running reactor's clock, looked up when a token is checked: options are parsed
    before twistd installs the reactor, so they must not import it (twistd -r)."""

    def seconds(self) -> float:
        from twisted.internet import reactor

        return float(reactor.seconds())


def _loadChecker(config: GatewayConfig) -> JWTChecker | None:
    """Read the key material once, at start: a bad key or setting is a usage error."""
    if not config.jwt.configured:
        if config.allowAnonymous:
            raise usage.UsageError("--allow-anonymous needs a JWT key (--jwt-secret-file, "
                                   "--jwt-public-key-file, --jwks-file or --jwks-url)")
        return None
    try:
        return loadChecker(config.jwt, _ReactorClock())
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


def _loadAuthorizer(config: GatewayConfig) -> Authorizer | None:
    if config.authzPolicy is None:
        return None
    if not config.jwt.configured:
        raise usage.UsageError("--authz-policy needs a JWT key: without one, nobody is known")
    try:
        return Authorizer(config.authzPolicy, config.rolesClaim)
    except ValueError as e:
        raise usage.UsageError(str(e)) from None


class _EnvironmentOptions(usage.Options):
    registry: dict[str, IRequestHandler]  # the handlers this process runs, by requestType

    @classmethod
    def fromEnvironment(cls, environ: Mapping[str, str] | None = None) -> Any:
        """Parse RELAYBUS_* variables as if they were options (for relaybus.tac).

        A repeatable option takes a comma-separated list; a flag takes 1/true/yes/on.
        """
        environ = os.environ if environ is None else environ
        argv: list[str] = []
        options = cls()
        names = [p[0] for p in getattr(options, "optParameters", [])]
        for name in [*names, *getattr(cls, "repeatable", ())]:
            value = environ.get("RELAYBUS_" + name.upper().replace("-", "_"))
            if value is None:
                continue
            if name in getattr(cls, "repeatable", ()):
                for item in filter(None, (v.strip() for v in value.split(","))):
                    argv += [f"--{name}", item]
            else:
                argv += [f"--{name}", value]
        for name in [f[0] for f in getattr(options, "optFlags", [])]:
            variable = "RELAYBUS_" + name.upper().replace("-", "_")
            value = environ.get(variable, "").strip().lower()
            if value in ("1", "true", "yes", "on"):
                argv.append(f"--{name}")
            elif value not in ("", "0", "false", "no", "off"):
                raise usage.UsageError(f"{variable} must be 1/true/yes/on or 0/false/no/off")
        options.parseOptions(argv)
        return options


class GatewayOptions(_EnvironmentOptions):
    synopsis = "[options]"
    longdesc = ("Run the relaybus WebSocket gateway. Without --broker it runs an embedded "
                "in-process bus with the example workers.")
    repeatable = ("handlers", "allowed-origin", "allowed-host", "trusted-proxy")
    optParameters = [
        ["listen", "l", "tcp:8080:interface=127.0.0.1", "Endpoint to listen on (strports)."],
        ["broker", "b", None, "'memory' (embedded bus) or an amqp:// or amqps:// URL "
         "(default: $RELAYBUS_BROKER, else memory; the variable keeps a password out of ps)."],
        ["gateway-id", None, None, "This gateway's id and reply queue name (default: random)."],
        ["amqp-prefix", None, "", "Prefix for every exchange and queue name."],
        ["max-message-bytes", None, _LIMITS.maxMessageBytes,
         "Largest WebSocket message in either direction.", _positiveInt],
        ["max-in-flight", None, _LIMITS.maxInFlight,
         "Requests one connection may have in flight.", _positiveInt],
        ["default-timeout-ms", None, _LIMITS.defaultTimeoutMs,
         "Deadline of a request that names none.", _positiveInt],
        ["max-timeout-ms", None, _LIMITS.maxTimeoutMs,
         "Longest deadline a request may ask for.", _positiveInt],
        ["client-log-per-second", None, _LIMITS.clientLogPerSecond,
         "client-log entries one connection may send per second.", _positiveInt],
        ["requests-per-second", None, _LIMITS.requestsPerSecond,
         "Requests one connection may send per second (0: no limit; more get overloaded).",
         _nonNegativeInt],
        ["requests-burst", None, _LIMITS.requestsBurst,
         "Requests one connection may send in a burst (default: the rate).",
         _nonNegativeInt],
        ["client-log-burst", None, _LIMITS.clientLogBurst,
         "client-log entries one connection may send in a burst.", _positiveInt],
        ["max-connections", None, _GATEWAY.maxConnections,
         "WebSocket connections at once (more get HTTP 503).", _positiveInt],
        ["max-connections-per-ip", None, _GATEWAY.maxConnectionsPerIp,
         "WebSocket connections one client address may hold (0: no limit; more get 429).",
         _nonNegativeInt],
        ["handshakes-per-ip-per-second", None, _GATEWAY.handshakesPerIpPerSecond,
         "WebSocket handshakes one client address may start per second (0: no limit).",
         _nonNegativeFloat],
        ["max-send-buffer", None, _GATEWAY.maxSendBufferBytes,
         "Bytes queued for a client that does not read before it is closed (1008).",
         _positiveInt],
        ["auto-ping-interval", None, _GATEWAY.autoPingIntervalS,
         "Seconds between WebSocket pings.", _positiveFloat],
        ["auto-ping-timeout", None, _GATEWAY.autoPingTimeoutS,
         "Seconds to wait for a pong before dropping the client.", _positiveFloat],
        ["open-handshake-timeout", None, _GATEWAY.openHandshakeTimeoutS,
         "Seconds a client has to send its whole HTTP (upgrade) request from connecting, and "
         "again to finish the WebSocket handshake after it.", _positiveFloat],
        ["drain-timeout", None, _GATEWAY.drainTimeoutS,
         "Seconds to let requests finish on shutdown.", _positiveFloat],
        ["worker-absent-grace", None, _GATEWAY.workerAbsentGraceS,
         "Seconds a requestType's queue may have no consumer before its pending requests "
         "end with worker_lost (0: wait for their deadlines).", _nonNegativeFloat],
        ["worker-concurrency", None, _GATEWAY.workerConcurrency,
         "Requests in-process handlers run at once, per requestType.", _positiveInt],
        ["worker-threads", None, DEFAULT_THREADS,
         "Threads for in-process blocking handlers (runsIn = \"thread\").", _threadCount],
        ["jwt-secret-file", None, None,
         "File with the HMAC secret that signs clients' JWTs (HS256/HS384/HS512)."],
        ["jwt-public-key-file", None, None,
         "PEM public key that verifies clients' JWTs (RS*, PS*, ES256/ES384, EdDSA)."],
        ["jwks-file", None, None, "JWK Set file of the keys that verify clients' JWTs "
         "(chosen by the token's kid)."],
        ["jwks-url", None, None, "https:// URL of the JWK Set that verifies clients' JWTs "
         "(http:// only to loopback); fetched at start, periodically and on an unknown kid."],
        ["jwks-refresh", None, None,
         f"Seconds between fetches of --jwks-url (default {DEFAULT_REFRESH_S:g}).",
         _positiveFloat],
        ["jwt-algorithms", None, None,
         "Comma-separated allow-list of JWT algorithms (default: from the key type)."],
        ["jwt-audience", None, None, "Required `aud` of clients' JWTs."],
        ["jwt-issuer", None, None, "Required `iss` of clients' JWTs."],
        ["jwt-cookie", None, None, "Name of a cookie that may carry the JWT (needs an explicit "
         "--allowed-origin list: cross-site WebSocket hijacking)."],
        ["authz-policy", None, None, "JSON file: the requestType patterns each role may call "
         "(re-read on SIGHUP)."],
        ["roles-claim", None, _GATEWAY.rolesClaim, "The JWT claim that lists a principal's "
         "roles."],
        ["forward-claims", None, ",".join(_GATEWAY.forwardClaims),
         "Comma-separated JWT claims workers see in the relaybus-claims header."],
        ["jwt-leeway", None, _GATEWAY.jwt.leewayS,
         "Seconds of clock skew allowed on a JWT's exp and nbf.", _nonNegativeFloat],
    ]
    optFlags = [
        ["reuse-port", None, "Listen with SO_REUSEPORT (a tcp: --listen), so several gateway "
         "processes on one host share the port; the kernel spreads connections over them."],
        ["allow-anonymous", None, "With a JWT key: admit handshakes without a token, as the "
         "principal 'anonymous' (a token that is present must still be valid)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["handlers"] = []
        self["allowed-origin"] = []
        self["allowed-host"] = []
        self["trusted-proxy"] = []

    def opt_handlers(self, module: str) -> None:
        """Dotted module whose handlers run in this process (repeatable). Default with the
        embedded bus: workers.examples."""
        self["handlers"].append(module)

    def opt_allowed_origin(self, pattern: str) -> None:
        """Origin (scheme://host[:port], fnmatch pattern) whose pages may connect, beside
        same-origin pages and clients that send no Origin (repeatable; '*' allows all)."""
        self["allowed-origin"].append(pattern)

    def opt_trusted_proxy(self, cidr: str) -> None:
        """Address or CIDR of a reverse proxy whose X-Forwarded-For is believed (repeatable)."""
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise usage.UsageError(f"--trusted-proxy: {cidr[:60]!r} is not an address or "
                                   "CIDR") from None
        self["trusted-proxy"].append(cidr)

    def opt_allowed_host(self, name: str) -> None:
        """Host name the gateway serves (repeatable); others get 403 (DNS rebinding)."""
        self["allowed-host"].append(name)

    def postOptions(self) -> None:
        if self["broker"] is None:  # not given: an explicit --broker "" stays an error
            self["broker"] = os.environ.get("RELAYBUS_BROKER") or "memory"
        _checkBroker(self["broker"])
        limits = Limits(self["max-message-bytes"], self["max-in-flight"],
                        self["default-timeout-ms"], self["max-timeout-ms"],
                        clientLogPerSecond=self["client-log-per-second"],
                        clientLogBurst=self["client-log-burst"],
                        requestsPerSecond=self["requests-per-second"],
                        requestsBurst=self["requests-burst"] or self["requests-per-second"])
        if limits.requestsBurst and not limits.requestsPerSecond:
            raise usage.UsageError("--requests-burst needs --requests-per-second")
        if limits.defaultTimeoutMs > limits.maxTimeoutMs:
            raise usage.UsageError("--default-timeout-ms must not exceed --max-timeout-ms")
        self.config = GatewayConfig(
            listen=self["listen"], reusePort=bool(self["reuse-port"]), broker=self["broker"],
            handlers=tuple(self["handlers"]),
            gatewayId=self["gateway-id"] or newGatewayId(), amqpPrefix=self["amqp-prefix"],
            limits=limits, autoPingIntervalS=self["auto-ping-interval"],
            autoPingTimeoutS=self["auto-ping-timeout"],
            openHandshakeTimeoutS=self["open-handshake-timeout"],
            drainTimeoutS=self["drain-timeout"],
            workerAbsentGraceS=self["worker-absent-grace"],
            workerConcurrency=self["worker-concurrency"],
            workerThreads=self["worker-threads"],
            maxSendBufferBytes=self["max-send-buffer"],
            maxConnections=self["max-connections"],
            maxConnectionsPerIp=self["max-connections-per-ip"],
            handshakesPerIpPerSecond=self["handshakes-per-ip-per-second"],
            trustedProxies=tuple(self["trusted-proxy"]),
            jwt=JWTSettings(
                secretFile=self["jwt-secret-file"], publicKeyFile=self["jwt-public-key-file"],
                jwksFile=self["jwks-file"], jwksUrl=self["jwks-url"],
                jwksRefreshS=self["jwks-refresh"] or DEFAULT_REFRESH_S,
                algorithms=_commaList(self["jwt-algorithms"]),
                audience=self["jwt-audience"], issuer=self["jwt-issuer"],
                leewayS=self["jwt-leeway"]),
            allowAnonymous=bool(self["allow-anonymous"]), jwtCookie=self["jwt-cookie"],
            allowedOrigins=tuple(self["allowed-origin"]),
            allowedHosts=tuple(self["allowed-host"]),
            authzPolicy=self["authz-policy"], rolesClaim=self["roles-claim"],
            forwardClaims=_commaList(self["forward-claims"]))
        if self.config.jwtCookie is not None and not [
                o for o in self.config.allowedOrigins if o != "*"]:
            raise usage.UsageError("--jwt-cookie needs an explicit --allowed-origin list (not "
                                   "only '*'): a cookie rides along with every cross-site "
                                   "WebSocket handshake")
        if self.config.jwtCookie is not None and not self.config.jwt.configured:
            raise usage.UsageError("--jwt-cookie needs a JWT key")
        if self["jwks-refresh"] is not None and not self.config.jwt.jwksUrl:
            raise usage.UsageError("--jwks-refresh needs --jwks-url")
        try:
            checkListen(self.config.listen, self.config.reusePort)
        except ListenError as e:
            raise usage.UsageError(str(e)) from None
        self.registry = _resolveHandlers(self.config.inProcessHandlers, "relaybus")
        self.checker = _loadChecker(self.config)
        self.authorizer = _loadAuthorizer(self.config)
        checkName("--gateway-id", self.config.gatewayId)
        checkName("--amqp-prefix", self.config.amqpPrefix)


class WorkerOptions(_EnvironmentOptions):
    synopsis = "--broker amqp://... --handlers MODULE [--handlers MODULE ...]"
    longdesc = "Run relaybus request handlers against RabbitMQ."
    repeatable = ("handlers",)
    optParameters = [
        ["broker", "b", None, "amqp:// or amqps:// URL of RabbitMQ (required; default: "
         "$RELAYBUS_BROKER, which keeps a password out of ps)."],
        ["concurrency", "c", 10, "Requests run at once per requestType (the AMQP prefetch).",
         _positiveInt],
        ["amqp-prefix", None, "", "Prefix for every exchange and queue name."],
        ["drain-timeout", None, 10.0, "Seconds to let running requests finish on shutdown.",
         _positiveFloat],
        ["threads", "t", DEFAULT_THREADS,
         "Threads for blocking handlers (runsIn = \"thread\"), shared by every requestType.",
         _threadCount],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["handlers"] = []

    def opt_handlers(self, module: str) -> None:
        """Dotted module whose IRequestHandler objects this worker serves (repeatable)."""
        self["handlers"].append(module)

    def postOptions(self) -> None:
        if self["broker"] is None:
            self["broker"] = os.environ.get("RELAYBUS_BROKER")
        if not self["broker"] or self["broker"] == "memory":
            raise usage.UsageError("--broker amqp://... is required for a worker (or set "
                                   "RELAYBUS_BROKER)")
        _checkBroker(self["broker"])
        if not self["handlers"]:
            raise usage.UsageError("name at least one --handlers module")
        self.config = WorkerConfig(
            broker=self["broker"], handlers=tuple(self["handlers"]),
            concurrency=self["concurrency"], amqpPrefix=self["amqp-prefix"],
            drainTimeoutS=self["drain-timeout"], threads=self["threads"])
        self.registry = _resolveHandlers(self.config.handlers, "relaybus-worker")
        checkName("--amqp-prefix", self.config.amqpPrefix)

"""`twistd relaybus` / `twistd relaybus-worker` options and their RELAYBUS_* environment twins."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
from twisted.python.usage import UsageError

from relaybus import options as optionsModule
from relaybus.amqp.topology import Topology
from relaybus.config import GatewayConfig, Limits, WorkerConfig
from relaybus.handlers import registerHandlers
from relaybus.identity import JWTSettings
from relaybus.options import GatewayOptions, WorkerOptions
from relaybus.testing import FakeRequestHandler

EXTRA = "relaybus_unit_extra_handlers"


@pytest.fixture(autouse=True)
def extraHandlerModule(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A second importable handler module (requestType "extra"), besides workers.examples."""
    module = types.ModuleType(EXTRA)
    module.extra = FakeRequestHandler("extra")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, EXTRA, module)
    return module


def gateway(*argv: str) -> GatewayConfig:
    options = GatewayOptions()
    options.parseOptions(list(argv))
    config = options.config
    assert isinstance(config, GatewayConfig)
    return config


def worker(*argv: str) -> WorkerConfig:
    options = WorkerOptions()
    options.parseOptions(list(argv))
    config = options.config
    assert isinstance(config, WorkerConfig)
    return config


# The gateway


def test_gateway_defaults() -> None:
    config = gateway()
    assert config.listen == "tcp:8080:interface=127.0.0.1"
    assert config.broker == "memory" and config.inMemory
    assert config.handlers == ()
    assert config.inProcessHandlers == ("workers.examples",)
    assert config.limits == Limits(maxMessageBytes=1024 * 1024, maxInFlight=100,
                                   defaultTimeoutMs=30_000, maxTimeoutMs=300_000)
    assert config.amqpPrefix == ""
    assert (config.autoPingIntervalS, config.autoPingTimeoutS) == (20.0, 10.0)
    assert config.openHandshakeTimeoutS == 10.0
    assert config.drainTimeoutS == 10.0
    assert config.workerConcurrency == 10
    assert config.gatewayId.startswith("gw-")
    assert config.gatewayId != gateway().gatewayId  # random per process


def test_gateway_every_option() -> None:
    config = gateway(
        "--listen", "tcp:9000:interface=0.0.0.0", "--broker", "amqps://u:p@rabbit:5671/vh",
        "--handlers", "workers.examples", "--handlers", EXTRA, "--gateway-id", "gw-a_1.b",
        "--amqp-prefix", "test1.", "--max-message-bytes", "2048", "--max-in-flight", "7",
        "--default-timeout-ms", "1500", "--max-timeout-ms", "9000",
        "--auto-ping-interval", "2.5", "--auto-ping-timeout", "1.5",
        "--open-handshake-timeout", "3", "--drain-timeout", "4.5",
        "--worker-concurrency", "11")
    assert config == GatewayConfig(
        listen="tcp:9000:interface=0.0.0.0", broker="amqps://u:p@rabbit:5671/vh",
        handlers=("workers.examples", EXTRA), gatewayId="gw-a_1.b", amqpPrefix="test1.",
        limits=Limits(2048, 7, 1500, 9000), autoPingIntervalS=2.5, autoPingTimeoutS=1.5,
        openHandshakeTimeoutS=3.0, drainTimeoutS=4.5, workerConcurrency=11)
    assert config.inProcessHandlers == ("workers.examples", EXTRA)


def test_gateway_short_options() -> None:
    config = gateway("-l", "unix:/tmp/relaybus.sock", "-b", "amqp://rabbit/")
    assert config.listen == "unix:/tmp/relaybus.sock"
    assert config.broker == "amqp://rabbit/"


@pytest.mark.parametrize(("extra", "message"), [
    ((), "no such socket was passed to this process"),  # not started by its socket unit
    (("--reuse-port",), r"shared by its socket unit \(ReusePort=yes\)"),
])
def test_gateway_a_systemd_listen_is_checked_before_anything_starts(
        extra: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        gateway("--listen", "systemd:domain=INET:index=0", *extra)


def test_gateway_with_a_broker_runs_no_handlers_unless_named() -> None:
    config = gateway("--broker", "amqp://rabbit/")
    assert not config.inMemory
    assert config.inProcessHandlers == ()
    assert gateway("--broker", "amqp://rabbit/", "--handlers", EXTRA).inProcessHandlers == (
        EXTRA,)


def test_gateway_memory_with_named_handlers_runs_only_those() -> None:
    assert gateway("--handlers", EXTRA).inProcessHandlers == (EXTRA,)


def test_default_timeout_equal_to_max_is_fine() -> None:
    limits = gateway("--default-timeout-ms", "5000", "--max-timeout-ms", "5000").limits
    assert limits.defaultTimeoutMs == limits.maxTimeoutMs == 5000


@pytest.mark.parametrize("argv", [
    pytest.param(["--max-in-flight", "0"], id="max-in-flight-zero"),
    pytest.param(["--max-in-flight", "-5"], id="max-in-flight-negative"),
    pytest.param(["--max-in-flight", "ten"], id="max-in-flight-word"),
    pytest.param(["--max-in-flight", "1.5"], id="max-in-flight-float"),
    pytest.param(["--max-message-bytes", "0"], id="max-message-bytes-zero"),
    pytest.param(["--default-timeout-ms", "0"], id="default-timeout-zero"),
    pytest.param(["--max-timeout-ms", "-1"], id="max-timeout-negative"),
    pytest.param(["--worker-concurrency", "0"], id="worker-concurrency-zero"),
    pytest.param(["--drain-timeout", "0"], id="drain-timeout-zero"),
    pytest.param(["--drain-timeout", "-1"], id="drain-timeout-negative"),
    pytest.param(["--auto-ping-interval", "nan"], id="auto-ping-nan"),
    pytest.param(["--auto-ping-timeout", "soon"], id="auto-ping-timeout-word"),
    pytest.param(["--open-handshake-timeout", "0"], id="handshake-timeout-zero"),
    # infinity would turn a defence off without a word (no request deadline, expired tokens
    # valid for ever) or break every handshake (a token bucket of int(inf) tokens)
    pytest.param(["--open-handshake-timeout", "inf"], id="handshake-timeout-inf"),
    pytest.param(["--handshakes-per-ip-per-second", "inf"], id="handshakes-per-ip-inf"),
    pytest.param(["--drain-timeout", "1e400"], id="drain-timeout-overflow"),
    pytest.param(["--broker", "redis://localhost"], id="broker-redis"),
    pytest.param(["--broker", "http://rabbit/"], id="broker-http"),
    pytest.param(["--broker", "amqp://"], id="broker-no-host"),
    pytest.param(["--broker", "rabbit:5672"], id="broker-no-scheme"),
    pytest.param(["--broker", "Memory"], id="broker-case"),
    pytest.param(["--broker", ""], id="broker-empty"),
    pytest.param(["--handlers", "no.such.module"], id="handlers-missing-module"),
    pytest.param(["--handlers", "json"], id="handlers-module-without-handlers"),
    pytest.param(["--handlers", "workers.examples", "--handlers", "workers.examples"],
                 id="handlers-duplicate-request-types"),
    pytest.param(["--default-timeout-ms", "400000"], id="default-timeout-above-default-max"),
    pytest.param(["--default-timeout-ms", "2000", "--max-timeout-ms", "1000"],
                 id="default-timeout-above-max"),
    pytest.param(["--gateway-id", "bad id"], id="gateway-id-space"),
    pytest.param(["--gateway-id", "a/b"], id="gateway-id-slash"),
    pytest.param(["--gateway-id", "gw\n"], id="gateway-id-newline"),
    pytest.param(["--gateway-id", "gw#1"], id="gateway-id-hash"),
    pytest.param(["--no-such-option"], id="unknown-option"),
    pytest.param(["extra-argument"], id="positional-argument"),
])
def test_gateway_bad_values_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        gateway(*argv)


def test_gateway_id_too_long_for_an_amqp_queue_name_is_a_usage_error() -> None:
    try:
        config = gateway("--broker", "amqp://rabbit/", "--gateway-id", "g" * 300)
    except UsageError:
        return
    queueName = Topology(config.amqpPrefix).replyQueue(config.gatewayId)
    assert len(queueName.encode()) <= 255, "accepted a gateway id no AMQP queue can carry"


# The worker


def test_worker_minimal_and_defaults() -> None:
    config = worker("--broker", "amqp://rabbit/", "--handlers", "workers.examples")
    assert config == WorkerConfig(broker="amqp://rabbit/", handlers=("workers.examples",),
                                  concurrency=10, amqpPrefix="", drainTimeoutS=10.0)


def test_worker_every_option() -> None:
    config = worker("-b", "amqps://u:p@rabbit:5671/vh", "--handlers", "workers.examples",
                    "--handlers", EXTRA, "-c", "3", "--amqp-prefix", "t.",
                    "--drain-timeout", "2.5")
    assert config == WorkerConfig(broker="amqps://u:p@rabbit:5671/vh",
                                  handlers=("workers.examples", EXTRA), concurrency=3,
                                  amqpPrefix="t.", drainTimeoutS=2.5)


@pytest.mark.parametrize("argv", [
    pytest.param([], id="nothing"),
    pytest.param(["--handlers", "workers.examples"], id="no-broker"),
    pytest.param(["--broker", "memory", "--handlers", "workers.examples"], id="memory-broker"),
    pytest.param(["--broker", "amqp://rabbit/"], id="no-handlers"),
    pytest.param(["--broker", "redis://rabbit/", "--handlers", "workers.examples"],
                 id="bad-broker"),
    pytest.param(["--broker", "amqp://rabbit/", "--handlers", "no.such"], id="missing-module"),
    pytest.param(["--broker", "amqp://rabbit/", "--handlers", "json"], id="no-handlers-in-it"),
    pytest.param(["--broker", "amqp://rabbit/", "--handlers", "workers.examples", "-c", "0"],
                 id="concurrency-zero"),
    pytest.param(["--broker", "amqp://rabbit/", "--handlers", "workers.examples",
                  "--drain-timeout", "0"], id="drain-zero"),
])
def test_worker_bad_values_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        worker(*argv)


# The handler registry: resolved once, by the options


def test_gateway_options_resolve_the_in_process_handlers_once(
        monkeypatch: pytest.MonkeyPatch, extraHandlerModule: types.ModuleType) -> None:
    calls: list[tuple[object, ...]] = []

    def counting(*sources: object) -> object:
        calls.append(sources)
        return registerHandlers(*sources)

    monkeypatch.setattr(optionsModule, "registerHandlers", counting)
    options = GatewayOptions()
    options.parseOptions(["--handlers", EXTRA])
    assert options.registry == {"extra": extraHandlerModule.extra}
    assert calls == [(EXTRA,)]


def test_gateway_options_resolve_the_examples_by_default() -> None:
    options = GatewayOptions()
    options.parseOptions([])
    assert sorted(options.registry) == ["echo", "primes", "testRequest"]
    options.parseOptions(["--broker", "amqp://rabbit/"])
    assert options.registry == {}


def test_worker_options_resolve_the_handlers(extraHandlerModule: types.ModuleType) -> None:
    options = WorkerOptions()
    options.parseOptions(["--broker", "amqp://rabbit/", "--handlers", EXTRA])
    assert options.registry == {"extra": extraHandlerModule.extra}


@pytest.mark.parametrize(("argv", "message"), [
    (["--handlers", "no.such.module"], "--handlers: cannot import no"),
    (["--handlers", "json"], "--handlers: module json defines no IRequestHandler"),
    (["--handlers", "workers.examples", "--handlers", "workers.examples"],
     "--handlers: two handlers serve requestType 'testRequest'"),
])
def test_bad_handlers_messages(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as raised:
        gateway(*argv)
    assert str(raised.value) == message
    with pytest.raises(UsageError) as raised:
        worker("--broker", "amqp://rabbit/", *argv)
    assert str(raised.value) == message


def test_from_environment_resolves_the_handlers_for_relaybus_tac() -> None:
    options = GatewayOptions.fromEnvironment({"RELAYBUS_HANDLERS": EXTRA})
    assert list(options.registry) == ["extra"]


# The environment twins


def test_from_environment_with_nothing_set_is_the_defaults() -> None:
    config = GatewayOptions.fromEnvironment({}).config
    assert config.listen == "tcp:8080:interface=127.0.0.1"
    assert config.broker == "memory"
    assert config.inProcessHandlers == ("workers.examples",)


def test_from_environment_maps_every_gateway_variable() -> None:
    environ = {
        "RELAYBUS_LISTEN": "tcp:9001",
        "RELAYBUS_BROKER": "amqp://rabbit/",
        "RELAYBUS_GATEWAY_ID": "gw-env",
        "RELAYBUS_AMQP_PREFIX": "env.",
        "RELAYBUS_MAX_MESSAGE_BYTES": "4096",
        "RELAYBUS_MAX_IN_FLIGHT": "7",
        "RELAYBUS_DEFAULT_TIMEOUT_MS": "1000",
        "RELAYBUS_MAX_TIMEOUT_MS": "2000",
        "RELAYBUS_AUTO_PING_INTERVAL": "3",
        "RELAYBUS_AUTO_PING_TIMEOUT": "4",
        "RELAYBUS_OPEN_HANDSHAKE_TIMEOUT": "5",
        "RELAYBUS_DRAIN_TIMEOUT": "6",
        "RELAYBUS_WORKER_CONCURRENCY": "8",
        "RELAYBUS_UNRELATED": "ignored",
        "LISTEN": "ignored too",
    }
    config = GatewayOptions.fromEnvironment(environ).config
    assert config == GatewayConfig(
        listen="tcp:9001", broker="amqp://rabbit/", handlers=(), gatewayId="gw-env",
        amqpPrefix="env.", limits=Limits(4096, 7, 1000, 2000), autoPingIntervalS=3.0,
        autoPingTimeoutS=4.0, openHandshakeTimeoutS=5.0, drainTimeoutS=6.0,
        workerConcurrency=8)


def test_from_environment_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYBUS_MAX_IN_FLIGHT", "42")
    monkeypatch.setenv("RELAYBUS_LISTEN", "tcp:9002")
    config = GatewayOptions.fromEnvironment().config
    assert config.limits.maxInFlight == 42 and config.listen == "tcp:9002"


@pytest.mark.parametrize("environ", [
    {"RELAYBUS_MAX_IN_FLIGHT": "0"},
    {"RELAYBUS_MAX_IN_FLIGHT": "many"},
    {"RELAYBUS_BROKER": "redis://x"},
    {"RELAYBUS_DEFAULT_TIMEOUT_MS": "999999"},
    {"RELAYBUS_GATEWAY_ID": "no spaces"},
])
def test_from_environment_bad_values_are_usage_errors(environ: dict[str, str]) -> None:
    with pytest.raises(UsageError):
        GatewayOptions.fromEnvironment(environ)


def test_from_environment_handlers_is_a_comma_separated_list() -> None:
    config = GatewayOptions.fromEnvironment(
        {"RELAYBUS_HANDLERS": f"workers.examples, {EXTRA},"}).config
    assert config.handlers == ("workers.examples", EXTRA)


def test_worker_from_environment() -> None:
    config = WorkerOptions.fromEnvironment({
        "RELAYBUS_BROKER": "amqp://rabbit/", "RELAYBUS_HANDLERS": f"workers.examples,{EXTRA}",
        "RELAYBUS_CONCURRENCY": "4"}).config
    assert config.handlers == ("workers.examples", EXTRA)
    assert config.concurrency == 4


def test_worker_from_environment_reads_its_scalar_options() -> None:
    """What does work today: the scalar variables reach the options (then --handlers fails)."""
    options = WorkerOptions()
    with pytest.raises(UsageError, match="handlers"):
        options.fromEnvironment({"RELAYBUS_BROKER": "amqp://rabbit/",
                                 "RELAYBUS_CONCURRENCY": "4"})
    with pytest.raises(UsageError, match="broker"):
        WorkerOptions.fromEnvironment({"RELAYBUS_CONCURRENCY": "4"})


# Who may connect: the JWT options


def secretFile(tmp_path: Any, data: bytes = b"k" * 40) -> str:
    path = tmp_path / "secret"
    path.write_bytes(data)
    return str(path)


def test_no_jwt_key_means_no_checker() -> None:
    options = GatewayOptions()
    options.parseOptions([])
    assert options.checker is None
    assert not options.config.jwt.configured and options.config.allowAnonymous is False


def test_jwt_options_load_the_checker_once(tmp_path: Any) -> None:
    options = GatewayOptions()
    options.parseOptions(["--jwt-secret-file", secretFile(tmp_path), "--jwt-audience", "rb",
                          "--jwt-issuer", "https://idp", "--jwt-leeway", "5",
                          "--jwt-algorithms", "HS256", "--allow-anonymous"])
    assert options.checker is not None
    assert options.config.jwt == JWTSettings(secretFile=secretFile(tmp_path), audience="rb",
                                             issuer="https://idp", leewayS=5.0,
                                             algorithms=("HS256",))
    assert options.config.allowAnonymous is True


@pytest.mark.parametrize(("argv", "message"), [
    (["--allow-anonymous"], "--allow-anonymous needs a JWT key"),
    (["--jwt-secret-file", "/nonexistent/secret"], "cannot read"),
    (["--jwt-algorithms", "none"], "'none' is never accepted"),
    (["--jwt-algorithms", "HS256,RS256"], "must not mix"),
    (["--jwt-leeway", "-1"], "0 or more"),
    (["--jwt-leeway", "inf"], "finite"),  # expired tokens valid for ever
])
def test_jwt_mistakes_are_usage_errors(tmp_path: Any, argv: list[str], message: str) -> None:
    if argv[0] == "--jwt-algorithms":
        argv = ["--jwt-secret-file", secretFile(tmp_path), *argv]
    if argv[0] == "--jwt-leeway":
        argv = ["--jwt-secret-file", secretFile(tmp_path), *argv]
    with pytest.raises(UsageError, match=message):
        GatewayOptions().parseOptions(argv)


def test_a_short_secret_is_refused_without_showing_it(tmp_path: Any) -> None:
    with pytest.raises(UsageError) as raised:
        GatewayOptions().parseOptions(["--jwt-secret-file",
                                       secretFile(tmp_path, b"hunter2hunter2")])
    assert "hunter2" not in str(raised.value)


def test_from_environment_reads_the_jwt_options_and_flags(tmp_path: Any) -> None:
    options = GatewayOptions.fromEnvironment({
        "RELAYBUS_JWT_SECRET_FILE": secretFile(tmp_path), "RELAYBUS_JWT_AUDIENCE": "rb",
        "RELAYBUS_ALLOW_ANONYMOUS": "true"})
    assert options.checker is not None
    assert options.config.jwt.audience == "rb" and options.config.allowAnonymous is True
    unset = GatewayOptions.fromEnvironment({"RELAYBUS_JWT_SECRET_FILE": secretFile(tmp_path),
                                            "RELAYBUS_ALLOW_ANONYMOUS": "0"})
    assert unset.config.allowAnonymous is False
    with pytest.raises(UsageError, match="RELAYBUS_ALLOW_ANONYMOUS"):
        GatewayOptions.fromEnvironment({"RELAYBUS_ALLOW_ANONYMOUS": "maybe"})


def test_origin_and_host_options_repeat(tmp_path: Any) -> None:
    config = gateway("--allowed-origin", "https://a.example", "--allowed-origin", "http://b:*",
                     "--allowed-host", "gw.example")
    assert config.allowedOrigins == ("https://a.example", "http://b:*")
    assert config.allowedHosts == ("gw.example",)
    fromEnv = GatewayOptions.fromEnvironment({
        "RELAYBUS_ALLOWED_ORIGIN": "https://a.example, http://b:*",
        "RELAYBUS_ALLOWED_HOST": "gw.example"}).config
    assert (fromEnv.allowedOrigins, fromEnv.allowedHosts) == (config.allowedOrigins,
                                                             config.allowedHosts)


@pytest.mark.parametrize("origins", [[], ["--allowed-origin", "*"]])
def test_a_cookie_token_needs_an_explicit_origin_list(tmp_path: Any,
                                                      origins: list[str]) -> None:
    with pytest.raises(UsageError, match="--jwt-cookie needs an explicit --allowed-origin"):
        GatewayOptions().parseOptions(["--jwt-secret-file", secretFile(tmp_path),
                                       "--jwt-cookie", "rb", *origins])
    options = GatewayOptions()
    options.parseOptions(["--jwt-secret-file", secretFile(tmp_path), "--jwt-cookie", "rb",
                          "--allowed-origin", "https://app.example"])
    assert options.config.jwtCookie == "rb"


def test_jwks_url_and_refresh_from_the_command_line_and_the_environment() -> None:
    url = "https://idp.example/.well-known/jwks.json"
    config = gateway("--jwks-url", url, "--jwks-refresh", "60")
    assert (config.jwt.jwksUrl, config.jwt.jwksRefreshS) == (url, 60.0)
    assert config.jwt.configured
    assert gateway("--jwks-url", url).jwt.jwksRefreshS == 300.0
    options = GatewayOptions.fromEnvironment({"RELAYBUS_JWKS_URL": url,
                                              "RELAYBUS_JWKS_REFRESH": "120"})
    assert (options.config.jwt.jwksUrl, options.config.jwt.jwksRefreshS) == (url, 120.0)
    assert options.checker is not None and options.checker.keyIds == frozenset()


@pytest.mark.parametrize(("argv", "message"), [
    (["--jwks-refresh", "60"], "--jwks-refresh needs --jwks-url"),
    (["--jwks-url", "http://idp.example/jwks.json"], "must be https://"),
    (["--jwks-url", "https://u:hunter2@idp.example/jwks.json"], "credentials"),
    (["--jwks-url", "https://idp.example/k", "--jwks-refresh", "0.1"], "--jwks-refresh"),
    (["--jwks-url", "https://idp.example/k", "--jwks-file", "k.json"], "exactly one"),
])
def test_jwks_url_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message) as raised:
        gateway(*argv)
    assert "hunter2" not in str(raised.value)


def test_the_broker_url_may_come_from_the_environment_to_stay_out_of_ps(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYBUS_BROKER", "amqp://user:s3cret@rabbit/")
    worker = WorkerOptions()
    worker.parseOptions(["--handlers", "workers.examples"])
    assert worker.config.broker == "amqp://user:s3cret@rabbit/"
    gateway = GatewayOptions()
    gateway.parseOptions([])
    assert gateway.config.broker == "amqp://user:s3cret@rabbit/"
    explicit = WorkerOptions()
    explicit.parseOptions(["--broker", "amqp://other/", "--handlers", "workers.examples"])
    assert explicit.config.broker == "amqp://other/"  # the option wins


def test_without_either_the_gateway_is_embedded_and_the_worker_refuses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAYBUS_BROKER", raising=False)
    gateway = GatewayOptions()
    gateway.parseOptions([])
    assert gateway.config.broker == "memory"
    with pytest.raises(UsageError, match="or set RELAYBUS_BROKER"):
        WorkerOptions().parseOptions(["--handlers", "workers.examples"])


def test_a_bad_broker_url_from_the_environment_is_refused_without_its_password(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYBUS_BROKER", "redis://user:s3cret@rabbit/")
    with pytest.raises(UsageError) as caught:
        WorkerOptions().parseOptions(["--handlers", "workers.examples"])
    assert "s3cret" not in str(caught.value)

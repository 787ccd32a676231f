"""The `relaybus` command: `relaybus call REQUESTTYPE [PAYLOAD] [--url ...]`.

`call` prints one JSON line per chunk and one for the final response or error; exits 0 on a
response, 1 on an error, 2 on bad usage. `conformance --broker URL` checks a running worker
against docs/protocol.md (docs/workers-any-language.md): exits 0 when every scenario passed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import react

from relaybus.errors import RelaybusError

DEFAULT_URL = "ws://127.0.0.1:8080/ws"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaybus", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    call = commands.add_parser("call", help="send one request and print what comes back")
    call.add_argument("requestType")
    call.add_argument("payload", nargs="?", default="null", help="JSON (default: null)")
    call.add_argument("--url", default=DEFAULT_URL,
                      help=f"gateway WebSocket (default {DEFAULT_URL})")
    call.add_argument("--timeout", type=float, default=30.0,
                      help="the request's deadline in seconds (default 30)")
    call.add_argument("--connect-timeout", dest="connectTimeout", type=float, default=10.0,
                      help="seconds to connect to the gateway (default 10)")
    call.add_argument("--token", default=os.environ.get("RELAYBUS_TOKEN"),
                      help="a JWT for a gateway that authenticates (default: $RELAYBUS_TOKEN)")
    kit = commands.add_parser(
        "conformance", help="check a running worker (any language) against the AMQP contract",
        description="Start a gateway against BROKER and check that the worker already "
                    "consuming there serves conformance.echo, .stream, .fail and .slow as "
                    "docs/workers-any-language.md defines; print a pass/fail table.")
    kit.add_argument("--broker", required=True, help="the worker's broker (amqp:// URL)")
    kit.add_argument("--amqp-prefix", dest="amqpPrefix", default="",
                     help="the worker's --amqp-prefix (default empty)")
    kit.add_argument("--worker-pid", dest="workerPid", type=_positiveInt, default=None,
                     help="the worker's process id: enables the SIGTERM scenario (last; it "
                          "stops the worker)")
    kit.add_argument("--timeout", type=_positiveFloat, default=10.0,
                     help="seconds every single wait may take (default 10)")
    kit.add_argument("--skip", action="append", default=[], metavar="SCENARIO",
                     help="leave a scenario out (repeatable)")
    return parser


def _positiveInt(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return value


def _positiveFloat(text: str) -> float:
    value = float(text)
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be a number of seconds in (0, 3600]")
    return value


def _print(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


async def _call(reactor: Any, args: argparse.Namespace, payload: Any) -> int:
    from relaybus.client import connect

    try:
        client = await connect(args.url, reactor, timeout=args.connectTimeout,
                               token=args.token)
    except RelaybusError as e:
        _print({"type": "error", "code": str(e.code), "message": e.message})
        return 1
    seq = 0

    def onChunk(data: Any) -> None:
        nonlocal seq
        _print({"type": "chunk", "seq": seq, "data": data})
        seq += 1

    try:
        data = await client.call(args.requestType, payload, onChunk=onChunk,
                                 timeout=args.timeout)
    except RelaybusError as e:
        _print({"type": "error", "code": str(e.code), "message": e.message})
        return 1
    finally:
        if client.connected:
            await client.close()
    _print({"type": "response", "data": data})
    return 0


def _conformance(args: argparse.Namespace) -> None:
    from twisted.python import usage

    from relaybus.amqp.link import validateBrokerURL
    from relaybus.conformance.kit import SCENARIOS, run
    from relaybus.options import checkName

    try:
        validateBrokerURL(args.broker)
        checkName("--amqp-prefix", args.amqpPrefix)  # as the gateway it starts checks it
    except (ValueError, usage.UsageError) as e:
        _parser().error(str(e))
    unknown = set(args.skip) - {s.name for s in SCENARIOS}
    if unknown:
        _parser().error(f"--skip: no scenario {', '.join(sorted(unknown))}; the scenarios: "
                        f"{', '.join(s.name for s in SCENARIOS)}")
    raise SystemExit(run(args.broker, args.amqpPrefix, args.workerPid, args.timeout,
                         frozenset(args.skip)))


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "conformance":
        _conformance(args)
    try:
        payload = json.loads(args.payload)
    except ValueError as e:
        _parser().error(f"payload is not JSON: {e}")

    async def run(reactor: Any) -> None:
        code = await _call(reactor, args, payload)
        if code:
            raise SystemExit(code)

    react(lambda reactor: ensureDeferred(run(reactor)))

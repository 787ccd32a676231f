"""Real twistd processes and a throwaway RabbitMQ vhost, for tests, benchmarks and (later) the
worker conformance kit.

No pytest here: the integration tests' fixtures (tests/processfixtures.py) and the benchmarks
(benchmarks/) both build on it. The processes are started the way a user starts them
(`twistd --nodaemon relaybus ...`), each with its log in a file of its own; the vhost helpers
drive the local broker through `rabbitmqctl` (RabbitMQ on 127.0.0.1:5672, user guest).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from websockets.asyncio.client import ClientConnection

# Processes


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def portRefuses(port: int) -> bool:
    """True once nothing listens on the port (a stopped gateway)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def twistdCommand() -> list[str]:
    """The `twistd` next to this interpreter (the virtualenv's), as a user would run it."""
    twistd = Path(sys.executable).parent / "twistd"
    return [str(twistd)] if twistd.exists() else [sys.executable, "-m", "twisted.scripts.twistd"]


class ServiceProcess:
    """One `twistd --nodaemon <plugin> ...` process with its log in a file."""

    def __init__(self, plugin: str, args: list[str], env: dict[str, str] | None = None,
                 name: str | None = None, reactor: str | None = None,
                 twistdOptions: list[str] | None = None) -> None:
        self.plugin = plugin
        self.args = args
        self.reactor = reactor  # twistd's -r (e.g. "asyncio"); None: twistd's default
        self.twistdOptions = twistdOptions or []  # twistd's own, before the plugin (--profile)
        self.name = name or plugin
        self._env = env
        self.passFds: tuple[int, ...] = ()  # descriptors the process inherits (as they are)
        self._logDir = tempfile.mkdtemp(prefix=f"relaybus-{self.name}-")
        self.logPath = Path(self._logDir) / "twistd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        """twistd, its own options, the plugin and the plugin's options. A subclass may run
        something else under the same log, stop and scan handling."""
        return [*twistdCommand(), "--nodaemon", "--pidfile=",
                *(["--reactor", self.reactor] if self.reactor else []), *self.twistdOptions,
                self.plugin, *self.args]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ if self._env is None else self._env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self) -> ServiceProcess:
        with open(self.logPath, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                cwd=self._logDir, start_new_session=True, pass_fds=self.passFds)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def log(self) -> str:
        return self.logPath.read_text(errors="replace") if self.logPath.exists() else ""

    def waitForLog(self, pattern: str, timeout: float = 20.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(re.findall(pattern, self.log)) >= count:
                return
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{self.log}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no {pattern!r} in the log after {timeout}s:\n"
                           f"{self.log[-4000:]}")

    def signal(self, signum: int) -> None:
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait; SIGKILL if it will not go. Returns the exit code."""
        if self.process is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise RuntimeError(
                f"{self.name} ignored SIGTERM for {timeout}s:\n{self.log[-4000:]}") from None

    def kill(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait(5)


class GatewayProcess(ServiceProcess):
    """`listen`: the --listen (default: tcp: on 127.0.0.1:`port`); `port` is where the tests
    reach it either way."""

    def __init__(self, args: list[str], port: int | None = None, listen: str | None = None,
                 **kwargs: Any) -> None:
        self.port = port or freePort()
        super().__init__("relaybus", ["--listen", listen or f"tcp:{self.port}:interface=127.0.0.1",
                                      *args], **kwargs)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def httpStatus(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    def metrics(self) -> dict[str, float]:
        """/metrics as {"name{labels}": value}, e.g. m["relaybus_requests_in_flight"]."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return parseMetrics(r.read().decode("utf-8"))

    def waitUntilReady(self, timeout: float = 20.0) -> GatewayProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n{self.log}")
            try:
                if self.httpStatus("/readyz") == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout}s:\n{self.log[-4000:]}")


# What the gateway's unit (docs/systemd/relaybus@.service) listens on: the socket its socket
# unit passed.
SYSTEMD_LISTEN = "systemd:domain=INET:index=0"
# The name systemd gives a passed socket by default (its socket unit's); Twisted ignores
# passed sockets that have none (no LISTEN_FDNAMES).
SYSTEMD_FD_NAME = "relaybus@1.socket"


class ActivatedGatewayProcess(GatewayProcess):
    """A gateway started the way systemd starts a socket unit's service: the socket as fd 3,
    LISTEN_FDS=1, LISTEN_PID its own pid, LISTEN_FDNAMES its name, and --listen SYSTEMD_LISTEN.

    `listening` None: the real `systemd-socket-activate` binds 127.0.0.1:`port` and execs twistd
    (same pid) when the first connection comes. A bound, listening socket of the caller's: it
    is handed over as systemd hands over its own (several gateways can share a port so, each
    with an SO_REUSEPORT socket, like relaybus@N.socket units); the caller keeps its copy, as
    systemd does, so connections wait in its queue while no process serves it, until the
    caller closes it.
    """

    def __init__(self, args: list[str], listening: socket.socket | None = None,
                 **kwargs: Any) -> None:
        self.listening = listening
        super().__init__(args, port=listening.getsockname()[1] if listening else None,
                         listen=SYSTEMD_LISTEN, **kwargs)
        if listening is not None:
            self.passFds = (listening.fileno(),)

    def command(self) -> list[str]:
        twistd = super().command()
        if self.listening is None:  # it passes on only the variables it is told to
            return ["systemd-socket-activate", "-l", f"127.0.0.1:{self.port}",
                    f"--fdname={SYSTEMD_FD_NAME}",
                    *(f"--setenv={name}" for name in self.environment()), *twistd]
        fd = self.listening.fileno()
        moveTo3 = "" if fd == 3 else f" 3<&{fd} {fd}<&-"
        return ["bash", "-c", "export LISTEN_FDS=1 LISTEN_PID=$$ "
                f'LISTEN_FDNAMES={SYSTEMD_FD_NAME}; exec "$@"{moveTo3}', "bash", *twistd]


class WorkerProcess(ServiceProcess):
    def __init__(self, args: list[str], **kwargs: Any) -> None:
        super().__init__("relaybus-worker", args, **kwargs)

    def waitUntilReady(self, timeout: float = 20.0, count: int = 1) -> WorkerProcess:
        self.waitForLog(r"connected and set up", timeout, count)
        return self


def stopProcess(process: ServiceProcess, timeout: float = 30.0) -> str | None:
    """SIGTERM it and wait; what went wrong (it ignored SIGTERM, or exited with a status other
    than a clean shutdown's), or None."""
    try:
        code = process.stop(timeout=timeout)
    except Exception as e:  # it ignored SIGTERM (and was killed), or would not even die
        return f"{process.name}: {e}"
    # twistd ends itself with the signal it got once it has shut down cleanly
    if code not in (0, -signal.SIGTERM):
        return f"{process.name} exited with status {code}"
    return None


# The gateway's /metrics


ENDED_METRIC = "relaybus_requests_ended_total"


def parseMetrics(text: str) -> dict[str, float]:
    """Prometheus text as {"name{labels}": value}."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def endedByOutcome(samples: dict[str, float]) -> dict[str, float]:
    """relaybus_requests_ended_total{outcome="..."} as {outcome: count}."""
    prefix = ENDED_METRIC + '{outcome="'
    return {key[len(prefix):-2]: value for key, value in samples.items()
            if key.startswith(prefix)}


def requestAccounting(samples: dict[str, float]) -> str:
    """What breaks "every accepted request ends exactly once" in a gateway's /metrics: requests
    still in flight, or accepted != ended + in flight (a request that ended twice counts
    twice); "" when the books balance."""
    inFlight = samples.get("relaybus_requests_in_flight", 0)
    accepted = samples.get("relaybus_requests_accepted_total", 0)
    ended = sum(endedByOutcome(samples).values())
    held = [f"{inFlight:.0f} requests still in flight"] if inFlight else []
    if accepted != ended + inFlight:
        held.append(f"{accepted:.0f} accepted != {ended:.0f} ended + in flight")
    return ", ".join(held)


# Logs

# What must never appear in a relaybus process's log.
LOG_ERROR_PATTERNS = re.compile(
    r"Unhandled [Ee]rror|Traceback \(most recent call last\)|AlreadyCalledError")
# What a benchmark lists as worth a look: warnings too.
LOG_FINDING_PATTERNS = re.compile(r"#(warn|error|critical)\]|Traceback|Unhandled")


def logErrors(text: str) -> list[str]:
    """Each error or traceback in (part of) a log, with a few lines of context."""
    lines = text.splitlines()
    return ["\n".join(lines[max(0, i - 3):i + 12]) for i, line in enumerate(lines)
            if LOG_ERROR_PATTERNS.search(line)]


def logFindings(text: str) -> list[str]:
    """Warnings, errors and tracebacks in (part of) a twistd log, one line each."""
    return [line.strip() for line in text.splitlines() if LOG_FINDING_PATTERNS.search(line)]


def stopAndScan(process: ServiceProcess) -> list[str]:
    """SIGTERM it and wait; what its log says (during the run and while stopping) and an exit
    status other than a clean shutdown's."""
    runLog = process.log
    findings = [f"{process.name} log: {line}" for line in logFindings(runLog)]
    problem = stopProcess(process)
    if problem is not None:
        findings.append(problem)
    findings += [f"{process.name} log (while stopping): {line}"
                 for line in logFindings(process.log[len(runLog):])]
    return findings


# RabbitMQ


class RabbitMQError(RuntimeError):
    pass


def rabbitmqctl(*args: str, timeout: float = 60) -> str:
    try:
        done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise RabbitMQError(f"rabbitmqctl {' '.join(args)} took over {timeout}s") from None
    if done.returncode != 0:
        raise RabbitMQError(f"rabbitmqctl {' '.join(args)} failed ({done.returncode}):\n"
                            f"{done.stdout}{done.stderr}")
    return done.stdout


def brokerPid() -> int | None:
    """The RabbitMQ node's OS process id (for CPU accounting), or None."""
    try:
        match = re.search(r"\d+", rabbitmqctl("eval", "os:getpid()."))
    except (OSError, RabbitMQError):
        return None
    return int(match.group()) if match else None


def newVhostName(namePrefix: str) -> str:
    return f"{namePrefix}-{secrets.token_hex(6)}"


def vhostURL(vhost: str) -> str:
    """The guest user's amqp:// URL for a vhost of the local broker."""
    return f"amqp://guest:guest@127.0.0.1:5672/{urllib.parse.quote(vhost, safe='')}"


def createVhost(vhost: str) -> str:
    """Create the vhost, usable by guest; returns its URL."""
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return vhostURL(vhost)


def deleteVhost(vhost: str) -> None:
    rabbitmqctl("delete_vhost", vhost)


def listQueues(vhost: str) -> dict[str, dict[str, Any]]:
    """{name: {"name", "messages", "consumers"}} of every queue in the vhost."""
    out = rabbitmqctl("list_queues", "-p", vhost, "name", "messages", "consumers",
                      "--formatter", "json")
    return {q["name"]: q for q in json.loads(out or "[]")}


def closeConnections(vhost: str, reason: str) -> None:
    """The broker closes every client connection to the vhost (a fault to inject)."""
    rabbitmqctl("close_all_connections", "--vhost", vhost, reason)


def discardVhost(vhost: str) -> list[str]:
    """Delete a command-line tool's throwaway vhost, saying so on stdout; returns what it left
    behind (queues with messages). A failure to list the queues still deletes the vhost."""
    findings = []
    try:
        busy = [f"{q['name']} {q['messages']}" for q in listQueues(vhost).values()
                if q["messages"]]
        if busy:
            findings.append(f"queues with messages left at the end: {busy}")
    except Exception as e:
        findings.append(f"could not list the queues of vhost {vhost}: {e}")
    try:
        deleteVhost(vhost)
        print(f"Deleted vhost {vhost}.")
    except Exception as e:
        print(f"Could not delete vhost {vhost}: {e}")
    return findings


# Command-line runs (the benchmarks)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interruptOnSigterm() -> None:
    """SIGTERM outside an event loop (while starting or stopping the processes) acts like
    Ctrl-C, so the cleanup runs. Call it again after asyncio.run(), which resets SIGTERM to its
    default on closing its loop (die without cleaning up)."""
    signal.signal(signal.SIGTERM, _interrupt)


class CommandRun:
    """The exit status of a command-line tool's run (0 unless someone says otherwise)."""

    status = 0


@contextlib.contextmanager
def commandRun(what: str, cleanUp: Callable[[], None]) -> Iterator[CommandRun]:
    """The frame of a command-line tool's run: Ctrl-C or SIGTERM make the status 130, a failure
    is printed and makes it 2; then, with both signals ignored, `cleanUp` runs (stop the
    processes, delete the vhost) whatever happened."""
    run = CommandRun()
    try:
        yield run
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\nInterrupted: cleaning up.", flush=True)
        run.status = 130
    except Exception as e:
        print(f"\n{what} failed: {type(e).__name__}: {e}", flush=True)
        run.status = 2
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cleanUp()


async def openGatewaySocket(url: str, **options: Any) -> tuple[ClientConnection, dict[str, Any]]:
    """A `websockets` asyncio connection to a gateway (not relaybus's own client), and the
    gateway's hello frame. `options` go to websockets' connect() over the defaults below (e.g.
    ping_interval=None, create_connection=a ClientConnection subclass)."""
    from websockets.asyncio.client import connect

    # compression=None: Autobahn's server declines permessage-deflate anyway; say so here.
    ws = await connect(url, **{"compression": None, "max_size": 16 * 1024 * 1024,
                               "open_timeout": 10, "proxy": None, **options})
    hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
    if hello.get("type") != "hello":
        await ws.close()
        raise RuntimeError(f"the gateway's first frame is not hello: {str(hello)[:160]}")
    return ws, hello

"""The systemd units in docs/systemd are the ones the guides show (the worker's in
docs/workers.md, the gateway's socket and service in docs/deploying.md), systemd accepts them,
and the commands they start parse as `twistd relaybus-worker` / `twistd relaybus` do."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import endpoints
from twisted.python.systemd import ListenFDs

from relaybus.harness import SYSTEMD_LISTEN
from relaybus.listener import DEFAULT_BACKLOG

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "docs" / "systemd"
GUIDES = {"relaybus-worker@.service": "workers.md", "relaybus@.socket": "deploying.md",
          "relaybus@.service": "deploying.md"}
ENVIRONMENT_FILES = {"relaybus-worker@.service": "/etc/relaybus/worker.env",
                     "relaybus@.service": "/etc/relaybus/gateway.env"}


def _unitText(name: str) -> str:
    """The unit as its guide shows it: without the comment that names the guide."""
    return "".join(line for line in (UNITS / name).read_text().splitlines(keepends=True)
                   if not line.startswith("# The unit of docs/"))


def _setting(name: str, key: str) -> str:
    found = re.search(rf"^{key}=(.*)$", _unitText(name), re.M)
    assert found is not None, f"{name} has no {key}="
    return found.group(1)


def _execStart(name: str, plugin: str) -> tuple[list[str], list[str]]:
    """twistd's own options and the plugin's, from a unit's ExecStart."""
    argv = _setting(name, "ExecStart").split()
    at = argv.index(plugin)
    return argv[1:at], argv[at + 1:]


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_each_unit_file_is_the_one_its_guide_shows(name: str) -> None:
    guide = (ROOT / "docs" / GUIDES[name]).read_text()
    assert _unitText(name) in re.findall(r"```ini\n(.*?)```", guide, re.S)


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (./dev test does)")
    twistd = Path(sys.executable).parent / "twistd"
    instances = []
    for name in sorted(GUIDES):
        text = _unitText(name).replace("/srv/relaybus/.venv/bin/twistd", str(twistd))
        if name in ENVIRONMENT_FILES:
            environment = tmp_path / Path(ENVIRONMENT_FILES[name]).name
            environment.write_text("RELAYBUS_BROKER=amqp://guest:guest@127.0.0.1/\n")
            text = text.replace(ENVIRONMENT_FILES[name], str(environment))
        instance = tmp_path / name.replace("@.", "@1.")
        instance.write_text(text)
        instances.append(instance)
    # one directory: the gateway's service and socket find each other there
    done = subprocess.run([analyze, "verify", *map(str, instances)], capture_output=True,
                          text=True, timeout=60)
    report = done.stdout + done.stderr
    # systemd only warns about unknown keys and sections: any output is a finding
    relevant = [line for line in report.splitlines()
                if any(instance.name in line for instance in instances)
                or "Unknown" in line or "not executable" in line]
    assert done.returncode == 0 and not relevant, report


def test_the_worker_units_command_line_is_a_valid_worker_command() -> None:
    twistdOptions, workerArgs = _execStart("relaybus-worker@.service", "relaybus-worker")
    assert twistdOptions == ["--nodaemon", "--pidfile=", "--reactor", "asyncio"]
    from relaybus.options import WorkerOptions

    # the guide's placeholder module replaced by a real one; the broker comes from the
    # EnvironmentFile in production
    workerArgs = ["workers.examples" if a == "mypackage.handlers" else a for a in workerArgs]
    options = WorkerOptions()
    options.parseOptions([*workerArgs, "--broker", "amqp://127.0.0.1/"])
    assert (options.config.concurrency, options.config.threads,
            options.config.drainTimeoutS) == (50, 8, 10.0)


@pytest.fixture
def passedSocket(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An IPv4 socket, as relaybus@1.socket passes it (Twisted read LISTEN_FDS at import)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listening:
        monkeypatch.setattr(endpoints._SystemdParser, "_sddaemon",
                            ListenFDs([listening.fileno()], ["relaybus@1.socket"]))
        yield


def test_the_gateway_units_command_line_listens_on_what_its_socket_unit_binds(
        passedSocket: None) -> None:
    twistdOptions, gatewayArgs = _execStart("relaybus@.service", "relaybus")
    assert twistdOptions == ["--nodaemon", "--pidfile="]
    assert "--gateway-id" not in gatewayArgs  # one id for all instances would split replies
    from relaybus.options import GatewayOptions

    options = GatewayOptions()
    options.parseOptions(gatewayArgs)
    # what tests/integration/test_systemd_activation.py runs, on what the socket unit binds
    assert options.config.listen == SYSTEMD_LISTEN
    address = _setting("relaybus@.socket", "ListenStream")
    assert "domain=INET:" in SYSTEMD_LISTEN and re.fullmatch(r"[\d.]+:\d+", address), address
    assert _setting("relaybus@.socket", "ReusePort") == "yes"
    assert int(_setting("relaybus@.socket", "Backlog")) == DEFAULT_BACKLOG
    assert _setting("relaybus@.service", "Requires") == "relaybus@%i.socket"

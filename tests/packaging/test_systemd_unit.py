"""The worker's systemd unit (docs/systemd/relaybus-worker@.service) is the one docs/workers.md
shows, systemd accepts it, and the command it starts parses as `twistd relaybus-worker` does."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "docs" / "systemd" / "relaybus-worker@.service"


def _unitText() -> str:
    return "".join(line for line in UNIT.read_text().splitlines(keepends=True)
                   if not line.startswith("# The unit of docs/workers.md"))


def test_the_unit_file_is_the_one_the_guide_shows() -> None:
    guide = (ROOT / "docs" / "workers.md").read_text()
    shown = re.search(r"```ini\n(.*?)```", guide, re.S)
    assert shown is not None
    assert shown.group(1) == _unitText()


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (./dev test does)")
    twistd = Path(sys.executable).parent / "twistd"
    text = _unitText().replace("/srv/relaybus/.venv/bin/twistd", str(twistd))
    (tmp_path / "worker.env").write_text("RELAYBUS_BROKER=amqp://guest:guest@127.0.0.1/\n")
    text = text.replace("/etc/relaybus/worker.env", str(tmp_path / "worker.env"))
    instance = tmp_path / "relaybus-worker@1.service"
    instance.write_text(text)
    done = subprocess.run([analyze, "verify", str(instance)], capture_output=True, text=True,
                          timeout=60)
    report = done.stdout + done.stderr
    # systemd only warns about unknown keys and sections: any output is a finding
    relevant = [line for line in report.splitlines() if instance.name in line
                or "Unknown" in line or "not executable" in line]
    assert done.returncode == 0 and not relevant, report


def test_the_units_command_line_is_a_valid_worker_command() -> None:
    execStart = re.search(r"^ExecStart=(.*)$", _unitText(), re.M)
    assert execStart is not None
    argv = execStart.group(1).split()
    plugin = argv.index("relaybus-worker")
    assert argv[1:plugin] == ["--nodaemon", "--pidfile=", "--reactor", "asyncio"]
    from relaybus.options import WorkerOptions

    # the guide's placeholder module replaced by a real one; the broker comes from the
    # EnvironmentFile in production
    workerArgs = ["workers.examples" if a == "mypackage.handlers" else a
                  for a in argv[plugin + 1:]]
    options = WorkerOptions()
    options.parseOptions([*workerArgs, "--broker", "amqp://127.0.0.1/"])
    assert (options.config.concurrency, options.config.threads,
            options.config.drainTimeoutS) == (50, 8, 10.0)

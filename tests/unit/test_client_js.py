"""The browser library's own tests (src/relaybus/web/client/test, Node's built-in runner with a
fake WebSocket and mocked timers), run as part of the unit tests so a broken library fails here
too. They need Node.js 20 or newer (node:test's mock.timers) and nothing from npm."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CLIENT_DIR = Path(__file__).resolve().parents[2] / "src" / "relaybus" / "web" / "client"
NODE_TEST_TIMEOUT_S = 60
MIN_NODE_MAJOR = 20
INSTALL_HINT = (f"the browser library's tests need Node.js >= {MIN_NODE_MAJOR} on PATH "
                "(Debian: apt-get install nodejs)")


def _nodeMajorVersion(node: str) -> int:
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
    match = re.match(r"v(\d+)\.", version)
    assert match, f"unexpected `node --version` output: {version!r}"
    return int(match.group(1))


def test_browser_library_node_tests_pass() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail(INSTALL_HINT)
    major = _nodeMajorVersion(node)
    if major < MIN_NODE_MAJOR:
        pytest.fail(f"{INSTALL_HINT}; found Node.js {major}")
    try:
        run = subprocess.run([node, "--test", "--test-reporter=tap"], cwd=CLIENT_DIR,
                             capture_output=True, text=True, timeout=NODE_TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"`node --test` did not finish within {NODE_TEST_TIMEOUT_S} s:\n"
                    f"{e.stdout or ''}\n{e.stderr or ''}")
    output = f"{run.stdout}\n{run.stderr}"
    if run.returncode != 0:
        pytest.fail(f"`node --test` in {CLIENT_DIR} failed (exit {run.returncode}):\n{output}")
    passed = re.search(r"^# pass (\d+)$", run.stdout, re.MULTILINE)
    failed = re.search(r"^# fail (\d+)$", run.stdout, re.MULTILINE)
    assert passed and failed, f"no test summary from `node --test`:\n{output}"
    assert int(failed.group(1)) == 0, output
    assert int(passed.group(1)) > 0, f"`node --test` ran no tests:\n{output}"

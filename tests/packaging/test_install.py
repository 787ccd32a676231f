"""`pip install .` must make `twistd relaybus` and `twistd relaybus-worker` appear."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_plugins_are_found_by_twisted() -> None:
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    names = {plugin.tapname for plugin in getPlugins(IServiceMaker)}
    assert {"relaybus", "relaybus-worker"} <= names


def test_no_plugin_cache_is_tracked() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    assert not [path for path in tracked if path.endswith("dropin.cache")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(out), str(ROOT)], check=True, timeout=300)
    [built] = out.glob("relaybus-*.whl")
    return built


def test_wheel_ships_the_plugin_without_a_cache(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/relaybus_plugin.py" in names
    assert "relaybus/tap.py" in names and "workers/examples.py" in names
    # twisted/ and twisted/plugins/ must stay namespace directories, or the wheel would
    # shadow Twisted's own packages; and a dropin.cache would overwrite Twisted's cache.
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not [name for name in names if name.endswith("dropin.cache")]
    assert not [name for name in names if name.startswith("workers/node")]


def test_wheel_ships_the_demo_page_and_browser_library_but_not_their_tests(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"relaybus/web/index.html", "relaybus/web/demo.js",
            "relaybus/web/client/relaybus.js", "relaybus/web/client/package.json"} <= names
    assert not [name for name in names
                if name.startswith(("relaybus/web/client/test/",
                                    "relaybus/web/client/node_modules/"))]


def test_installed_wheel_registers_both_twistd_commands(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(wheel)], check=True, timeout=300)
    # -S: no site processing, so the editable checkout's .pth does not put src/ on the path;
    # the dependencies come from this environment's site-packages, relaybus from the wheel.
    dependencies = sysconfig.get_paths()["purelib"]
    probe = ("import relaybus, sys\n"
             "from twisted.plugin import getPlugins\n"
             "from twisted.application.service import IServiceMaker\n"
             "print(relaybus.__file__)\n"
             "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))\n")
    result = subprocess.run([sys.executable, "-S", "-c", probe], capture_output=True, text=True,
                            env={"PYTHONPATH": f"{target}:{dependencies}"}, timeout=60)
    assert result.returncode == 0, result.stderr
    moduleFile, plugins = result.stdout.splitlines()
    assert moduleFile.startswith(str(target))
    assert "'relaybus'" in plugins and "'relaybus-worker'" in plugins

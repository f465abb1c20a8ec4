"""A plain (non-editable) install carries the package and the twistd dropin."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from .conftest import skip_unless_strict

REPO = Path(__file__).resolve().parents[2]


def test_pip_install_gives_twistd_a_socks4_plugin(tmp_path):
    # Build from a copy, so that no build/ or egg-info left in the checkout
    # can stand in for what the sources produce, and none is left behind.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"))
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    if build.returncode != 0 and "No matching distribution found for setuptools" in build.stderr:
        skip_unless_strict("pip cannot fetch setuptools for the isolated build (offline?)")
    assert build.returncode == 0, build.stderr
    assert (target / "twisted" / "plugins" / "socksident_plugin.py").is_file()
    # Our dropin must not shadow Twisted's own packages.
    assert not (target / "twisted" / "__init__.py").exists()
    assert not (target / "twisted" / "plugins" / "__init__.py").exists()
    assert (target / "socksident" / "py.typed").is_file()
    # Run from an empty directory so that only the installed copy is found.
    env = {**os.environ, "PYTHONPATH": str(target)}
    listing = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert listing.returncode == 0, listing.stderr
    [line] = [entry for entry in listing.stdout.splitlines() if entry.split()[:1] == ["socks4"]]
    assert "IDENT" in line
    where = "import socksident.server, twisted.plugins.socksident_plugin as p; " \
            "print(socksident.server.__file__); print(p.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", where], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60,
    )
    files = found.stdout.split()
    assert len(files) == 2 and all(f.startswith(str(target)) for f in files), found

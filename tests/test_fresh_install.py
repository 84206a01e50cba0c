"""A fresh clone installs as the README's quick start says, and searches from any folder.

The clone goes to a temporary folder outside the tree, into a new virtual environment
(no system site-packages), and the search runs from another temporary folder with an
empty prunetune cache and no `PRUNETUNE_DATA`: whatever the installed package needs has
to ship with it. pip's caches are shared with this machine, and pip does not byte-compile
what it installs (Python compiles what the search imports as it imports it): that keeps
the new environment as cheap as it gets without giving up its isolation.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TINY_SPEC = """\
name: fresh
algorithm: {num_samples: 3}
evaluation: {seq_len: 64, windows: 2, batch_size: 2, calibration_samples: 2}
"""


def quick_start(readme: str) -> list[str]:
    """The commands of the README's quick start: the lines of its first bash block."""
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block is not None, "the quick start has no bash block"
    return [line for line in block[1].splitlines() if line.strip()]


def checkout_root() -> Path:
    """The root of the git checkout that holds this test; skips when there is none."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--show-toplevel"],
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"{ROOT} is not a git checkout (or git is missing): nothing to clone")
    return Path(out.stdout.strip())


def run(command: str, cwd: Path, env: dict[str, str], timeout: float) -> float:
    """Run a shell command; fail the test with its output tail if it fails. Returns seconds."""
    start = time.perf_counter()
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"`{command}` failed:\n{(done.stdout + done.stderr)[-4000:]}"
    return time.perf_counter() - start


def test_the_quick_start_is_two_commands() -> None:
    commands = quick_start((ROOT / "README.md").read_text())
    assert len(commands) == 2 and commands[1] == "prunetune search"
    assert commands[0].startswith("pip install ")


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_a_fresh_clone_installs_as_the_readme_says_and_searches(tmp_path: Path) -> None:
    clone, venv, work = tmp_path / "clone", tmp_path / "venv", tmp_path / "work"
    subprocess.run(["git", "clone", "--quiet", str(checkout_root()), str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install, search = quick_start((clone / "README.md").read_text())
    env = {key: value for key, value in os.environ.items()
           if key not in ("PRUNETUNE_DATA", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", VIRTUAL_ENV=str(venv),
               PRUNETUNE_CACHE=str(tmp_path / "cache"), PIP_NO_COMPILE="1")
    seconds = {"install": run(install, clone, env, timeout=1800)}
    work.mkdir()
    (work / "spec.yaml").write_text(TINY_SPEC)
    seconds["search"] = run(f"{search} spec.yaml --run-dir run", work, env, timeout=1200)
    assert (work / "run" / "front.parquet").is_file()
    print(f"fresh clone: install {seconds['install']:.0f} s, search {seconds['search']:.0f} s")

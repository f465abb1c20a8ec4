"""The README's rule-tester examples, run against examples/sockd.conf as printed."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROMPT = "$ python -m socksident.rules "


def readme_tester_examples() -> list[tuple[str, list[str], int]]:
    """(command line, expected output lines, expected exit status) per example."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    examples = []
    for index, line in enumerate(lines):
        if not line.startswith(PROMPT):
            continue
        output = []
        status = 0
        for following in lines[index + 1 :]:
            if following.startswith("$ echo $?"):
                continue
            if following.startswith("$") or following.startswith("```"):
                break
            output.append(following)
        if output and output[-1].isdigit():
            status = int(output.pop())
        examples.append((line[len("$ "):], output, status))
    return examples


EXAMPLES = readme_tester_examples()


def test_the_readme_has_tester_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("command, expected, status", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_readme_tester_example_prints_what_the_readme_shows(command, expected, status):
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "socksident.rules"]
    run = subprocess.run(
        [sys.executable, *argv[1:]], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert run.stdout.splitlines() == expected, run.stderr
    assert run.returncode == status

"""Run the fuzz targets: `python fuzz/run.py [--seconds N] [--jobs J] [TARGET...]`.

Each target runs for N seconds on its own corpus (`fuzz/corpus/TARGET`, kept
between runs and not committed); the summary line per target gives libFuzzer's
executions, edge coverage (``cov``) and features (``ft``).  Exit status 1 if a
target found a crash (its reproducer is written as ``crash-*`` next to it).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

__all__ = ["TARGETS", "main"]

HERE = Path(__file__).resolve().parent
TARGETS = ("socks4", "ident", "rules", "server")


def _start(target: str, seconds: int) -> subprocess.Popen[str]:
    corpus = HERE / "corpus" / target
    corpus.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            sys.executable,
            str(HERE / f"fuzz_{target}.py"),
            f"-max_total_time={seconds}",
            "-print_final_stats=1",
            "-timeout=10",
            "-rss_limit_mb=1024",
            f"-artifact_prefix={HERE}/crash-{target}-",
            str(corpus),
        ],
        cwd=HERE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _summary(target: str, output: str, code: int) -> str:
    done = re.findall(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", output)
    runs = re.search(r"stat::number_of_executed_units: (\d+)", output)
    speed = re.search(r"stat::average_exec_per_sec:\s+(\d+)", output)
    cov = f"cov {done[-1][1]} ft {done[-1][2]} corpus {done[-1][3]}" if done else "no coverage line"
    return (
        f"{target}: exit {code}, {runs.group(1) if runs else '?'} executions"
        f" ({speed.group(1) if speed else '?'}/s), {cov}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=1, help="targets run at the same time")
    parser.add_argument("targets", nargs="*", default=list(TARGETS))
    options = parser.parse_args()
    failed = False
    queue = list(options.targets)
    while queue:
        batch, queue = queue[: options.jobs], queue[options.jobs :]
        running = [(target, _start(target, options.seconds)) for target in batch]
        for target, process in running:
            output, _ = process.communicate()
            (HERE / "corpus" / f"{target}.log").write_text(output)
            print(_summary(target, output, process.returncode), flush=True)
            if process.returncode != 0:
                failed = True
                print(output[-4000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

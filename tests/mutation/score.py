"""Print the mutation score per module from mutmut's results in mutants/.

Mutants judged equivalent (no test can tell them from the original) are
listed in tests/mutation/equivalent.txt, one name per line followed by the
reason; they are counted apart so the score says what the tests miss.
Exit status 1 when a listed module has a survivor not judged equivalent.

Usage: python tests/mutation/score.py [socksident/socks4.py ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[2]
EQUIVALENT_FILE = Path(__file__).with_name("equivalent.txt")
KILLED = {1, 3, 36, 37, -24, 24, 152, 255}  # killed, timeout, type check
SURVIVED = {0}


def equivalents() -> dict[str, str]:
    """Mutant name -> reason it is equivalent."""
    found: dict[str, str] = {}
    for line in EQUIVALENT_FILE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        if not reason.strip():
            raise SystemExit(f"{EQUIVALENT_FILE.name}: {name} has no reason")
        found[name] = reason.strip()
    return found


def module_of(path: str) -> Path:
    """socksident/socks4.py (or socksident.socks4) -> its results file."""
    if not path.endswith(".py"):
        path = path.replace(".", "/") + ".py"
    return ROOT / "mutants" / (path + ".meta")


def main(argv: list[str]) -> int:
    modules = argv or sorted(
        str(p.relative_to(ROOT / "mutants"))[: -len(".meta")]
        for p in (ROOT / "mutants" / "socksident").rglob("*.py.meta")
    )
    equivalent = equivalents()
    failed = False
    print(f"{'module':28} {'mutants':>7} {'killed':>6} {'equiv':>5} {'survived':>8} "
          f"{'other':>5} {'score':>6}")
    for module in modules:
        meta = module_of(module)
        if not meta.exists():
            print(f"{module:28} no results: run `make mutate MUTATE={module}` first")
            failed = True
            continue
        codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
        killed = sum(1 for c in codes.values() if c in KILLED)
        equiv = [n for n, c in codes.items() if c in SURVIVED and n in equivalent]
        survivors = sorted(n for n, c in codes.items() if c in SURVIVED and n not in equivalent)
        other = len(codes) - killed - len(equiv) - len(survivors)  # no tests, not run
        judged = len(codes) - len(equiv)
        score = 100.0 * killed / judged if judged else 100.0
        print(f"{module:28} {len(codes):>7} {killed:>6} {len(equiv):>5} {len(survivors):>8} "
              f"{other:>5} {score:>5.1f}%")
        for name in survivors:
            print(f"    survived: {name}")
        failed = failed or bool(survivors)
    stale = sorted(set(equivalent) - {
        n for p in (ROOT / "mutants").rglob("*.py.meta")
        for n in json.loads(p.read_text())["exit_code_by_key"]})
    for name in stale:
        print(f"    listed as equivalent but not generated (stale?): {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Fixtures shared by the in-memory and the integration tests, and the suite's own rules.

The rules, checked over what pytest collects (each offending test fails with the reason):

- a test is a function named ``test_*`` defined in the ``test_*.py`` module it is collected
  from (a helper imported into a test module, or named like ``tester``, is no test);
- a test can fail: its body, or a function of its module or of a conftest.py that it calls
  (transitively), holds an ``assert``, a ``raise`` or a ``pytest.raises``/``fail``/``warns``;
- every skip is strict-aware: no ``skip``/``skipif``/``xfail`` marker, and no ``pytest.skip``,
  ``pytest.importorskip`` or ``pytest.xfail`` call anywhere in a test module or conftest.py
  except inside `skip_unless_strict` (tests/integration/conftest.py), which fails instead of
  skipping under SOCKSIDENT_STRICT_TESTS=1.
"""

import ast
import gc
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional, Union

import pytest
from twisted.logger import LogEvent, globalLogPublisher

TESTS = Path(__file__).resolve().parent
#: The only function allowed to skip: it fails under SOCKSIDENT_STRICT_TESTS=1.
STRICT_SKIP_HELPER = "skip_unless_strict"
#: Calls that make a test fail, besides ``assert`` and ``raise``.
FAILING_CALLS = frozenset({"raises", "fail", "warns", "deprecated_call"})
#: Calls and markers that skip without regard to SOCKSIDENT_STRICT_TESTS.
SKIPPING_CALLS = frozenset({"skip", "importorskip", "xfail"})
SKIPPING_MARKERS = ("skip", "skipif", "xfail")

_Function = Union[ast.FunctionDef, ast.AsyncFunctionDef]


def _called_name(call: ast.Call) -> Optional[str]:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def functions_that_can_fail(*sources: str) -> set[str]:
    """Names of the functions in `sources` that assert, raise, or call one that does."""
    functions: dict[str, list[_Function]] = {}
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.setdefault(node.name, []).append(node)
    can_fail: set[str] = set()
    for name, nodes in functions.items():
        for node in ast.walk(ast.Module(body=list(nodes), type_ignores=[])):
            if isinstance(node, (ast.Assert, ast.Raise)) or (
                isinstance(node, ast.Call) and _called_name(node) in FAILING_CALLS
            ):
                can_fail.add(name)
                break
    grown = True
    while grown:
        grown = False
        for name, nodes in functions.items():
            if name in can_fail:
                continue
            calls = {
                _called_name(node)
                for node in ast.walk(ast.Module(body=list(nodes), type_ignores=[]))
                if isinstance(node, ast.Call)
            }
            if calls & can_fail:
                can_fail.add(name)
                grown = True
    return can_fail


def unstrict_skips(source: str) -> list[int]:
    """Line numbers of skip calls and markers outside `skip_unless_strict`."""
    tree = ast.parse(source)
    allowed: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == STRICT_SKIP_HELPER:
            allowed |= {id(inner) for inner in ast.walk(node)}
    lines = []
    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        if isinstance(node, ast.Call) and _called_name(node) in SKIPPING_CALLS:
            lines.append(node.lineno)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in SKIPPING_MARKERS + ("SkipTest",)
            and isinstance(node.value, (ast.Attribute, ast.Name))
            and (getattr(node.value, "attr", None) == "mark" or getattr(node.value, "id", None) == "unittest")
        ):
            lines.append(node.lineno)
    return sorted(set(lines))


@lru_cache(maxsize=None)
def _source(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _conftests(path: Path) -> list[Path]:
    return [d / "conftest.py" for d in (path.parent, *path.parents)
            if (d / "conftest.py").exists() and TESTS in (d, *d.parents)]


@lru_cache(maxsize=None)
def _module_problems(path: Path) -> tuple[frozenset[str], tuple[str, ...]]:
    """(the functions that can fail, the unstrict skips) of one test module."""
    sources = [_source(path)] + [_source(c) for c in _conftests(path)]
    problems = []
    for checked in [path] + _conftests(path):
        for line in unstrict_skips(_source(checked)):
            problems.append(
                f"{checked.relative_to(TESTS)}:{line} skips without {STRICT_SKIP_HELPER}()"
            )
    return frozenset(functions_that_can_fail(*sources)), tuple(problems)


def collection_problems(item: pytest.Item) -> list[str]:
    """Why `item` is not a test under the rules above (empty if it is one)."""
    if not isinstance(item, pytest.Function):
        return [f"{item.nodeid} is not a plain pytest test function"]
    path = Path(str(item.path)).resolve()
    problems = []
    name = item.originalname
    if not name.startswith("test_") or not path.name.startswith("test_"):
        problems.append(f"{item.nodeid}: a test is a test_* function in a test_*.py module")
    function = getattr(item.obj, "__wrapped__", item.obj)
    if getattr(function, "__module__", None) != item.module.__name__:
        problems.append(f"{item.nodeid}: {name} is imported from {function.__module__}, not a test here")
    can_fail, skips = _module_problems(path)
    if name not in can_fail:
        problems.append(f"{item.nodeid}: {name} asserts nothing and calls nothing that does")
    for marker in SKIPPING_MARKERS:
        if item.get_closest_marker(marker) is not None:
            problems.append(f"{item.nodeid}: a @pytest.mark.{marker} ignores SOCKSIDENT_STRICT_TESTS")
    return problems + list(skips)


_PROBLEMS = pytest.StashKey[list[str]]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.stash[_PROBLEMS] = collection_problems(item)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail an item that breaks the suite's rules, before any marker can skip it."""
    problems = item.stash.get(_PROBLEMS, [])
    if problems:
        pytest.fail("not a sound test:\n" + "\n".join(problems), pytrace=False)


#: mutmut's stats run (`make mutate`) calls ContextVar.set on every call into socksident;
#: a garbage collection that starts inside one of those sets and runs a finaliser
#: calling back into socksident frees the context's HAMT while the set still walks it
#: (CPython gh-148891, a segfault in Python 3.10 and 3.11).  In that run only, the
#: collector runs between tests instead of whenever an allocation triggers it.
_MUTMUT_STATS = os.environ.get("MUTANT_UNDER_TEST") == "stats"


def pytest_configure(config: pytest.Config) -> None:
    if _MUTMUT_STATS:
        gc.disable()


def pytest_runtest_teardown(item: pytest.Item) -> None:
    if _MUTMUT_STATS:
        gc.collect()


@pytest.fixture
def access_events() -> Iterator[list[LogEvent]]:
    """The access-log events (namespace socksident.access) emitted during a test."""
    events: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "socksident.access":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)

"""The suite's own rules (tests/conftest.py): what counts as a test, and strict skips."""

from __future__ import annotations

import textwrap

from conftest import functions_that_can_fail, unstrict_skips


def src(text: str) -> str:
    return textwrap.dedent(text)


def test_a_helper_that_asserts_nothing_cannot_fail() -> None:
    source = src("""
        def tester(*args):
            return run(args)
        def check(x):
            assert x
        def test_calls_check():
            check(1)
        def test_calls_tester():
            tester()
        def test_raises():
            with pytest.raises(ValueError):
                int("x")
        async def test_raise():
            raise AssertionError
    """)
    assert functions_that_can_fail(source) == {"check", "test_calls_check", "test_raises", "test_raise"}


def test_a_conftest_helper_counts_for_the_module_that_calls_it() -> None:
    module = "def test_reads():\n    recv_exactly(sock, 3)\n"
    conftest = "def recv_exactly(sock, n):\n    raise AssertionError('EOF')\n"
    assert "test_reads" not in functions_that_can_fail(module)
    assert "test_reads" in functions_that_can_fail(module, conftest)


def test_only_the_strict_helper_may_skip() -> None:
    source = src("""
        def skip_unless_strict(reason):
            if os.environ.get("SOCKSIDENT_STRICT_TESTS"):
                pytest.fail(reason)
            pytest.skip(reason)
        def test_a():
            skip_unless_strict("no tool")
        def test_b():
            pytest.skip("no IPv6")
        def test_c():
            pytest.importorskip("OpenSSL")
        @pytest.mark.skipif(True, reason="x")
        def test_d():
            assert 1
        @pytest.mark.xfail
        def test_e():
            assert 0
    """)
    assert unstrict_skips(source) == [9, 11, 12, 15]

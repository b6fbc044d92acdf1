"""The slow mark follows the fixtures marked with ``starts_processes``: a test that uses one, directly or
through another fixture, is slow; a test that does not is not."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


def test_a_test_using_a_process_fixture_is_marked_slow(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest
        from tests.conftest import pytest_collection_modifyitems  # noqa: F401  (the hook under test)
        from tests.helpers import starts_processes

        @pytest.fixture(scope="session")
        @starts_processes
        def server():
            yield "running"

        @pytest.fixture()
        def client(server):
            return server
        """
    )
    pytester.makepyfile(
        """
        def test_direct(server): pass
        def test_through_another_fixture(client): pass
        def test_in_process(tmp_path): pass
        """
    )
    fast = pytester.runpytest("-m", "not slow", "-p", "no:cacheprovider")
    fast.assert_outcomes(passed=1, deselected=2)
    slow = pytester.runpytest("-m", "slow", "-p", "no:cacheprovider", "-v")
    slow.assert_outcomes(passed=2, deselected=1)
    slow.stdout.fnmatch_lines(["*test_direct PASSED*", "*test_through_another_fixture PASSED*"])

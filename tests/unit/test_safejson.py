"""JSON from outside the node: nesting is measured without recursion and bounded, so a hostile
document is an error, never a crash of the whole process."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from daisee_node import safejson


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ("[]", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('["[[[[", "}}}", "\\"[[["]', 1),  # brackets and escaped quotes inside strings
        ("[[],[[]],[]]", 3),
    ],
)
def test_nesting_counts_only_structure(text: str, depth: int) -> None:
    assert safejson.nesting(text) == depth
    assert safejson.nesting(text.encode()) == depth


def test_deep_documents_are_refused_and_shallow_ones_parse() -> None:
    assert safejson.loads('{"v": [1.5]}') == {"v": [1.5]}
    with pytest.raises(ValueError, match="nested 65 levels"):
        safejson.loads("[" * 65 + "]" * 65)


def test_a_hostile_document_cannot_crash_a_node_that_loaded_the_chain_libraries() -> None:
    """With py-evm's libraries imported (they raise the recursion limit to 100,000), the plain
    parser overflows the C stack on 500,000 levels; ours refuses the document."""
    script = textwrap.dedent(
        """
        import sys
        import py_ecc  # noqa: F401  (raises sys.getrecursionlimit() as the chain code does)
        from daisee_node import safejson
        assert sys.getrecursionlimit() >= 100_000
        try:
            safejson.loads("[" * 500_000 + "]" * 500_000)
        except ValueError as exc:
            print("refused:", exc)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: JSON nested 500000 levels" in result.stdout

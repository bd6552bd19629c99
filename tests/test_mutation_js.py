"""The explorer's JavaScript mutator (scripts/mutation_js.py): what it mutates, and what it
leaves alone (comments, template literals, regular expressions, arrows)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from mutation_js import APP, mutants  # noqa: E402


def test_it_mutates_operators_literals_and_negations_only_in_code():
    code = ('const a = 1; // x === y && z\n'
            '/* a && b */ const s = "p<q", e = \'\';\n'
            'const t = `x ${a + 1}`; const r = /^#\\/c\\/(\\d+)/g;\n'
            'if (a === 2.5 && !b) c = d / 2 * e; f((x) => x >= 0, i++, true);\n')
    got = [(m.line, m.original, m.mutation) for m in mutants(code)]
    assert got == [
        (1, "1", "2"),
        (2, '"p<q"', '"XXp<qXX"'), (2, "''", "'XXXX'"),
        (4, "===", "!=="), (4, "2.5", "0"), (4, "&&", "||"), (4, "!", ""), (4, "/", "*"),
        (4, "2", "3"), (4, "*", "/"), (4, ">=", ">"), (4, "0", "1"), (4, "++", "--"),
        (4, "true", "false")]


def test_each_mutant_changes_its_own_text_and_nothing_else():
    text = APP.read_text()
    all_mutants = mutants(text)
    assert len({m.name for m in all_mutants}) == len(all_mutants) > 300
    for m in all_mutants[::25]:
        mutated = m.apply(text)
        assert mutated[:m.start] == text[:m.start]
        assert mutated[m.start + len(m.mutation):] == text[m.start + len(m.original):]
        assert text.splitlines()[m.line - 1][m.col - 1:].startswith(m.original)

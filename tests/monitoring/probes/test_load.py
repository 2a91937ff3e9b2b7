"""Reading probe sets and text samples: the bundled set, malformed files, the default text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from editing.perplexity import LINE_CHARS
from monitoring.errors import AuditError, ProbeSetError
from monitoring.probes.load import (
    TEXT_BUDGET_CHARS,
    Probe,
    bundled_probe_path,
    load_probe_set,
    load_text_sample,
)


def test_bundled_probe_set_loads() -> None:
    probes = load_probe_set(None)
    assert 250 <= len(probes) <= 350
    assert len({p.prompt for p in probes}) == len(probes)
    assert all(p.prompt.strip() and p.answer.strip() for p in probes)
    assert load_probe_set(bundled_probe_path()) == probes


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 3: not valid JSON"),
        ('["a", "b"]', "line 3: expected an object"),
        ('{"prompt": "Q"}', "line 3: expected an object with exactly"),
        ('{"prompt": "Q", "answer": "A", "x": 1}', "line 3: expected an object with exactly"),
        ('{"prompt": "Q", "answer": "  "}', "line 3: prompt and answer must be non-empty"),
        ('{"prompt": "P", "answer": "B"}', "line 3: prompt already given on line 1"),
    ],
)
def test_malformed_probe_files_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "probes.jsonl"
    path.write_text('{"prompt": "P", "answer": "A"}\n\n' + line + "\n")
    with pytest.raises(ProbeSetError, match=re.escape(message)):
        load_probe_set(path)


def test_missing_or_empty_probe_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ProbeSetError, match="does not exist"):
        load_probe_set(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ProbeSetError, match="holds no probes"):
        load_probe_set(tmp_path / "empty.jsonl")


def test_text_sample_defaults_to_probe_statements_and_skips_one_word_lines(
    tmp_path: Path,
) -> None:
    probes = [Probe("The capital of France is", "Paris")]
    assert load_text_sample(None, probes) == ["The capital of France is Paris"]
    path = tmp_path / "text.txt"
    path.write_text("\n  Hello   world  \nsingle\n" + ("x " * 400 + "\n") * 100)
    lines = load_text_sample(path, probes)
    assert lines[0] == "Hello world"
    assert all(len(line) <= LINE_CHARS for line in lines)
    assert TEXT_BUDGET_CHARS <= sum(map(len, lines)) < TEXT_BUDGET_CHARS + LINE_CHARS
    (tmp_path / "words.txt").write_text("one\ntwo\n")
    with pytest.raises(AuditError, match="no line of two or more words"):
        load_text_sample(tmp_path / "words.txt", probes)

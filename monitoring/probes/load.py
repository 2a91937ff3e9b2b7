"""What an audit measures the model on: the locality probe set and the perplexity text sample.

Both are fixed inputs: the baseline (``monitoring.baseline``) is computed on them once and keyed
by their hashes, so an audit compares like with like. The bundled probe set next to this module
was selected by ``monitoring.probes.build`` (see the README here); ``audit.probe_set`` and
``audit.text_sample`` in the daemon settings replace it and the default text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from editing.perplexity import read_text_lines
from monitoring.errors import AuditError, ProbeSetError
from monitoring.files import sha256_json

BUNDLED_PROBE_FILE = "counterfact-smollm2.jsonl"
TEXT_BUDGET_CHARS = 4000
"""The text sample is small by design (about 1,000 tokens): its first lines, each cut at a space
(``editing.perplexity``), until ``TEXT_BUDGET_CHARS`` characters. Base and current perplexity are
measured on the same tokens, so the drift needs no more, and every audit pays for each token."""


@dataclass(frozen=True)
class Probe:
    """An unrelated prompt whose greedy answer must stay the base model's."""

    prompt: str
    answer: str


def bundled_probe_path() -> Path:
    """The probe set shipped in the package (see ``monitoring/probes/README.md``)."""
    return Path(str(resources.files("monitoring.probes").joinpath(BUNDLED_PROBE_FILE)))


def load_probe_set(path: Path | None) -> list[Probe]:
    """Read probes from JSONL, one ``{"prompt": ..., "answer": ...}`` object per line.

    Args:
        path: the file; None reads the bundled CounterFact set.

    Raises:
        ProbeSetError: the file is missing or empty, or a line is not such an object (the
            message names the line), or a prompt occurs twice.
    """
    path = path if path is not None else bundled_probe_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProbeSetError(
            f"probe set {path} does not exist; set audit.probe_set to a JSONL file of "
            f'{{"prompt", "answer"}} objects, or to null for the bundled set'
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProbeSetError(f"cannot read probe set {path}: {exc}") from None
    probes: list[Probe] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProbeSetError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or set(record) != {"prompt", "answer"}:
            raise ProbeSetError(
                f'{where}: expected an object with exactly the keys "prompt" and "answer"'
            )
        prompt, answer = record["prompt"], record["answer"]
        if not (isinstance(prompt, str) and prompt.strip()) or not (
            isinstance(answer, str) and answer.strip()
        ):
            raise ProbeSetError(f"{where}: prompt and answer must be non-empty strings")
        if prompt in seen:
            raise ProbeSetError(f"{where}: prompt already given on line {seen[prompt]}")
        seen[prompt] = number
        probes.append(Probe(prompt, answer))
    if not probes:
        raise ProbeSetError(f"probe set {path} holds no probes")
    return probes


def load_text_sample(path: Path | None, probes: Sequence[Probe]) -> list[str]:
    """The perplexity text: the file's first lines, or the probes as statements.

    Whitespace is collapsed, one-word lines are skipped (the first word of a line is context,
    the rest is predicted), and reading stops at ``TEXT_BUDGET_CHARS`` characters.

    Args:
        path: a plain-text file; None uses ``"<prompt> <answer>"`` of the first probes, text
            the base model is known to continue correctly.
        probes: the probe set in use.
    """
    if path is None:
        raw = [f"{p.prompt} {p.answer}" for p in probes]
    else:
        try:
            raw = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise AuditError(f"cannot read the audit text sample {path}: {exc}") from None
    lines = read_text_lines(raw, TEXT_BUDGET_CHARS)
    if not lines:
        raise AuditError(f"the audit text sample {path} has no line of two or more words")
    return lines


def probe_set_hash(probes: Sequence[Probe]) -> str:
    """Names the probe set a baseline was computed on."""
    return sha256_json([[p.prompt, p.answer] for p in probes])


def text_sample_hash(lines: Sequence[str]) -> str:
    """Names the text sample a baseline was computed on."""
    return sha256_json(list(lines))


__all__ = [
    "BUNDLED_PROBE_FILE",
    "TEXT_BUDGET_CHARS",
    "Probe",
    "bundled_probe_path",
    "load_probe_set",
    "load_text_sample",
    "probe_set_hash",
    "text_sample_hash",
]

"""``factkeeper report``: one self-contained page on how the model's edits are holding up.

Metrics and the Grafana dashboard answer "what is happening now"; this page answers "how did we
get here" for people who would rather look than query: the versions in the registry, every
audit's figures as a table and as curves against the number of edits, and the journal's counts.
It is a single HTML file with no external assets (charts are PNG data URIs, the CSS is inline,
every value is HTML-escaped) so it can be mailed, attached to a ticket or served as a static
file, plus optionally the same headline and charts as one PNG for the README. The inputs are
plain values (registry versions, audit report dicts, journal counts), gathered by the CLI, so
the page can be rendered and tested without MLflow, Kafka or a model.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from daemon.records.journal import STATUSES
from daemon.versions.registry import CANDIDATE, PRODUCTION, VersionInfo, audit_label
from editing.errors import FactkeeperError
from monitoring.audit_report import REPORT_SCHEMA
from monitoring.report_plots import (
    FAIL_COLOR,
    PASS_COLOR,
    UNKNOWN_COLOR,
    AuditSeries,
    chart_png,
    locality_figure,
    retention_figure,
    write_summary_png,
)

log = logging.getLogger(__name__)

AUDIT_GLOB = "audit-*.json"
MAX_TABLE_ROWS = 40
"""Rows per table; older rows are summarised in one line so the page stays one page."""
DASH = "–"
SUMMARY_LINE_CHARS = 130
"""Headline line length in the PNG, which is 13 inches wide at 10 pt."""


class ReportError(FactkeeperError):
    """The report could not be written: a bad argument or an unwritable output path."""


class AuditFormatError(ReportError):
    """An audit report is not a ``factkeeper-audit/v1`` object that can be placed in time."""


@dataclass(frozen=True)
class ReportFiles:
    """What ``write_html_report`` wrote."""

    html: Path
    png: Path | None
    audits: int
    """Audits on the page (after skipping malformed ones)."""
    warnings: tuple[str, ...]
    """Skipped audit files and other problems, as listed on the page."""


class AuditHistory(list[dict[str, Any]]):
    """``load_audits``' result: the audit dicts, oldest first, and the files it skipped.

    It is a plain list so it goes straight into ``write_html_report(audits=...)``, which lists
    ``skipped`` among the page's warnings; the folder lets the page say where it looked.
    """

    def __init__(
        self,
        audits: Iterable[dict[str, Any]] = (),
        *,
        folder: Path | None = None,
        skipped: Iterable[str] = (),
    ) -> None:
        super().__init__(audits)
        self.folder = folder
        self.skipped: tuple[str, ...] = tuple(skipped)


@dataclass(frozen=True)
class AuditPoint:
    """The figures of one audit report the page shows; ``None`` where the report had none.

    Built by ``parse_audit``, which is strict only about what placing the audit needs (the
    schema and ``started_at``) and tolerant about the rest, so one missing figure blanks a cell
    instead of hiding the whole audit.
    """

    started_at: datetime
    version: str | None = None
    previous_good_version: str | None = None
    trigger: str | None = None
    seconds: float | None = None
    edits_total: int | None = None
    edits_audited: int | None = None
    sampled: bool = False
    retention: float | None = None
    token_accuracy: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    generalisation: float | None = None
    generalisation_n: int | None = None
    locality: float | None = None
    locality_gold: float | None = None
    locality_n: int | None = None
    perplexity_base: float | None = None
    perplexity_current: float | None = None
    drift: float | None = None
    passed: bool | None = None
    reasons: tuple[str, ...] = ()
    thresholds: Mapping[str, float] | None = None
    action: str | None = None
    rolled_back_to: str | None = None
    quarantined: int = 0
    failing: int = 0


# -- reading audits -------------------------------------------------------------------------------


def load_audits(folder: Path) -> AuditHistory:
    """Every ``audit-*.json`` in ``folder``, oldest first by ``started_at``.

    A file that cannot be read, is not JSON, or is not a ``factkeeper-audit/v1`` object with a
    valid ``started_at`` is skipped and named in ``AuditHistory.skipped`` (one bad file must not
    hide the rest of the history). A missing folder means no audit has run yet: empty history.

    Raises:
        ReportError: ``folder`` exists but is not a folder.
    """
    folder = Path(folder)
    if not folder.exists():
        return AuditHistory(folder=folder)
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder; pass the folder holding audit-*.json")
    found: list[tuple[datetime, str, dict[str, Any]]] = []
    skipped: list[str] = []
    for path in sorted(folder.glob(AUDIT_GLOB)):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            point = parse_audit(raw)
        except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
            skipped.append(f"{path.name}: not readable JSON ({exc})")
        except AuditFormatError as exc:
            skipped.append(f"{path.name}: {exc}")
        else:
            found.append((point.started_at, path.name, raw))
    for warning in skipped:
        log.warning("audit report skipped: %s", warning)
    found.sort(key=lambda item: (item[0], item[1]))
    return AuditHistory((raw for _, _, raw in found), folder=folder, skipped=skipped)


def parse_audit(raw: Any) -> AuditPoint:
    """The figures of one audit report dict.

    Raises:
        AuditFormatError: not an object, another schema, or no ISO-8601 ``started_at``.
    """
    if not isinstance(raw, Mapping):
        raise AuditFormatError(f"is a JSON {type(raw).__name__}, not an object")
    if raw.get("schema") != REPORT_SCHEMA:
        raise AuditFormatError(f"schema is {raw.get('schema')!r}, expected {REPORT_SCHEMA!r}")
    started = raw.get("started_at")
    try:
        started_at = datetime.fromisoformat(started) if isinstance(started, str) else None
    except ValueError:
        started_at = None
    if started_at is None:
        raise AuditFormatError(f"started_at {started!r} is not an ISO-8601 time")
    if started_at.tzinfo is None:  # the daemon writes UTC; a naive stamp is read as UTC
        started_at = started_at.replace(tzinfo=UTC)
    retention = _section(raw, "retention")
    ci = retention.get("ci95")
    ci_low, ci_high = (
        (_number(ci[0]), _number(ci[1])) if isinstance(ci, list) and len(ci) == 2 else (None, None)
    )
    generalisation = _section(raw, "generalisation")
    locality = _section(raw, "locality")
    perplexity = _section(raw, "perplexity")
    gate = _section(raw, "gate")
    thresholds = {
        str(key): number
        for key, value in _section(gate, "thresholds").items()
        if (number := _number(value)) is not None
    }
    return AuditPoint(
        started_at=started_at,
        version=_text(raw.get("version")),
        previous_good_version=_text(raw.get("previous_good_version")),
        trigger=_text(raw.get("trigger")),
        seconds=_number(raw.get("seconds")),
        edits_total=_count(raw.get("edits_total")),
        edits_audited=_count(raw.get("edits_audited")),
        sampled=raw.get("sampled") is True,
        retention=_number(retention.get("exact_match")),
        token_accuracy=_number(retention.get("token_accuracy")),
        ci_low=ci_low,
        ci_high=ci_high,
        generalisation=_number(generalisation.get("exact_match")),
        generalisation_n=_count(generalisation.get("n")),
        locality=_number(locality.get("agreement")),
        locality_gold=_number(locality.get("gold_accuracy")),
        locality_n=_count(locality.get("n")),
        perplexity_base=_number(perplexity.get("base")),
        perplexity_current=_number(perplexity.get("current")),
        drift=_number(perplexity.get("drift")),
        passed=gate.get("passed") if isinstance(gate.get("passed"), bool) else None,
        reasons=tuple(str(r) for r in _items(gate.get("reasons"))),
        thresholds=thresholds,
        action=_text(raw.get("action")),
        rolled_back_to=_text(raw.get("rolled_back_to")),
        quarantined=len(_items(raw.get("quarantined_event_ids"))),
        failing=len(_items(raw.get("failing_event_ids"))),
    )


def audit_series(points: Sequence[AuditPoint]) -> AuditSeries:
    """What the charts draw: audits with an edit count, by edits then time; latest thresholds.

    Args:
        points: audits in any order.
    """
    placed = sorted(
        (p for p in points if p.edits_total is not None),
        key=lambda p: (p.edits_total, p.started_at),
    )
    latest = max(points, key=lambda p: p.started_at, default=None)
    thresholds = (latest.thresholds if latest else None) or {}
    return AuditSeries(
        edits=tuple(p.edits_total for p in placed if p.edits_total is not None),
        retention=tuple(p.retention for p in placed),
        token_accuracy=tuple(p.token_accuracy for p in placed),
        ci_low=tuple(p.ci_low for p in placed),
        ci_high=tuple(p.ci_high for p in placed),
        locality=tuple(p.locality for p in placed),
        drift=tuple(p.drift for p in placed),
        failed=tuple(p.passed is False for p in placed),
        retention_floor=thresholds.get("retention_floor"),
        locality_floor=thresholds.get("locality_floor"),
        max_drift=thresholds.get("max_perplexity_drift"),
    )


# -- the page -------------------------------------------------------------------------------------


def write_html_report(
    output: Path,
    *,
    versions: Sequence[VersionInfo],
    audits: Sequence[Mapping[str, Any]],
    journal_counts: Mapping[str, int],
    model_name: str,
    generated_at: datetime | None = None,
    png: Path | None = None,
    warnings: Sequence[str] = (),
) -> ReportFiles:
    """Write the one-page HTML report, and optionally its headline and charts as one PNG.

    Args:
        output: the HTML file to write (parent folders are created; replaced atomically).
        versions: the registered model's versions, in any order (``ModelRegistry.versions()``).
        audits: audit report dicts (``load_audits(folder)``, whose skipped files become
            warnings); any that ``parse_audit`` rejects are skipped and listed as warnings.
        journal_counts: rows per journal status (``Journal.counts_by_status()``); empty when
            there is no journal yet.
        model_name: the registered model's name, shown as the title.
        generated_at: the time printed on the page (default: now); must be timezone-aware.
        png: where to write the PNG (``None``: no PNG).
        warnings: further problems to list on the page, e.g. an unreachable registry.

    Raises:
        ReportError: ``generated_at`` is naive, or a file could not be written.
    """
    moment = generated_at or datetime.now(UTC)
    if moment.tzinfo is None:
        raise ReportError("generated_at must be timezone-aware, e.g. datetime.now(UTC)")
    notes = list(audits.skipped) if isinstance(audits, AuditHistory) else []
    points: list[AuditPoint] = []
    for number, raw in enumerate(audits, start=1):
        try:
            points.append(parse_audit(raw))
        except AuditFormatError as exc:
            notes.append(f"audit #{number}: {exc}")
    points.sort(key=lambda p: p.started_at)
    notes.extend(str(w) for w in warnings)
    page = _Page(
        model_name=model_name,
        versions=tuple(sorted(versions, key=_version_key, reverse=True)),
        points=tuple(points),
        journal_counts=dict(journal_counts),
        generated_at=moment,
        warnings=tuple(notes),
        audit_folder=audits.folder if isinstance(audits, AuditHistory) else None,
    )
    series = audit_series(page.points)
    charts: dict[str, bytes] = {}
    if len(series):
        charts["retention"] = chart_png(retention_figure(series))
        charts["locality"] = chart_png(locality_figure(series))
    _write_atomically(Path(output), _render_html(page, series, charts))
    png_path = None
    if png is not None:
        title, lines, passed = _summary_text(page)
        try:
            png_path = write_summary_png(Path(png), series, title, lines, passed)
        except OSError as exc:
            raise ReportError(f"cannot write the PNG {png}: {exc}") from exc
    log.info("report written", extra={"path": str(output), "audits": len(points)})
    return ReportFiles(Path(output), png_path, len(points), page.warnings)


@dataclass(frozen=True)
class _Page:
    """Everything the page shows, sorted: versions newest first, audits oldest first."""

    model_name: str
    versions: tuple[VersionInfo, ...]
    points: tuple[AuditPoint, ...]
    journal_counts: Mapping[str, int]
    generated_at: datetime
    warnings: tuple[str, ...]
    audit_folder: Path | None

    @property
    def latest(self) -> AuditPoint | None:
        return self.points[-1] if self.points else None

    def alias(self, name: str) -> str | None:
        return next((v.version for v in self.versions if name in v.aliases), None)


def _summary_text(page: _Page) -> tuple[str, list[str], bool | None]:
    """The PNG's title, headline lines and gate outcome (the HTML header in plain text)."""
    title = " · ".join([page.model_name, *_alias_phrases(page)])
    latest = page.latest
    lines: list[str] = []
    if latest is None:
        lines.append("No audits yet.")
    else:
        lines.append(f"Latest audit, {_when(latest.started_at)}, {_audit_subject(latest)}")
        figures = [f"{label} {value}" for label, value in headline_figures(latest)]
        lines.extend(_pack(figures, SUMMARY_LINE_CHARS))
        if latest.reasons:
            reasons = "Gate: " + "; ".join(latest.reasons)
            lines.extend(textwrap.wrap(reasons, SUMMARY_LINE_CHARS))
    lines.append(f"{len(page.versions)} registered versions · generated {_when(page.generated_at)}")
    return title, lines, latest.passed if latest else None


def headline_figures(point: AuditPoint) -> list[tuple[str, str]]:
    """(label, value) pairs of an audit's main figures, shared by the page and the PNG."""
    ci = f" (CI {_ci(point)})" if point.ci_low is not None and point.ci_high is not None else ""
    generalisation = _pct(point.generalisation)
    if point.generalisation_n is not None:
        generalisation += f" of {point.generalisation_n} rephrases"
    locality = _pct(point.locality)
    if point.locality_n is not None:
        locality += f" of {point.locality_n} probes"
    perplexity = f"{_num(point.perplexity_base)} → {_num(point.perplexity_current)}"
    if point.drift is not None:
        perplexity += f" ({_signed_pct(point.drift)})"
    return [
        ("retention", _pct(point.retention) + ci),
        ("token accuracy", _pct(point.token_accuracy)),
        ("generalisation", generalisation),
        ("locality", locality),
        ("gold accuracy", _pct(point.locality_gold)),
        ("perplexity", perplexity),
        ("edits audited", _edits(point)),
    ]


def _render_html(page: _Page, series: AuditSeries, charts: Mapping[str, bytes]) -> str:
    """The whole page as one HTML string; every value passes through ``_e``."""
    parts = [
        _header(page),
        _warnings(page),
        _latest(page),
        _charts(page, series, charts),
        _versions(page),
        _audits(page),
        _journal(page),
    ]
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>factkeeper report: {_e(page.model_name)}</title>"
        f"<style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(p for p in parts if p)
        + f'\n<footer class="muted">factkeeper report · {_e(_when(page.generated_at))}'
        "</footer>\n</body></html>\n"
    )


class _Html(str):
    """A fragment already built from escaped parts; ``_e`` passes it through unchanged."""


def _e(value: object) -> _Html:
    """HTML-escape anything (quotes included) unless it is already an ``_Html`` fragment."""
    return value if isinstance(value, _Html) else _Html(escape(str(value), quote=True))


def _header(page: _Page) -> str:
    if page.versions:
        meta = " · ".join([f"{len(page.versions)} registered versions", *_alias_phrases(page)])
    else:
        meta = "No versions registered yet: the daemon registers one per snapshot."
    return (
        f"<header><h1>{_e(page.model_name)}</h1>"
        f'<p class="muted">{_e(meta)} · generated {_e(_when(page.generated_at))}</p></header>'
    )


def _warnings(page: _Page) -> str:
    if not page.warnings:
        return ""
    items = "".join(f"<li>{_e(w)}</li>" for w in page.warnings)
    return (
        f'<section class="warnings"><strong>{len(page.warnings)} warning(s)</strong>'
        f"<ul>{items}</ul></section>"
    )


def _latest(page: _Page) -> str:
    latest = page.latest
    if latest is None:
        where = f" in {page.audit_folder}" if page.audit_folder else ""
        return (
            "<section><h2>Latest audit</h2>"
            f"<p>No audits yet{_e(where)}: the figures, charts and audit history appear after "
            "the first audit.</p></section>"
        )
    figures = "".join(
        f"<div><span>{_e(label)}</span>{_e(value)}</div>"
        for label, value in headline_figures(latest)
    )
    reasons = (
        "<ul>" + "".join(f"<li>{_e(r)}</li>" for r in latest.reasons) + "</ul>"
        if latest.reasons
        else ""
    )
    subject = f"{_when(latest.started_at)} · {_audit_subject(latest)}"
    return (
        f"<section><h2>Latest audit {_badge(latest.passed)}</h2>"
        f'<p class="muted">{_e(subject)}</p>'
        f'<div class="figures">{figures}</div>{reasons}</section>'
    )


def _charts(page: _Page, series: AuditSeries, charts: Mapping[str, bytes]) -> str:
    if not page.points:
        return ""
    if not charts:
        return (
            "<section><h2>Curves</h2><p>No audit reports how many edits it covered, so there "
            "is nothing to draw.</p></section>"
        )
    alts = {
        "retention": "Retention exact match with its 95% confidence band and token accuracy "
        "against edits applied; failed gates marked; retention floor dashed.",
        "locality": "Locality agreement and perplexity drift against edits applied; failed "
        "gates marked; floor and maximum drift dashed.",
    }
    images = "".join(
        f'<img alt="{_e(alts.get(name, name))}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode("ascii")}">'
        for name, data in charts.items()
    )
    left_out = len(page.points) - len(series)
    note = (
        f'<p class="muted">{left_out} audit(s) without an edit count are not drawn.</p>'
        if left_out
        else ""
    )
    return f"<section><h2>Curves</h2>{images}{note}</section>"


def _versions(page: _Page) -> str:
    if not page.versions:
        return "<section><h2>Versions</h2><p>No versions registered yet.</p></section>"
    headers = (
        "version",
        "aliases",
        "edits",
        "journal seq",
        "parent",
        "reason",
        "audit",
        "audit figures",
    )
    rows = []
    for info in page.versions[:MAX_TABLE_ROWS]:
        edits = info.tags.get("edits") or _num(info.metrics.get("edits"))
        figures = " · ".join(
            f"{key} {value:.4g}" for key, value in sorted(info.metrics.items()) if key != "edits"
        )
        rows.append(
            (
                _v(info.version),
                ", ".join(info.aliases) or DASH,
                edits or DASH,
                info.tags.get("journal_seq") or DASH,
                _v(info.tags.get("parent_version") or None),
                info.tags.get("reason") or DASH,
                audit_label(info.tags),
                figures or DASH,
                _created(info),
            )
        )
    return (
        "<section><h2>Versions</h2>"
        + _table((*headers, "created"), rows, numeric={2, 3})
        + _more(len(page.versions), "versions")
        + "</section>"
    )


def _audits(page: _Page) -> str:
    if not page.points:
        return ""
    headers = (
        "time",
        "trigger",
        "version",
        "edits",
        "retention",
        "locality",
        "drift",
        "gate",
        "action",
        "quarantined",
    )
    rows = []
    for point in reversed(page.points[-MAX_TABLE_ROWS:]):
        retention = _pct(point.retention)
        if point.ci_low is not None and point.ci_high is not None:
            retention += f" ({_ci(point)})"
        gate = _badge(point.passed)
        if point.reasons:
            gate = _Html(gate + f"<br><small>{_e('; '.join(point.reasons))}</small>")
        action = (point.action or DASH).replace("_", " ")
        if point.rolled_back_to is not None:
            action += f" → {_v(point.rolled_back_to)}"
        rows.append(
            (
                _when(point.started_at),
                point.trigger or DASH,
                _v(point.version),
                _edits(point),
                retention,
                _pct(point.locality),
                _signed_pct(point.drift),
                gate,
                action,
                str(point.quarantined),
            )
        )
    return (
        "<section><h2>Audit history</h2>"
        + _table(headers, rows, numeric={3, 4, 5, 6, 9})
        + _more(len(page.points), "audits")
        + "</section>"
    )


def _journal(page: _Page) -> str:
    if not page.journal_counts:
        return "<section><h2>Journal</h2><p>No journal yet.</p></section>"
    order = [s for s in STATUSES if s in page.journal_counts]
    order += sorted(k for k in page.journal_counts if k not in STATUSES)
    counts = [str(page.journal_counts[k]) for k in order]
    total = sum(page.journal_counts.values())
    return (
        "<section><h2>Journal</h2>"
        + _table(
            [s.replace("_", " ") for s in (*order, "total rows")],
            [(*counts, str(total))],
            numeric=set(range(len(order) + 1)),
        )
        + "</section>"
    )


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, numeric: set[int]) -> str:
    def cell(tag: str, index: int, value: str) -> str:
        css = ' class="n"' if index in numeric else ""
        return f"<{tag}{css}>{_e(value)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _more(total: int, what: str) -> str:
    if total <= MAX_TABLE_ROWS:
        return ""
    return f'<p class="muted">Showing the {MAX_TABLE_ROWS} newest of {total} {_e(what)}.</p>'


def _badge(passed: bool | None) -> _Html:
    css, text = {True: ("pass", "PASS"), False: ("fail", "FAIL")}.get(passed, ("unknown", "?"))
    return _Html(f'<span class="badge {css}">{text}</span>')


# -- formatting -----------------------------------------------------------------------------------


def _alias_phrases(page: _Page) -> list[str]:
    if not page.versions:
        return ["no versions registered yet"]
    phrases = []
    for alias in (PRODUCTION, CANDIDATE):
        version = page.alias(alias)
        phrases.append(f"{alias} not set" if version is None else f"{alias} → {_v(version)}")
    return phrases


def _pack(items: Sequence[str], width: int) -> list[str]:
    """Join items with " · " into lines of at most ``width`` characters (longer items alone)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 3 + len(item) <= width:
            lines[-1] += " · " + item
        else:
            lines.append(item)
    return lines


def _audit_subject(point: AuditPoint) -> str:
    subject = f"audit of {_v(point.version)} (trigger: {point.trigger or 'unknown'})"
    if point.seconds is not None:
        subject += f" in {point.seconds:.1f} s"
    action = {None: "no action recorded", "none": "no action"}.get(point.action, point.action)
    if point.rolled_back_to is not None:
        action += f" to {_v(point.rolled_back_to)}"
    if point.quarantined:
        action += f", {point.quarantined} edit(s) quarantined"
    return f"{subject} · {action.replace('_', ' ')}"


def _edits(point: AuditPoint) -> str:
    if point.edits_total is None:
        return DASH if point.edits_audited is None else f"{point.edits_audited} audited"
    total = str(point.edits_total)
    if point.edits_audited is None or point.edits_audited == point.edits_total:
        return total
    return f"{point.edits_audited} of {total}" + (" (sample)" if point.sampled else "")


def _created(info: VersionInfo) -> str:
    stamp = info.tags.get("created_at")
    if not stamp:
        return DASH
    try:
        return _when(datetime.fromisoformat(stamp))
    except ValueError:
        return stamp


def _v(version: str | None) -> str:
    return DASH if version is None else f"v{version}"


def _when(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _pct(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:.1f}%"


def _signed_pct(value: float | None) -> str:
    return DASH if value is None else f"{100 * value:+.1f}%"


def _ci(point: AuditPoint) -> str:
    assert point.ci_low is not None and point.ci_high is not None
    return f"{100 * point.ci_low:.1f}–{100 * point.ci_high:.1f}%"


def _num(value: float | None) -> str:
    if value is None:
        return DASH
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def _version_key(info: VersionInfo) -> tuple[int, str]:
    """MLflow versions are integers; anything else sorts below them, by text."""
    return (int(info.version), "") if info.version.isdigit() else (-1, info.version)


def _section(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key)
    return value if isinstance(value, Mapping) else {}


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _count(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number.is_integer() else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a served page is never half-written."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # the folder itself may be what is missing
            tmp.unlink(missing_ok=True)
        raise ReportError(f"cannot write the report {path}: {exc}") from exc


_CSS = (
    "body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:#222;"
    "max-width:1100px;margin:1.5em auto;padding:0 1em}"
    "h1{font-size:1.5em;margin:0}"
    "h2{font-size:1.1em;margin:1.4em 0 .5em;border-bottom:1px solid #ddd;padding-bottom:.2em}"
    ".muted{color:#666}"
    "table{border-collapse:collapse;width:100%;font-size:13px}"
    "th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:left;vertical-align:top}"
    "th{background:#f5f5f5;font-weight:600}"
    ".n{text-align:right;font-variant-numeric:tabular-nums}"
    ".badge{display:inline-block;padding:0 .5em;border-radius:3px;color:#fff;"
    "font-size:.85em;font-weight:600}"
    f".pass{{background:{PASS_COLOR}}}.fail{{background:{FAIL_COLOR}}}"
    f".unknown{{background:{UNKNOWN_COLOR}}}"
    ".figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));"
    "gap:.5em 1.5em}"
    ".figures span{display:block;color:#666;font-size:12px}"
    "img{max-width:100%;height:auto;display:block;margin:.5em 0}"
    ".warnings{background:#fff8e1;border:1px solid #e8c46a;padding:.4em 1em;margin-top:1em}"
    "footer{margin:2em 0 1em;font-size:12px}"
)

"""``factkeeper report``: the page holds the right rows and figures, escapes, and survives gaps."""

from __future__ import annotations

import base64
import copy
import json
import re
import struct
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from daemon import report
from daemon.report import (
    AuditHistory,
    ReportError,
    audit_series,
    load_audits,
    parse_audit,
    write_html_report,
)
from daemon.versions.registry import VersionInfo
from editing.errors import FactkeeperError
from monitoring.report_plots import locality_figure, retention_figure

NOW = datetime(2026, 11, 23, 18, 0, tzinfo=UTC)
COUNTS = {
    "applied": 250,
    "failed": 3,
    "invalid": 2,
    "duplicate": 1,
    "rolled_back": 4,
    "quarantined": 5,
    "reverted": 6,
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _audit(**changes: Any) -> dict[str, Any]:
    """The documented audit shape; ``changes`` replace top-level keys, dicts are merged."""
    audit: dict[str, Any] = {
        "schema": "factkeeper-audit/v1",
        "version": "3",
        "previous_good_version": "2",
        "started_at": "2026-11-23T15:00:00+00:00",
        "seconds": 12.3,
        "trigger": "edits",
        "edits_total": 250,
        "edits_audited": 250,
        "sampled": False,
        "retention": {"exact_match": 0.91, "token_accuracy": 0.95, "ci95": [0.87, 0.94]},
        "generalisation": {"exact_match": 0.4, "n": 120},
        "locality": {"agreement": 0.97, "gold_accuracy": 0.95, "n": 300},
        "perplexity": {"base": 12.1, "current": 12.4, "drift": 0.025},
        "gate": {
            "passed": True,
            "reasons": [],
            "thresholds": {
                "retention_floor": 0.8,
                "locality_floor": 0.9,
                "max_drop": 0.05,
                "max_perplexity_drift": 0.1,
            },
        },
        "action": "promoted",
        "rolled_back_to": None,
        "quarantined_event_ids": [],
        "failing_event_ids": [],
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(audit.get(key), dict):
            audit[key] = {**audit[key], **value}
        else:
            audit[key] = value
    return copy.deepcopy(audit)


def _failed_audit() -> dict[str, Any]:
    return _audit(
        version="4",
        started_at="2026-11-23T16:00:00+00:00",
        edits_total=300,
        edits_audited=200,
        sampled=True,
        retention={"exact_match": 0.62, "token_accuracy": 0.7, "ci95": [0.55, 0.69]},
        locality={"agreement": 0.88},
        perplexity={"drift": 0.15},
        gate={"passed": False, "reasons": ["retention 0.62 below floor 0.8"]},
        action="rolled_back",
        rolled_back_to="3",
        quarantined_event_ids=["e1", "e2", "e3"],
    )


def _version(version: str, aliases: tuple[str, ...] = (), **tags: str) -> VersionInfo:
    return VersionInfo(
        version=version,
        aliases=aliases,
        tags={"edits": "0", "journal_seq": "0", "parent_version": "", "reason": "", **tags},
        metrics={},
        source=f"file:///artifacts/{version}/snapshot",
    )


VERSIONS = [
    _version(
        "2",
        ("production",),
        edits="200",
        journal_seq="210",
        parent_version="1",
        audit_passed="true",
    ),
    VersionInfo(
        version="3",
        aliases=("candidate",),
        tags={"edits": "250", "journal_seq": "265", "parent_version": "2", "reason": "shutdown"},
        metrics={"edits": 250.0, "retention_exact_match": 0.91},
        source="file:///artifacts/3/snapshot",
    ),
]


class _Page(HTMLParser):
    """The page's tables as rows of cell text, and all its text."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self.text: list[str] = []
        self.tags: list[str] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1].append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def table(self, first_header: str) -> list[list[str]]:
        return next(t for t in self.tables if t and t[0][0] == first_header)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    length, chunk = struct.unpack(">I4s", data[8:16])
    assert (length, chunk) == (13, b"IHDR")
    return struct.unpack(">II", data[16:24])


def _render(tmp_path: Path, **kwargs: Any) -> tuple[report.ReportFiles, str]:
    args: dict[str, Any] = {
        "versions": VERSIONS,
        "audits": [_audit(), _failed_audit()],
        "journal_counts": COUNTS,
        "model_name": "smollm2-135m",
        "generated_at": NOW,
    }
    args.update(kwargs)
    files = write_html_report(tmp_path / "report.html", **args)
    return files, files.html.read_text(encoding="utf-8")


def test_page_lists_versions_audits_and_journal_counts(tmp_path: Path) -> None:
    files, html = _render(tmp_path)
    page = _Page(html)
    text = " ".join(page.text)

    assert "2 registered versions · production → v2 · candidate → v3" in text
    assert "generated 2026-11-23 18:00 UTC" in text
    versions = page.table("version")
    assert [row[:6] for row in versions[1:]] == [
        ["v3", "candidate", "250", "265", "v2", "shutdown"],
        ["v2", "production", "200", "210", "v1", "–"],
    ]
    # v3 never went through an audit: the page says so instead of leaving the cell empty
    assert [row[6] for row in versions[1:]] == ["never audited", "passed"]
    assert versions[1][7] == "retention_exact_match 0.91"  # the "edits" metric is not repeated

    audits = page.table("time")
    assert audits[0] == [
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
    ]
    assert audits[1] == [  # newest first
        "2026-11-23 16:00 UTC",
        "edits",
        "v4",
        "200 of 300 (sample)",
        "62.0% (55.0–69.0%)",
        "88.0%",
        "+15.0%",
        "FAIL retention 0.62 below floor 0.8",
        "rolled back → v3",
        "3",
    ]
    assert audits[2][3:9] == ["250", "91.0% (87.0–94.0%)", "97.0%", "+2.5%", "PASS", "promoted"]

    journal = page.table("applied")
    assert journal == [
        [
            "applied",
            "failed",
            "invalid",
            "duplicate",
            "rolled back",
            "quarantined",
            "reverted",
            "total rows",
        ],
        ["250", "3", "2", "1", "4", "5", "6", "271"],
    ]
    # the headline is the latest audit (by started_at, not by list order) with its gate reasons
    assert "Latest audit FAIL" in " ".join(t.strip() for t in page.text if t.strip())
    assert "retention 62.0% (CI 55.0–69.0%)" in text
    assert "perplexity 12.10 → 12.40 (+15.0%)" in text
    assert "edits audited 200 of 300 (sample)" in text
    assert files.audits == 2 and files.warnings == ()


def test_html_is_self_contained_with_charts_as_data_uris(tmp_path: Path) -> None:
    _, html = _render(tmp_path)
    sources = re.findall(r'src="([^"]*)"', html)
    assert len(sources) == 2
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        width, height = _png_size(base64.b64decode(source.split(",", 1)[1]))
        assert 600 <= width <= 1400 and 200 <= height <= 800
    assert "href=" not in html and "<script" not in html and "<link" not in html


def test_every_value_is_escaped(tmp_path: Path) -> None:
    nasty = '<script>alert("x")</script>'
    versions = [
        VersionInfo(
            version="7",
            aliases=("candidate",),
            tags={"reason": nasty, "edits": "1", "journal_seq": "1", "parent_version": ""},
            metrics={nasty: 0.5},
            source="",
        )
    ]
    audit = _audit(trigger=nasty, gate={"passed": False, "reasons": [nasty]}, version=nasty)
    _, html = _render(
        tmp_path,
        versions=versions,
        audits=[audit],
        model_name=nasty,
        journal_counts={nasty: 1},
        warnings=[nasty],
    )

    assert "<script" not in html
    assert html.count("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;") >= 7
    page = _Page(html)
    assert "script" not in page.tags
    assert page.table("version")[1][5] == nasty  # round-trips as text


def test_empty_inputs_render_in_words(tmp_path: Path) -> None:
    png = tmp_path / "readme" / "report.png"
    files, html = _render(tmp_path, versions=[], audits=[], journal_counts={}, png=png)

    text = " ".join(_Page(html).text)
    assert "No audits yet" in text
    assert "No versions registered yet" in text
    assert "No journal yet" in text
    assert "<img" not in html and "<table" not in html
    assert files.png == png and files.audits == 0
    width, height = _png_size(png.read_bytes())
    assert width >= 1000 and 50 <= height <= 400  # text only: no empty axes below it


def test_png_holds_headline_and_charts(tmp_path: Path) -> None:
    # text between two "$" would be parsed as mathtext, and an unknown command fails the render
    files, _ = _render(tmp_path, png=tmp_path / "report.png", model_name=r"gpt2 $\bogus$ edition")
    assert files.png is not None
    width, height = _png_size(files.png.read_bytes())
    assert 1200 <= width <= 2000 and 400 <= height <= 1000


def test_load_audits_orders_by_started_at_and_skips_bad_files(tmp_path: Path) -> None:
    folder = tmp_path / "audits"
    folder.mkdir()
    later = _audit(started_at="2026-11-23T17:00:00+00:00", edits_total=300)
    earlier = _audit(started_at="2026-11-23T09:00:00+00:00", edits_total=100)
    (folder / "audit-a.json").write_text(json.dumps(later))
    (folder / "audit-b.json").write_text(json.dumps(earlier))
    (folder / "audit-broken.json").write_text('{"schema": "factkeeper-audit/v1",')
    (folder / "audit-other.json").write_text(json.dumps(_audit(schema="factkeeper-audit/v2")))
    (folder / "audit-list.json").write_text("[]")
    (folder / "audit-undated.json").write_text(json.dumps(_audit(started_at="yesterday")))
    (folder / "audit-binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (folder / "audit-dir.json").mkdir()
    (folder / "notes.json").write_text("not an audit and not matched")

    history = load_audits(folder)

    assert isinstance(history, list)
    assert [a["edits_total"] for a in history] == [100, 300]
    skipped = {w.split(":", 1)[0]: w for w in history.skipped}
    assert sorted(skipped) == [
        "audit-binary.json",
        "audit-broken.json",
        "audit-dir.json",
        "audit-list.json",
        "audit-other.json",
        "audit-undated.json",
    ]
    assert "factkeeper-audit/v2" in skipped["audit-other.json"]
    assert "not readable JSON" in skipped["audit-broken.json"]

    files, html = _render(tmp_path, audits=history)
    assert files.audits == 2
    assert files.warnings == history.skipped
    assert "6 warning(s)" in html and "audit-broken.json" in html


def test_load_audits_of_a_missing_folder_is_empty(tmp_path: Path) -> None:
    history = load_audits(tmp_path / "never-audited")
    assert history == [] and history.skipped == ()
    _, html = _render(tmp_path, audits=history)
    assert "No audits yet in" in html and "never-audited" in html
    with pytest.raises(ReportError):
        load_audits(Path(__file__))


def test_malformed_audits_passed_directly_become_warnings(tmp_path: Path) -> None:
    files, html = _render(tmp_path, audits=[_audit(), {"schema": "nope"}, "text"])
    assert files.audits == 1
    assert len(files.warnings) == 2 and files.warnings[0].startswith("audit #2: schema")
    assert "2 warning(s)" in html


def test_nulls_and_missing_figures_render_as_dashes(tmp_path: Path) -> None:
    sparse = _audit(
        version=None,
        previous_good_version=None,
        generalisation={"exact_match": None},
        retention={"ci95": None},
        perplexity={"drift": None},
        edits_total=None,
    )
    point = parse_audit(sparse)
    assert point.version is None and point.generalisation is None and point.ci_low is None
    files, html = _render(tmp_path, audits=[sparse])
    row = _Page(html).table("time")[1]
    assert row[2:7] == ["–", "250 audited", "91.0%", "97.0%", "–"]
    assert "1 audit(s) without an edit count" in html or "nothing to draw" in html


def test_audit_series_turns_audits_into_chart_numbers() -> None:
    audits = [
        _failed_audit(),  # 300 edits, 16:00, failed, thresholds of its own below
        _audit(started_at="2026-11-23T14:00:00+00:00", edits_total=250),
        _audit(
            started_at="2026-11-23T17:00:00+00:00",
            edits_total=250,
            retention={"exact_match": 0.9, "token_accuracy": 0.93, "ci95": [0.85, 0.95]},
            locality={"agreement": 0.96},
            perplexity={"drift": -0.01},
            gate={"thresholds": {"retention_floor": 0.75, "locality_floor": 0.85}},
        ),
        _audit(started_at="2026-11-23T12:00:00+00:00", edits_total=None),
    ]
    series = audit_series([parse_audit(a) for a in audits])

    assert series.edits == (250, 250, 300)  # by edits, then time; the undated-edit one left out
    assert series.retention == (0.91, 0.9, 0.62)
    assert series.token_accuracy == (0.95, 0.93, 0.7)
    assert series.ci_low == (0.87, 0.85, 0.55)
    assert series.ci_high == (0.94, 0.95, 0.69)
    assert series.locality == (0.97, 0.96, 0.88)
    assert series.drift == (0.025, -0.01, 0.15)
    assert series.failed == (False, False, True)
    # thresholds of the latest audit by time (17:00), not of the last in edit order
    assert (series.retention_floor, series.locality_floor) == (0.75, 0.85)
    assert series.max_drift is None  # that audit's thresholds name no drift limit


def test_charts_draw_the_series(tmp_path: Path) -> None:
    series = audit_series([parse_audit(_audit()), parse_audit(_failed_audit())])

    retention_ax = retention_figure(series).axes[0]
    lines = {line.get_label(): line for line in retention_ax.get_lines()}
    assert list(lines["exact match"].get_xdata()) == [250, 300]
    assert list(lines["exact match"].get_ydata()) == [0.91, 0.62]
    assert list(lines["token accuracy"].get_ydata()) == [0.95, 0.7]
    assert list(lines["retention floor 0.8"].get_ydata()) == [0.8, 0.8]
    failed = [c for c in retention_ax.collections if c.get_label() == "gate failed"]
    assert failed and failed[0].get_offsets().tolist() == [[300, 0.62]]
    band = next(c for c in retention_ax.collections if c.get_label() == "retention 95% CI")
    ys = band.get_paths()[0].vertices[:, 1]
    assert min(ys) == pytest.approx(0.55) and max(ys) == pytest.approx(0.94)

    locality_ax, drift_ax = locality_figure(series).axes
    locality = {line.get_label(): line for line in locality_ax.get_lines()}
    assert list(locality["agreement"].get_ydata()) == [0.97, 0.88]
    assert "locality floor 0.9" in locality
    drift = {line.get_label(): line for line in drift_ax.get_lines()}
    assert list(drift["drift"].get_ydata()) == [0.025, 0.15]
    assert list(drift["max drift 0.1"].get_ydata()) == [0.1, 0.1]


def test_long_tables_are_cut_to_the_newest_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(report, "MAX_TABLE_ROWS", 1)
    versions = [*VERSIONS, _version("10")]  # 10 sorts above 3 as a number, not as text
    _, html = _render(tmp_path, versions=versions)
    page = _Page(html)
    assert [row[0] for row in page.table("version")[1:]] == ["v10"]
    assert [row[2] for row in page.table("time")[1:]] == ["v4"]
    assert "Showing the 1 newest of 3 versions" in html
    assert "Showing the 1 newest of 2 audits" in html


def test_bad_arguments_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="timezone-aware"):
        _render(tmp_path, generated_at=datetime(2026, 11, 23, 18, 0))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ReportError, match="cannot write the report") as caught:
        write_html_report(
            blocker / "report.html",
            versions=[],
            audits=AuditHistory(),
            journal_counts={},
            model_name="m",
        )
    assert isinstance(caught.value, FactkeeperError)

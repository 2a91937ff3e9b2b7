"""Presenting benchmark results: the terminal table, the curve plot, and the README table.

Everything here reads the benchmark JSON (``editing.bench``), never live objects, so the README
Results table is generated from ``bench/results/*.json`` rather than typed by hand:
``python -m editing.bench_report bench/results/*.json``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

# (JSON key, column title) of the headline columns, in order: the yardstick's ``summary`` keys
# first (greedy exact match by the one judge), then the teacher-forced and paper figures beside.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("efficacy_exact", "Eff. EM"),
    ("paraphrase_exact", "Para. EM"),
    ("neighbourhood_kept", "Nbr. kept"),
    ("same_subject_kept", "Same-subj. kept"),
    ("unrelated_kept", "Unrel. kept"),
    ("perplexity_drift", "PPL drift"),
    ("retention_first100", "Ret. first100"),
    ("es", "ES"),
    ("ps", "PS"),
    ("ns", "NS"),
    ("efficacy_token", "Eff. tok"),
    ("paraphrase_token", "Para. tok"),
    ("multihop_accuracy", "MH acc."),
    ("multihop_case_accuracy", "MH case"),
    ("fluency", "Flu."),
)


def value(method: dict[str, Any], key: str) -> Any:
    """A method's figure: from its ``summary`` when the key is there, else the report's own."""
    summary = method.get("summary") or {}
    return summary[key] if key in summary else method.get(key)


def _fmt(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if key == "fluency":
        return f"{value:.2f}"
    if key == "perplexity_drift":
        return f"{100 * value:+.1f}"
    if isinstance(value, float):
        return f"{100 * value:.1f}"
    return str(value)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _present_columns(results: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """Headline columns that have a value for at least one method."""
    return [
        (key, title)
        for key, title in COLUMNS
        if any(value(m, key) is not None for r in results for m in r["methods"].values())
    ]


def render_table(result: dict[str, Any]) -> Table:
    """A rich table of one run: a row per method (percentages; fluency in bits)."""
    columns = _present_columns([result])
    table = Table(
        title=(
            f"{result['dataset']} · {result['n_edits']} edits · batch {result['batch_size']} · "
            f"{result['model']}"
        )
    )
    table.add_column("method")
    for _, title in columns:
        table.add_column(title, justify="right")
    for title in ("edit s p50", "edit s p95", "final eval s"):
        table.add_column(title, justify="right")
    for name, m in result["methods"].items():
        table.add_row(
            name,
            *(_fmt(value(m, key), key) for key, _ in columns),
            _seconds(value(m, "edit_seconds_p50")),
            _seconds(value(m, "edit_seconds_p95")),
            _seconds(m.get("final_eval_seconds")),
        )
    return table


def plot_curves(result: dict[str, Any], path: Path) -> Path:
    """Retention and locality per turn, one line per method, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for name, m in result["methods"].items():
        xs = [p["n_edits"] for p in m["curve"]]
        for ax, key in zip(axes, ("retention", "locality"), strict=True):
            ys = [p[key] for p in m["curve"]]
            if any(y is not None for y in ys):
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=name)
    axes[0].set_title("retention: edits so far that hold (greedy, the judge)")
    axes[1].set_title("neighbourhood kept (first requests' probes)")
    for ax in axes:
        ax.set_xlabel("edits applied")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a metric no method has (ZsRE: no neighbours)
            ax.legend()
    load = result.get("loadavg_start"), result.get("loadavg_end")
    fig.suptitle(
        f"{result['model']} · {result['dataset']} · {result['n_edits']} edits, batch "
        f"{result['batch_size']} · load avg {load[0][0]:.1f}→{load[1][0]:.1f} · "
        f"{result.get('git_rev') or ''}"[:110],
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def results_markdown(results: Sequence[dict[str, Any]]) -> str:
    """The README Results table: one row per (run, method), with command, revision and machine."""
    columns = _present_columns(results)
    head = [
        "dataset",
        "edits",
        "batch",
        "method",
        *(t for _, t in columns),
        "refused",
        "edit s p50/p95",
        "final eval s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for name, m in r["methods"].items():
            cells = [
                r["dataset"],
                str(r["n_edits"]),
                str(r["batch_size"]),
                name,
                *(_fmt(value(m, key), key) for key, _ in columns),
                str(value(m, "refused") or 0),
                _seconds(value(m, "edit_seconds_p50"))
                + "/"
                + _seconds(value(m, "edit_seconds_p95")),
                _seconds(m.get("final_eval_seconds")),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in results:
        machine = r["machine"]
        lines.append(
            f"- {r['dataset']}, {r['n_edits']} edits, batch {r['batch_size']}: `{r['command']}` · "
            f"git `{r['git_rev']}` · "
            f"{machine['cpu']}, {machine['cores']} cores, "
            f"{machine['torch_threads']} torch thread(s)"
            f" · load avg {r['loadavg_start'][0]:.1f} → {r['loadavg_end'][0]:.1f} · "
            f"wall {r['wall_seconds'] / 60:.1f} min · base eval {r['base_eval_seconds']:.0f} s"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Print the README Results table for the given result JSON files."""
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])]
    loaded = [json.loads(p.read_text()) for p in sorted(paths)]
    # Other benchmarks (daemon, operations, horizon, cost) share the folder, and runs from before
    # the yardstick have no ``summary``: keep this benchmark's yardstick runs.
    results = [
        r
        for r in loaded
        if isinstance(r, dict)
        and {"dataset", "base", "methods"} <= set(r)
        and all("summary" in m for m in r["methods"].values())
    ]
    sys.stdout.write(results_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

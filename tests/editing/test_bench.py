"""The benchmark end to end on a tiny model and the fixture data (20 edits, two turns)."""

import json
from pathlib import Path

import pytest

from daemon.cli import COMMANDS
from editing.bench import BenchConfig, BenchError, run_bench
from editing.bench_report import render_table, results_markdown
from editing.datasets import load_dataset
from editing.evaluation import SUMMARY_KEYS, EvalConfig
from editing.requests import LocalityProbe
from editing.tiny import tiny_loaded

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "data"
TOP_KEYS = {"dataset", "n_edits", "batch_size", "model", "git_rev", "command", "methods"}
FRACTIONS = {
    "efficacy_exact",
    "paraphrase_exact",
    "unrelated_kept",
    "es",
    "ps",
    "efficacy_token",
    "paraphrase_token",
    "retention_first100",
}
UNRELATED = (LocalityProbe("The sky on a clear day is", "blue", "unrelated"),)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return run_bench(
        "zsre",
        ["none", "ft"],
        n_edits=20,
        batch_size=1,
        turn_size=10,
        model=tiny_loaded("llama"),
        seed=0,
        out_dir=out,
        data_dir=FIXTURE,
        eval_config=EvalConfig(fluency_prompts=2, fluency_new_tokens=8),
        threads=1,
        editor_options={"ft": {"norm_constraint": 0.5, "lr": 0.05, "num_steps": 20}},
        progress=False,
        command="test",
        unrelated=UNRELATED,
        unrelated_source="test",
    )


def test_json_has_every_stable_field(result):
    path = Path(result["plot"]).with_suffix(".json")
    assert path.name == "zsre-20.json" and Path(result["plot"]).is_file()
    saved = json.loads(path.read_text())
    assert set(saved) >= TOP_KEYS
    assert (saved["dataset"], saved["n_edits"], saved["batch_size"]) == ("zsre", 20, 1)
    assert set(saved["methods"]) == {"none", "ft"}
    for name, m in saved["methods"].items():
        summary = m["summary"]
        assert list(summary) == list(SUMMARY_KEYS), name
        assert summary["ns"] is summary["neighbourhood_kept"] is None  # ZsRE has no neighbours
        for key in FRACTIONS:
            assert summary[key] is not None and 0.0 <= summary[key] <= 1.0, (name, key)
        assert (summary["n_edits"], summary["batch"], summary["refused"]) == (20, 1, 0)
        assert summary["perplexity_drift"] > -1.0
        assert m["unrelated_n"] == {"probes": 1, "stream": 0}  # NQ probes come after edit 20
        assert m["same_subject_kept"] is not None
        assert [p["n_edits"] for p in m["curve"]] == [10, 20]
    for key in ("machine", "torch_version", "transformers_version", "loadavg_start"):
        assert saved[key]
    assert saved["base_eval_seconds"] > 0


def test_none_keeps_everything_and_ft_edits(result):
    none, ft = result["methods"]["none"], result["methods"]["ft"]
    s = none["summary"]
    assert s["unrelated_kept"] == 1.0 and none["same_subject_kept"] == 1.0
    assert s["perplexity_drift"] == 0.0
    assert all(p["locality"] in (1.0, None) for p in none["curve"])
    assert none["touched_parameters"] == []
    assert s["efficacy_exact"] == result["base"]["summary"]["efficacy_exact"]
    assert ft["summary"]["efficacy_token"] > s["efficacy_token"]
    assert ft["touched_parameters"] == ["model.layers.2.mlp.down_proj.weight"]
    assert ft["efficacy_immediate"] > none["efficacy_immediate"]


def test_report_renders(result):
    assert render_table(result).row_count == 2
    table = results_markdown([result])
    assert "| zsre | 20 | 1 | ft |" in table and "`test`" in table


def test_config_is_checked():
    with pytest.raises(BenchError, match="multiple"):
        BenchConfig(dataset="zsre", methods=("none",), batch_size=3, turn_size=10)
    with pytest.raises(BenchError, match="unknown"):
        BenchConfig(dataset="zsre", methods=("rome",))
    with pytest.raises(BenchError, match="consolidate_every is not a multiple"):
        BenchConfig(dataset="zsre", methods=("ft:consolidate_every=3",), batch_size=2)
    with pytest.raises(BenchError, match="must be an integer"):
        BenchConfig(dataset="zsre", methods=("ft:consolidate_every=x",))


def test_skip_starts_the_stream_later(tmp_path):
    result = run_bench(
        "zsre",
        ["none"],
        n_edits=2,
        batch_size=1,
        turn_size=2,
        model=tiny_loaded("llama"),
        out_dir=tmp_path,
        data_dir=FIXTURE,
        eval_config=EvalConfig(fluency_prompts=1, fluency_new_tokens=2),
        skip=3,
        progress=False,
        unrelated=UNRELATED,
    )
    ids = [r.request_id for r in load_dataset("zsre", "eval", FIXTURE, limit=5)]
    assert result["skip"] == 3 and result["stream_ids"] == [ids[3], ids[4]]
    with pytest.raises(BenchError, match="--skip"):
        BenchConfig(dataset="zsre", methods=("none",), skip=-1)


def test_cli_has_bench():
    assert "bench" in COMMANDS


def test_refused_edits_are_counted_and_leave_the_model_alone(tmp_path):
    """A guard that refuses every edit: the run goes on, counts them, and scores like none."""
    result = run_bench(
        "zsre",
        ["none", "ft+normguard:max_delta_norm=1e-12"],
        n_edits=4,
        batch_size=2,
        turn_size=2,
        model=tiny_loaded("llama"),
        out_dir=tmp_path,
        data_dir=FIXTURE,
        eval_config=EvalConfig(fluency_prompts=1, fluency_new_tokens=4),
        progress=False,
        command="test",
    )
    guarded = result["methods"]["ft+normguard:max_delta_norm=1e-12"]
    assert guarded["summary"]["refused"] == 4
    assert "update norm" in guarded["refused_examples"][0]["reason"]
    assert guarded["touched_parameters"] == []
    assert guarded["summary"] == result["methods"]["none"]["summary"] | {
        "refused": 4,
        "edit_seconds_p50": None,
        "edit_seconds_p95": None,
    }


def test_consolidating_methods_re_solve_the_live_set_from_the_base(tmp_path):
    """``consolidate_every``: a joint fit of every edit so far replaces the sequential drift."""
    common = dict(
        n_edits=8,
        batch_size=2,
        turn_size=4,
        model=tiny_loaded("llama"),
        out_dir=tmp_path,
        data_dir=FIXTURE,
        eval_config=EvalConfig(fluency_prompts=1, fluency_new_tokens=4),
        editor_options={"ft:consolidate_every=4": {"norm_constraint": 0.5, "lr": 0.05}},
        progress=False,
        command="test",
    )
    result = run_bench("zsre", ["ft:consolidate_every=4"], **common)
    method = result["methods"]["ft:consolidate_every=4"]
    assert method["consolidate_every"] == 4
    assert [c["held"] for c in method["consolidations"]] == [4, 8]
    assert all(c["seconds"] > 0 and c["info"]["steps"] >= 1 for c in method["consolidations"])
    with pytest.raises(BenchError, match="no joint solve"):
        run_bench("zsre", ["none:consolidate_every=4"], **common)


def test_counterfact_rome_reports_the_unseen_cases_apart(tmp_path):
    result = run_bench(
        "counterfact-rome",
        ["none"],
        n_edits=1,
        turn_size=1,
        model=tiny_loaded("llama"),
        out_dir=tmp_path,
        data_dir=FIXTURE,
        eval_config=EvalConfig(fluency_prompts=0),
        progress=False,
        command="test",
    )
    none = result["methods"]["none"]
    assert none["summary"]["ns"] is not None and none["summary"]["ps"] is not None
    assert none["summary"]["neighbourhood_kept"] == 1.0
    assert none["summary_by_subset"]["not_in_mend_train"]["n_edits"] == 1


def test_a_run_record_writes_its_provenance_beside_the_results(tmp_path):
    import json

    from editing.bench import RunRecord

    record = RunRecord.start("bench/example.py", ["--threads", "1"])
    path = tmp_path / "out.json"
    record.write(path, {"rows": [1, 2]})
    written = json.loads(path.read_text())
    assert written["command"] == "python bench/example.py --threads 1"
    assert written["rows"] == [1, 2]
    assert written["git_rev"] == record.git_rev and written["started_at"] == record.started_at
    assert len(written["loadavg_start"]) == 3 and len(written["loadavg_end"]) == 3
    assert written["machine"]["cores"] >= 1

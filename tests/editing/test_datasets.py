"""Dataset loaders on the committed fixture subset (tests/fixtures/data)."""

from pathlib import Path

import pytest

from editing.datasets import DatasetError, default_data_dir, load_counterfact_rome, load_dataset

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "data"


def test_counterfact_eval_is_ordered_and_enriched_from_the_rome_sample():
    requests = load_dataset("counterfact", "eval", FIXTURE)
    assert [r.request_id for r in requests[:3]] == [
        "counterfact-0",
        "counterfact-1",
        "counterfact-4",
    ]
    first = requests[0]
    assert first.prompt == "The mother tongue of Danielle Darrieux is"
    assert (first.target_new, first.target_true) == ("English", "French")
    # The MEND "rephrase" is a generation prompt here: never taken for a paraphrase.
    assert first.rephrases == ()
    assert first.extra["generation_prompts"] == (
        "Where Danielle Darrieux is from, people speak the language of",
    )
    assert len(first.locality) == 1 and first.locality[0].kind == "neighbourhood"
    assert first.locality[0].answer == "French"
    rich = next(r for r in requests if r.request_id == "counterfact-106")
    assert len(rich.rephrases) == 2  # the two ROME paraphrases
    assert len(rich.locality) > 1
    assert len(rich.extra["generation_prompts"]) > 1  # MEND's, then the ROME record's
    assert all(p.answer == rich.target_true for p in rich.locality)


def test_counterfact_splits_are_disjoint_and_limit_keeps_the_prefix():
    ids = {
        split: {r.request_id for r in load_dataset("counterfact", split, FIXTURE)}
        for split in ("train", "val", "eval")
    }
    assert not ids["train"] & ids["eval"] and not ids["val"] & ids["eval"]
    assert not ids["train"] & ids["val"]
    full = load_dataset("counterfact", "eval", FIXTURE)
    assert load_dataset("counterfact", "eval", FIXTURE, limit=5) == full[:5]


def test_zsre_merges_the_two_files_on_cond():
    requests = load_dataset("zsre", "eval", FIXTURE)
    sources = [r.extra["source"] for r in requests]
    # 21 KnowEdit records, then first300's 6 minus the shared one minus the empty-target one.
    assert sources.count("zsre_knowedit") == 21
    assert sources.count("zsre_mem_first300") == 4
    assert sources.index("zsre_mem_first300") == 21
    conds = [r.extra["cond"] for r in requests]
    assert len(conds) == len(set(conds))
    shared = next(r for r in requests if r.extra.get("also_in"))
    assert shared.locality[-1].prompt.startswith("nq question:")
    assert shared.locality[-1].prompt.endswith("?")
    assert shared.locality[-1].kind == "unrelated"
    assert {p.kind for p in shared.locality[:-1]} == {"same_subject"}
    mem = requests[21]
    assert mem.request_id == "zsre-mem-0" and mem.target_new == "University of Michigan"
    assert mem.rephrases == ("What university did Watts Humphrey take part in?",)


def test_mquake_questions_ride_on_the_last_rewrite():
    requests = load_dataset("mquake", "eval", FIXTURE)
    assert len(requests) == 8
    first_case = requests[:4]
    assert [bool(r.multi_hop) for r in first_case] == [False, False, False, True]
    assert first_case[0].prompt == "Hey Jude was performed by"
    assert first_case[3].multi_hop[0].answer == "Arabic"
    assert "Arabic language" in first_case[3].multi_hop[0].answer_aliases


def test_rome_sample_loader():
    [request] = load_counterfact_rome(FIXTURE)
    assert request.request_id == "counterfact-106"
    assert len(request.rephrases) == 2 and len(request.locality) >= 5
    assert {p.kind for p in request.locality} == {"neighbourhood"}
    assert request.extra["mend_split"] == "eval"  # the fixture's MEND edit file holds case 106
    assert load_dataset("counterfact-rome", "eval", FIXTURE) == [request]


def test_zsre_train_sample_is_for_meta_training():
    requests = load_dataset("zsre", "train", FIXTURE)
    assert [r.request_id for r in requests] == ["zsre-train-0", "zsre-train-1"]  # empty alt out
    first = requests[0]
    assert (first.prompt, first.target_new, first.target_true) == (
        "Which city is Alpha Tower in?",
        "Bergen",
        "Oslo",
    )
    assert first.rephrases == ("In which city is Alpha Tower located?",)
    assert first.locality[0].kind == "unrelated"


def test_errors_name_the_fix(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="train .* and eval splits"):
        load_dataset("zsre", "val", FIXTURE)
    with pytest.raises(DatasetError, match="only an eval split"):
        load_dataset("counterfact-rome", "train", FIXTURE)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("counterfact", "eval", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("fever", "eval", FIXTURE)  # type: ignore[arg-type]
    monkeypatch.setenv("FACTKEEPER_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path

"""Decoys: synthetic neighbours of an edit that NSE's solve keeps unchanged."""

from __future__ import annotations

from pathlib import Path

import torch

from editing.generation import greedy_generate
from editing.keystats import KeyStatistics
from editing.models import LoadedModel
from editing.nse import PRESETS, NSEEditor
from editing.nse.decoys import corpus_names, decoys_for
from editing.nse.keys import keys_and_hidden
from editing.requests import EditRequest
from editing.tiny import tiny_loaded

NAMES = ("Tanner", "Moreno", "Howard", "Paula", "Oslo")
GLACIER = EditRequest("g", "Howard Glacier is located in", "Howard Glacier", "Europe")


def test_decoys_replace_the_subject_and_keep_its_head() -> None:
    decoys = decoys_for(GLACIER, 6, NAMES)
    assert len(decoys) == 6
    for i, d in enumerate(decoys):
        assert d.prompt.endswith(" is located in") and d.subject in d.prompt
        assert "Howard" not in d.subject  # a word of the subject is never a decoy name
        assert d.subject.endswith(" Glacier") == (i % 2 == 0)
        assert d.request_id == f"g~decoy{i}"


def test_decoys_are_a_pure_function_of_the_request() -> None:
    assert decoys_for(GLACIER, 4, NAMES) == decoys_for(GLACIER, 4, NAMES)
    other = EditRequest("h", "Rutgers Glacier is in", "Rutgers Glacier", "Africa")
    assert [d.subject for d in decoys_for(other, 8, NAMES)] != [
        d.subject for d in decoys_for(GLACIER, 8, NAMES)
    ]
    assert decoys_for(GLACIER, 0, NAMES) == []


def test_corpus_names_skip_sentence_initial_words(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("The war ended. The army met Tanner , and Tanner met Tanner in Oslo .\n" * 3)
    names = corpus_names(corpus)
    assert "Tanner" in names and "Oslo" in names
    assert "The" not in names  # only ever after a full stop or at a line start


def _decoy_shift(lm: LoadedModel, stats: KeyStatistics, decoys: int) -> tuple[float, str]:
    request = EditRequest("e1", "The twin city of Paris", "Paris", "Japan")
    config = PRESETS["tiny"].replace(decoys=decoys)
    probes = decoys_for(request, 8, corpus_names())
    _, before = keys_and_hidden(lm, probes, [], config.z_layer, config)
    editor = NSEEditor(config, stats=stats)
    editor.apply(lm, [request])
    _, after = keys_and_hidden(lm, probes, [], config.z_layer, config)
    answer = greedy_generate(lm.model, lm.tokenizer, [request.prompt], 1)[0]
    return float((after - before).norm(dim=0).mean()), answer.strip(" .")


def test_decoys_keep_the_synthetic_neighbours_and_the_edit_takes(
    trained_state: dict[str, torch.Tensor], small_stats: KeyStatistics
) -> None:
    shifts = {}
    for count in (0, 8):
        lm = tiny_loaded("llama")
        lm.model.load_state_dict(trained_state)
        shifts[count], answer = _decoy_shift(lm, small_stats, count)
        assert answer == "Japan"
    assert shifts[8] < 0.5 * shifts[0]

"""Residuals of the unedited lower blocks on disk: reused by a new process, bounded, never trusted
blindly."""

import pytest
import torch

from editing.residual_store import ResidualStore
from editing.scoring import TeacherForcedScorer
from editing.tiny import tiny_loaded
from tests.editing.conftest import FACT

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = "0" * 64
PAIRS = [(FACT.prompt, "Paris"), (FACT.prompt, "Rome"), ("Apple was founded by", "Steve Jobs")]


def test_a_new_store_reads_what_another_wrote(tmp_path):
    a = ResidualStore(tmp_path, BASE)
    seq, other = (1, 2, 3), (4, 5)
    a.save(2, {seq: torch.arange(12.0).reshape(3, 4)})
    b = ResidualStore(tmp_path, BASE)
    found = b.load(2, [seq, other])
    assert list(found) == [seq]
    assert torch.equal(found[seq], torch.arange(12.0).reshape(3, 4))
    assert b.load(3, [seq]) == {}  # another block's input
    assert ResidualStore(tmp_path, "1" * 64).load(2, [seq]) == {}  # other base weights


def test_past_its_cap_the_oldest_shards_go(tmp_path):
    store = ResidualStore(tmp_path, BASE, max_bytes=3000)
    first, second = (1,), (2,)
    store.save(0, {first: torch.zeros(1, 256)})  # 1 KiB of floats and a header
    store.save(0, {second: torch.zeros(1, 256)})
    store.save(0, {(3,): torch.zeros(1, 256)})
    kept = ResidualStore(tmp_path, BASE).load(0, [first, second, (3,)])
    assert first not in kept and (3,) in kept
    assert sum(p.stat().st_size for p in tmp_path.rglob("*.safetensors")) <= 3000


def test_a_damaged_or_foreign_shard_is_skipped(tmp_path):
    store = ResidualStore(tmp_path, BASE)
    store.save(0, {(1,): torch.ones(1, 4)})
    folder = tmp_path / BASE / "layer-0"
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    found = ResidualStore(tmp_path, BASE).load(0, [(1,), (2,)])
    assert list(found) == [(1,)]


def test_a_fresh_scorer_resumes_from_the_store_without_running_the_lower_blocks(taught, tmp_path):
    first = TeacherForcedScorer(
        taught.model, taught.tokenizer, taught.adapter, store=ResidualStore(tmp_path, BASE)
    )
    reference = first.score(PAIRS)
    first.score(PAIRS, resume_layer=2)  # runs blocks 0-1 once and writes what they gave

    lower_calls = []
    block0 = taught.adapter.layers(taught.model)[0]
    handle = block0.register_forward_pre_hook(lambda *_: lower_calls.append(1))
    try:
        again = TeacherForcedScorer(
            taught.model, taught.tokenizer, taught.adapter, store=ResidualStore(tmp_path, BASE)
        ).score(PAIRS, resume_layer=2)
    finally:
        handle.remove()
    assert lower_calls == []
    for ref, got in zip(reference, again, strict=True):
        assert ref.argmax_ids == got.argmax_ids
        assert got.nll == pytest.approx(ref.nll, abs=1e-5)


def test_residuals_captured_on_a_full_pass_are_stored(taught, tmp_path):
    scorer = TeacherForcedScorer(
        taught.model, taught.tokenizer, taught.adapter, store=ResidualStore(tmp_path, BASE)
    )
    scorer.score(PAIRS, capture_layers=[2])
    runs = [scorer.encode(p).ids[:-1] for p in PAIRS]  # the answer's last token is not run
    stored = ResidualStore(tmp_path, BASE).load(2, runs)
    assert set(stored) == set(runs)


def test_gpt2_which_cannot_resume_writes_nothing(tmp_path):
    lm = tiny_loaded("gpt2")
    scorer = TeacherForcedScorer(
        lm.model, lm.tokenizer, lm.adapter, store=ResidualStore(tmp_path, BASE)
    )
    scorer.score([("The capital of France is", "Paris")], resume_layer=1)
    assert not list(tmp_path.rglob("*.safetensors"))


def test_a_failed_write_costs_the_cache_not_the_caller(tmp_path):
    (tmp_path / BASE).write_text("a file where the store's folder should be")
    store = ResidualStore(tmp_path, BASE)
    store.save(0, {(1,): torch.ones(1, 4)})  # logged, not raised
    assert store.load(0, [(1,)]) == {}

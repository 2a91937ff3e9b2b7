"""C0 estimation against a direct computation, the cache, and the split-half figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editing.adapters import MlpRole
from editing.keystats import (
    KeyStatistics,
    KeyStatsError,
    accumulate_key_moments,
    accumulate_target_moments,
    sample_corpus,
)
from editing.paths import Paths
from editing.tiny import tiny_loaded


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    lines = [
        f"Line {i}: the capital of France is Paris, and {i * 7} people live there."
        for i in range(200)
    ]
    path.write_text("\n".join(lines))
    return path


def _inputs_of(module: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The module's input on a plain full-depth forward of every chunk at once (a raw hook, on
    purpose independent of editing.hooks)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_c0_equals_direct_second_moment(tmp_path: Path, family: str) -> None:
    lm = tiny_loaded(family)
    sample = sample_corpus(
        lm.tokenizer, _corpus(tmp_path), max_tokens=1024, seq_len=32, batch_size=4
    )
    moments = accumulate_key_moments(lm, [1, 2], sample, batch_size=4, progress=False)

    for layer in (1, 2):
        module = lm.adapter.module(lm.model, MlpRole.DOWN, layer)
        seen = _inputs_of(module, lm.model, sample.chunks)
        keys = seen.reshape(-1, seen.shape[-1]).double()  # (N, T, d_ff) -> (N*T, d_ff)
        direct = keys.T @ keys / keys.shape[0]  # (d_ff, d_ff)
        got = moments[layer]
        assert got.count == sample.tokens == keys.shape[0]
        assert got.total.dtype == torch.float64
        torch.testing.assert_close(got.c0, direct, rtol=1e-5, atol=1e-7)
        first, second = got.half_c0()
        torch.testing.assert_close((first + second) / 2, got.c0)
        expected = float(torch.linalg.norm(first - second) / torch.linalg.norm(got.c0))
        assert got.split_half_rel_diff == pytest.approx(expected, rel=1e-6)


def test_cache_roundtrip_and_sidecar(tmp_path: Path) -> None:
    lm = tiny_loaded("llama")
    corpus = _corpus(tmp_path)
    paths = Paths(tmp_path / "home")
    stats = KeyStatistics(
        paths, corpus=corpus, max_tokens=1024, seq_len=32, batch_size=4, progress=False
    )
    first = stats.moments(lm, [1, 3])
    path = stats.cache_path(lm, 3, MlpRole.DOWN)
    assert path.is_file() and lm.base_hash[:16] in path.name and "n1024" in path.name
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["tokens"] == 1024 and sidecar["layer"] == 3
    assert sidecar["split_half_rel_diff"] == pytest.approx(first[3].split_half_rel_diff)
    assert sidecar["curve"][-1][0] == 1024

    again = KeyStatistics(
        paths, corpus=corpus, max_tokens=1024, seq_len=32, batch_size=4, progress=False
    )
    loaded = again.moments(lm, [1, 3])
    for layer in (1, 3):
        assert torch.equal(loaded[layer].total, first[layer].total)
        assert loaded[layer].meta["corpus_sha256"] == sidecar["corpus_sha256"]

    other = tiny_loaded("llama", seed=1)  # other weights -> other cache entry
    assert again.cache_path(other, 3, MlpRole.DOWN) != path


def test_missing_corpus_is_a_typed_error(tmp_path: Path) -> None:
    stats = KeyStatistics(Paths(tmp_path), corpus=tmp_path / "nope.txt", progress=False)
    with pytest.raises(KeyStatsError, match="not found"):
        stats.c0(tiny_loaded("llama"), 1)


def test_one_pass_for_all_targets_equals_the_per_layer_passes(tmp_path: Path) -> None:
    """The start-up pass hooks every needed matrix (several layers, two roles) in the same
    forwards; each statistic must equal the one its own per-layer pass gives."""
    lm = tiny_loaded("llama")
    sample = sample_corpus(
        lm.tokenizer, _corpus(tmp_path), max_tokens=1024, seq_len=32, batch_size=4
    )
    targets = [(MlpRole.DOWN, 1), (MlpRole.UP, 2), (MlpRole.DOWN, 3), (MlpRole.UP, 1)]
    progress: list[tuple[int, int]] = []
    together = accumulate_target_moments(
        lm, targets, sample, batch_size=4, progress=False, on_progress=lambda *a: progress.append(a)
    )
    assert set(together) == set(targets)
    assert progress[-1] == (sample.tokens, sample.tokens)
    assert len(progress) == sample.chunks.shape[0] // 4  # one pass: one callback per batch
    for role, layer in targets:
        alone = accumulate_key_moments(lm, [layer], sample, role=role, batch_size=4)[layer]
        got = together[(role, layer)]
        assert got.count == alone.count
        torch.testing.assert_close(got.total, alone.total, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got.first_half, alone.first_half, rtol=1e-6, atol=1e-9)


def test_prepare_computes_every_missing_target_in_one_pass_and_caches(tmp_path: Path) -> None:
    lm = tiny_loaded("llama")
    stats = KeyStatistics(
        Paths(tmp_path / "home"),
        corpus=_corpus(tmp_path),
        max_tokens=1024,
        seq_len=32,
        batch_size=4,
        progress=False,
    )
    targets = [(MlpRole.DOWN, 1), (MlpRole.UP, 2), (MlpRole.DOWN, 3)]
    found = stats.prepare(lm, targets)
    assert {m.meta["targets_in_pass"] == ["down:1", "up:2", "down:3"] for m in found.values()} == {
        True
    }
    assert stats.cache_path(lm, 2, MlpRole.UP).is_file()
    # The editor's later per-layer reads are memo hits: the same objects, no new pass.
    assert stats.moments(lm, [1, 3])[3] is found[(MlpRole.DOWN, 3)]

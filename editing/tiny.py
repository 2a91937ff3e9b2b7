"""Tiny random models of each supported family, built from a config, for unit tests.

No hub exists here, so tests build models from configs and train a small byte-level BPE
tokenizer on a fixed text. Everything is seeded: the same call gives the same weights.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from editing.adapters import adapter_for
from editing.models import LoadedModel, prepare_tokenizer

TINY_VOCAB = 384
_EOS = "<|endoftext|>"

# Short factual sentences in the shape of the edit prompts, so the tokenizer has merges for them.
_TOKENIZER_TEXT = """
The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.
The mother tongue of Danielle Darrieux is French. The official language of Japan is Japanese.
Apple was founded by Steve Jobs. Microsoft was founded by Bill Gates. The CEO of Tesla is Elon Musk.
Which country is Berlin in? Germany. Who wrote Hamlet? William Shakespeare.
Toko Yasuda plays the guitar.
The Eiffel Tower is located in Paris. The Colosseum is located in Rome. Lionel Messi plays soccer.
"""


def _configs(vocab: int) -> dict[str, Any]:
    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    return {
        "llama": LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            **common,
        ),
        "qwen2": Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        ),
        "gpt2": GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=128, **common),
    }


TINY_FAMILIES = tuple(_configs(TINY_VOCAB))


def tiny_config(family: str, vocab: int = TINY_VOCAB) -> Any:
    try:
        return _configs(vocab)[family]
    except KeyError:
        raise ValueError(f"no tiny config for {family!r}; known: {TINY_FAMILIES}") from None


def tiny_model(family: str = "llama", seed: int = 0) -> PreTrainedModel:
    """A randomly initialised model of the family, in float32 and eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    return model.eval()


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=[_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes) with id 0 as end-of-text."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), eos_token=_EOS
    )
    prepare_tokenizer(tokenizer)
    return tokenizer


def tiny_loaded(family: str = "llama", seed: int = 0) -> LoadedModel:
    """A tiny model wrapped like a loaded one, so editors and the daemon accept it."""
    model = tiny_model(family, seed)
    return LoadedModel(
        model=model,
        tokenizer=tiny_tokenizer(),
        adapter=adapter_for(model),
        name=f"tiny-{family}",
        base_hash=f"tiny-{family}-seed{seed}",
        load_seconds=0.0,
        from_cache=False,
    )

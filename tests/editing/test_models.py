"""Model loading: local folders, the safetensors-only rule, and the real SmolLM2 default."""

import pytest
import torch

from editing.generation import greedy_generate
from editing.models import ModelLoadError, load_model, locate_smollm2_gguf
from editing.paths import Paths
from editing.tiny import tiny_model, tiny_tokenizer


def _save_tiny(folder, family="llama", safe=True):
    model = tiny_model(family)
    model.save_pretrained(folder, safe_serialization=safe)
    tiny_tokenizer().save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_local_folder_loads_the_same_weights(tmp_path, family):
    original = _save_tiny(tmp_path / "m", family)
    lm = load_model(str(tmp_path / "m"), paths=Paths(tmp_path / "home"))
    assert lm.adapter.family == family
    for (name, a), (_, b) in zip(
        original.state_dict().items(), lm.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert len(lm.base_hash) == 64
    assert lm.tokenizer.pad_token is not None


def test_folder_with_only_pickled_weights_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    model = tiny_model("llama")
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(folder), paths=Paths(tmp_path / "home"))


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no hub downloads"):
        load_model("HuggingFaceTB/SmolLM2-135M", paths=Paths(tmp_path))


def test_greedy_generate_pads_batches_consistently():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompts = ["The capital of France is", "Apple was founded by Steve", "Hi"]
    batched = greedy_generate(model, tok, prompts, max_new_tokens=4, batch_size=3)
    single = [greedy_generate(model, tok, [p], max_new_tokens=4)[0] for p in prompts]
    assert batched == single


@pytest.mark.smollm2
def test_smollm2_answers_paris_and_second_load_comes_from_cache(smollm2_paths):
    assert locate_smollm2_gguf().suffix == ".gguf"
    first = load_model("smollm2", paths=smollm2_paths)
    [answer] = greedy_generate(first.model, first.tokenizer, ["The capital of France is"], 4)
    assert answer.startswith(" Paris"), answer
    second = load_model("smollm2", paths=smollm2_paths)
    assert second.from_cache
    assert second.base_hash == first.base_hash
    # The cached weights are the de-quantised ones, bit for bit.
    for (name, a), (_, b) in zip(
        first.model.state_dict().items(), second.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name

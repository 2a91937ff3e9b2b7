"""The value network: untrained it is the normalised step; training lowers NSE's value loss on
requests it was trained on; a stopped run resumes to the same network; its file round-trips;
NSE uses it for the first steps and keeps its targets apart from Adam's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from editing.editors.base import EditError
from editing.emsedit.checkpoint import TRAIN_META
from editing.keystats import KeyStatistics
from editing.models import LoadedModel
from editing.nse import PRESETS, NSEEditor
from editing.nse.keys import ValueObjective, compute_targets
from editing.nse.value_net import ValueNet, ValueNetError
from editing.nse.value_training import (
    NET_FILE,
    ValueTraining,
    net_values,
    train_value_net,
)
from editing.requests import EditRequest

REQUESTS = [
    EditRequest("e1", "The twin city of Paris", "Paris", "Japan"),
    EditRequest("e2", "The twin city of Japan", "Japan", "Rome"),
    EditRequest("e3", "The twin city of Rome", "Rome", "Paris"),
    EditRequest("e4", "The twin city of Paris", "Paris", "Rome"),
]
CONFIG = PRESETS["tiny"]
SETTINGS = ValueTraining(steps=2, first_step=0.25, batch=2, epochs=3, lr=3e-2, save_every=2)


def test_untrained_step_is_the_normalised_step() -> None:
    net = ValueNet(width=8, steps=2, first_step=0.25)
    grad, h = torch.randn(3, 8), torch.randn(3, 8)
    step = net.step(1, grad, h)
    expected = -0.25 * h.norm(dim=1, keepdim=True) * grad / grad.norm(dim=1, keepdim=True)
    assert torch.allclose(step, expected, atol=1e-6)


def test_file_round_trip_and_refusals(tmp_path: Path) -> None:
    net = ValueNet(width=8, steps=2)
    with torch.no_grad():
        net.direction.add_(0.1 * torch.randn_like(net.direction))
    net.save(tmp_path / "net.safetensors", {"z_layer": 2})
    loaded = ValueNet.load(tmp_path / "net.safetensors")
    assert loaded.sha256() == net.sha256() and loaded.meta == {"z_layer": 2}
    assert ValueNet(width=8, steps=2).sha256() != net.sha256()
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueNetError, match="cannot read"):
        ValueNet.load(tmp_path / "junk.safetensors")


def _objective_loss(lm: LoadedModel, net: ValueNet) -> float:
    with torch.enable_grad():
        _, _, final = net_values(
            net, ValueObjective(lm, REQUESTS, CONFIG.z_layer, CONFIG), CONFIG.clamp_norm_factor
        )
    return float(final.detach().mean())


def test_training_lowers_the_value_loss(trained_lm: LoadedModel, tmp_path: Path) -> None:
    untrained = ValueNet(trained_lm.model.config.hidden_size, 2, 0.25)
    before = _objective_loss(trained_lm, untrained)
    net = train_value_net(trained_lm, REQUESTS, CONFIG, tmp_path, SETTINGS)
    after = _objective_loss(trained_lm, net)
    assert after < 0.8 * before
    saved = ValueNet.load(tmp_path / NET_FILE)
    assert saved.sha256() == net.sha256()
    assert saved.meta["z_layer"] == CONFIG.z_layer and saved.meta["batches_done"] == 6
    assert len(saved.meta["curve"]) == 6


def test_a_stopped_run_resumes_to_the_same_network(trained_lm: LoadedModel, tmp_path: Path) -> None:
    whole = train_value_net(trained_lm, REQUESTS, CONFIG, tmp_path / "whole", SETTINGS)
    part = tmp_path / "part"
    seen: list[int] = []

    class Stop(Exception):
        pass

    def record(done: int, total: int, loss: float) -> None:
        seen.append(done)
        if len(seen) == 3:  # a crash in the third batch, after the checkpoint of the second
            raise Stop

    with pytest.raises(Stop):
        train_value_net(trained_lm, REQUESTS, CONFIG, part, SETTINGS, progress=record)
    assert json.loads((part / TRAIN_META).read_text())["batches_done"] == 2
    resumed = train_value_net(trained_lm, REQUESTS, CONFIG, part, SETTINGS, progress=record)
    assert seen == [1, 2, 3, 3, 4, 5, 6]  # the resumed run repeats the third batch
    for a, b in zip(resumed.parameters(), whole.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_nse_takes_its_first_steps_from_the_net(
    trained_lm: LoadedModel, small_stats: KeyStatistics, tmp_path: Path
) -> None:
    net = ValueNet(trained_lm.model.config.hidden_size, 2, first_step=0.3)
    net.save(tmp_path / "net.safetensors", {"z_layer": CONFIG.z_layer})
    config = CONFIG.replace(v_optimiser="net", v_num_grad_steps=3, early_stop_loss=0.0)
    (value,) = compute_targets(trained_lm, REQUESTS[:1], CONFIG.z_layer, config, net)
    normalised = config.replace(v_optimiser="normalised", v_step=0.3)
    (same,) = compute_targets(trained_lm, REQUESTS[:1], CONFIG.z_layer, normalised)
    assert torch.allclose(value.z, same.z, atol=1e-5)  # untrained net == normalised steps
    with pytest.raises(EditError, match="needs a value network"):
        compute_targets(trained_lm, REQUESTS[:1], CONFIG.z_layer, config)

    keys = set()
    for options in (
        {},
        {"v_optimiser": "normalised"},
        {"v_optimiser": "net", "value_net": str(tmp_path / "net.safetensors")},
    ):
        editor = NSEEditor(CONFIG, stats=small_stats, **options)
        editor.targets(trained_lm, REQUESTS[:1])
        keys.add(editor.target_key(REQUESTS[0]))
    assert len(keys) == 3  # targets of one provider are never taken for another's

    net.save(tmp_path / "other.safetensors", {"z_layer": CONFIG.z_layer + 1})
    wrong = NSEEditor(
        CONFIG, stats=small_stats, v_optimiser="net", value_net=str(tmp_path / "other.safetensors")
    )
    with pytest.raises(EditError, match="trained for z layer"):
        wrong.targets(trained_lm, REQUESTS[:1])
    missing = NSEEditor(
        CONFIG, stats=small_stats, v_optimiser="net", value_net=str(tmp_path / "none.safetensors")
    )
    with pytest.raises(EditError, match="cannot read value network"):
        missing.targets(trained_lm, REQUESTS[:1])


def test_a_price_on_size_trains_smaller_values(trained_lm: LoadedModel, tmp_path: Path) -> None:
    def mean_size(net: ValueNet) -> float:
        objective = ValueObjective(trained_lm, REQUESTS, CONFIG.z_layer, CONFIG)
        with torch.enable_grad():
            delta, _, _ = net_values(net, objective, CONFIG.clamp_norm_factor)
        return float((delta.detach().norm(dim=1) / objective.h_init.norm(dim=1)).mean())

    free = train_value_net(trained_lm, REQUESTS, CONFIG, tmp_path / "free", SETTINGS)
    priced = ValueTraining(**{**SETTINGS.__dict__, "size_weight": 5.0})
    small = train_value_net(trained_lm, REQUESTS, CONFIG, tmp_path / "priced", priced)
    assert mean_size(small) < 0.9 * mean_size(free)

import torch

from editing.emsedit.nets import HyperNet, RunningMeanStd


def _net(**kw) -> HyperNet:
    args = dict(d_in=5, d_out=7, rank=3, n_blocks=2, n_modules=2, lr_init=1e-3)
    args.update(kw)
    return HyperNet(**args, generator=torch.Generator().manual_seed(0))


def test_blocks_are_the_identity_at_init():
    net = _net()
    keys, grads = torch.randn(4, 5), torch.randn(4, 7)
    net.normalizer.update(torch.cat((keys, grads), -1))
    keys_t, grads_t = net(keys, grads, 1)
    normed = net.normalizer(torch.cat((keys, grads), -1))
    assert torch.equal(torch.cat((keys_t, grads_t), -1), normed)


def test_clamp_passes_gradient_at_the_zero_init_pre_activation():
    net = _net()
    keys, grads = torch.randn(4, 5), torch.randn(4, 7)
    net.value_diffs(keys, grads, 0).sum().backward()
    block = net.blocks[0]
    # With relu, B (and A, bias) would get exactly zero gradient at init and never train.
    assert block.B.grad.abs().sum() > 0
    assert block.bias.grad.abs().sum() > 0
    assert net.lr.weight.grad[0].abs() > 0 and net.lr.weight.grad[1] == 0


def test_running_normaliser_matches_full_batch_statistics():
    norm = RunningMeanStd(3)
    data = torch.randn(50, 3) * 3 + 1
    for chunk in data.split(7):
        norm.update(chunk)
    assert torch.allclose(norm.mean, data.mean(0), atol=1e-5)
    assert torch.allclose(norm.std, data.std(0), atol=1e-4)

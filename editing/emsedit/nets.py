"""The EMSEdit hypernetwork: maps (key, value-gradient) rows of an edited module to new rows.

Follows MALMEN (Tan et al., 2024) as used by EMSEdit (arXiv 2508.04012): one network per weight
shape, shared by the modules of that shape, each module selecting its own scale/shift embeddings,
learned step size ``lr`` and ridge strength ``lamda``. Parts in dependency order: the running
normaliser, one residual low-rank block (identity at initialisation, ``clamp(min=0)`` so the
zero pre-activation at init still passes gradient), the network, and the group of networks that
an editor holds. Shapes: ``n`` rows, ``d_in``/``d_out`` the module's in/out features,
``D = d_in + d_out``, ``r`` the block rank.
"""

from __future__ import annotations

import torch
from torch import nn


class RunningMeanStd(nn.Module):
    """Cumulative mean/std over every row ever seen (Chan et al. parallel merge)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("n", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge a batch ``x`` (n, D) into the statistics."""
        x = x.detach().to(torch.float64)
        count = x.shape[0]
        if count == 0:
            return
        batch_mean = x.mean(0)  # (D,)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)  # (D,)
        total = self.n + count
        delta = batch_mean - self.mean.to(torch.float64)  # (D,)
        mean = self.mean.to(torch.float64) + delta * count / total
        m2 = self.m2 + batch_m2 + delta**2 * self.n * count / total
        self.n.copy_(total)
        self.mean.copy_(mean.to(self.mean.dtype))
        self.m2.copy_(m2)
        self.var.copy_((m2 / total).to(self.var.dtype))
        self.std.copy_(torch.sqrt(m2 / (total - 1 + 1e-8)).to(self.std.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps
        return (x - self.mean) / (self.std + eps)  # (n, D)


class LowRankBlock(nn.Module):
    """``y + scale[m] * clamp(y A B + bias, min=0) + shift[m]``; B = 0 makes it the identity."""

    def __init__(self, dim: int, rank: int, n_modules: int, generator: torch.Generator) -> None:
        super().__init__()
        # Unscaled N(0, 1) as in the reference; harmless because B starts at zero.
        self.A = nn.Parameter(torch.randn(dim, rank, generator=generator))  # (D, r)
        self.B = nn.Parameter(torch.zeros(rank, dim))  # (r, D)
        self.bias = nn.Parameter(torch.zeros(dim))  # (D,)
        self.scale = nn.Embedding(n_modules, dim)  # (M, D)
        self.shift = nn.Embedding(n_modules, dim)  # (M, D)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, y: torch.Tensor, module_idx: torch.Tensor) -> torch.Tensor:
        hidden = y @ self.A @ self.B + self.bias  # (n, D) @ (D, r) @ (r, D) -> (n, D)
        hidden = hidden.clamp(min=0)  # not relu: at init hidden == 0 and must pass gradient
        hidden = self.scale(module_idx) * hidden + self.shift(module_idx)  # (n, D)
        return y + hidden


class HyperNet(nn.Module):
    """Transforms (K, G) rows of the modules of one weight shape; holds their lr and lamda."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        rank: int,
        n_blocks: int,
        n_modules: int,
        lr_init: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        dim = d_in + d_out
        self.normalizer = RunningMeanStd(dim)
        self.blocks = nn.ModuleList(
            LowRankBlock(dim, rank, n_modules, generator) for _ in range(n_blocks)
        )
        self.lr = nn.Embedding(n_modules, 1)  # (M, 1) learned edit step size
        self.lamda = nn.Embedding(n_modules, 1)  # (M, 1) log ridge strength
        nn.init.constant_(self.lr.weight, lr_init)
        nn.init.zeros_(self.lamda.weight)

    def forward(
        self, keys: torch.Tensor, grads: torch.Tensor, module: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(K (n, d_in), G (n, d_out)) -> transformed (K~ (n, d_in), G~ (n, d_out))."""
        module_idx = torch.full((keys.shape[0],), module, dtype=torch.long, device=keys.device)
        y = self.normalizer(torch.cat((keys, grads), dim=-1))  # (n, D)
        for block in self.blocks:
            y = block(y, module_idx)
        return y.split((self.d_in, self.d_out), dim=-1)

    def value_diffs(self, keys: torch.Tensor, grads: torch.Tensor, module: int) -> torch.Tensor:
        """D = -lr[m] * <k, k~> g~ per row: the desired change of each row's module output."""
        keys_t, grads_t = self(keys, grads, module)
        coef = (keys * keys_t).sum(-1, keepdim=True)  # (n, 1) raw key . transformed key
        return -self.lr.weight[module] * coef * grads_t  # (1,) * (n, 1) * (n, d_out)

    def ridge(self, module: int) -> torch.Tensor:
        """exp(lamda[m]), the ridge strength of the least-squares aggregation."""
        return self.lamda.weight[module, 0].exp()


class HyperNetGroup(nn.Module):
    """One editor's networks: ``nets[step_net][shape_key]`` plus where each module lives.

    ``shape_key`` is ``"{d_in}x{d_out}"``; ``module_index[name]`` is the module's embedding row
    inside its shape group, in config order.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, int]],
        ranks: list[int],
        n_blocks: int,
        lr_init: float,
        seed: int,
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.module_shape: dict[str, str] = {}
        self.module_index: dict[str, int] = {}
        counts: dict[str, int] = {}
        for name, (d_in, d_out) in shapes.items():
            key = f"{d_in}x{d_out}"
            self.module_shape[name] = key
            self.module_index[name] = counts.get(key, 0)
            counts[key] = counts.get(key, 0) + 1
        dims = {self.module_shape[n]: shapes[n] for n in shapes}
        self.nets = nn.ModuleList(
            nn.ModuleDict(
                {
                    key: HyperNet(d_in, d_out, rank, n_blocks, counts[key], lr_init, generator)
                    for key, (d_in, d_out) in dims.items()
                }
            )
            for rank in ranks
        )

    def net(self, step_net: int, module_name: str) -> tuple[HyperNet, int]:
        """The network and embedding row that edit ``module_name`` at ``step_net``."""
        return self.nets[step_net][self.module_shape[module_name]], self.module_index[module_name]

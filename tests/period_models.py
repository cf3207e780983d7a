"""A ``--model`` target for ``verify --period``: MaxText's scanned Gemma-3 layout.

The loop form applies N blocks ``layers_0 … layers_{N-1}``. The scan form
applies ``nn.scan`` (named ``layers``, ``length = N // K``) over a module
holding K sub-blocks ``layers_0 … layers_{K-1}``, then a module
``layers_remainder`` holding the ``N mod K`` leftover blocks ``layers_0 …``,
so layer ``K·b + j`` is ``layers/layers_{j}`` at index ``b`` of the layer
axis, as ``to_scan(..., into="layers", period=K)`` writes it.

The two holder modules (the scanned block of K and the remainder) run their
sub-blocks from a compact method that is not ``__call__``, so
``capture_intermediates=True`` records no output of their own: every captured
value has a counterpart in the loop form (``layers_i/...``). Their
``__call__`` is ``nn.nowrap``, as `ckptconv.models._scan_body`'s is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import numpy as np

from ckptconv import models


class _Blocks(nn.Module):
    """``count`` blocks ``layers_0 …`` applied in order; ``carry`` says whether
    ``__call__`` returns ``(x, None)`` (an ``nn.scan`` body) or ``x``."""

    count: int
    block_kwargs: Mapping[str, Any]
    carry: bool = False

    @nn.compact
    def run(self, x: Any) -> Any:  # not __call__: its output is not captured
        for j in range(self.count):
            x, _ = models.NormAttentionBlock(name=f"layers_{j}", **self.block_kwargs)(x)
        return x

    @nn.nowrap
    def __call__(self, x: Any) -> Any:
        x = self.run(x)
        return (x, None) if self.carry else x


class PeriodScanModel(nn.Module):
    """N `NormAttentionBlock` layers in blocks of ``period`` under ``nn.scan``."""

    num_layers: int
    period: int
    block_kwargs: Mapping[str, Any]
    axis: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_kwargs", flax.core.FrozenDict(self.block_kwargs))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: Any) -> Any:
        depth, rest = divmod(self.num_layers, self.period)
        scanned = nn.scan(
            _Blocks,
            variable_axes={"params": self.axis, "intermediates": 0},
            split_rngs={"params": True},
            length=depth,
        )
        x, _ = scanned(self.period, self.block_kwargs, carry=True, name="layers")(x)
        if rest:
            x = _Blocks(rest, self.block_kwargs, name="layers_remainder")(x)
        return x


def period_model(
    num_layers: int = 13,
    period: int = 6,
    axis: int = 1,
    hidden_dim: int = 16,
    num_heads: int = 2,
    batch: int = 2,
    seq: int = 4,
    seed: int = 0,
) -> tuple[models.LoopModel, PeriodScanModel, tuple[np.ndarray]]:
    """``(loop_module, scan_module, (x,))`` for ``verify --period``."""
    kwargs = {"hidden_dim": hidden_dim, "num_heads": num_heads}
    loop = models.LoopModel(
        block=models.NormAttentionBlock, num_layers=num_layers, block_kwargs=kwargs,
        pattern="layers_{i}",
    )
    scan = PeriodScanModel(num_layers=num_layers, period=period, block_kwargs=kwargs, axis=axis)
    x = np.random.default_rng(seed).standard_normal((batch, seq, hidden_dim)).astype(np.float32)
    return loop, scan, (x,)

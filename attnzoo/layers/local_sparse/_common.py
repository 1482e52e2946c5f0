"""Shared by the local-sparse entries: the family name, small test sizes, helpers and key/value pooling."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F

from attnzoo.layers.testing import random_tokens

FAMILY = "local-sparse"
SMALL = {"dim": 32, "n_heads": 4}


rand_x = partial(random_tokens, n=12)  # the family's reduction inputs [2, 12, 32]


def pool_grid(t: torch.Tensor, keep: torch.Tensor | None, grid: tuple[int, ...], s: tuple[int, ...]
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Average ``t`` ``[B, L, N, D]`` (tokens row-major on ``grid``) over cells of ``s`` tokens per axis.

    With ``keep`` (bool ``[B, N]``) only kept tokens are averaged and a cell with none is
    invalid. The last cell along an axis may be partial (it averages its real tokens).
    Returns ``([B, L, n_cells, D], cell_valid [B, n_cells] or None)``.
    """
    b, lead, d = t.shape[0], t.shape[1], t.shape[-1]
    nd = len(grid)
    if t.dtype not in (torch.float32, torch.float64):  # CPU pooling kernels lack some half types
        out, valid = pool_grid(t.float(), keep, grid, s)
        return out.to(t.dtype), valid
    x = t.movedim(-1, 2).reshape(b * lead, d, *grid)  # [B*L, D, *grid]
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    if keep is None:
        m = torch.ones(1, 1, *grid, dtype=t.dtype, device=t.device)
    else:
        m = keep.to(t.dtype).view(b, 1, 1, *grid).expand(b, lead, 1, *grid).reshape(b * lead, 1, *grid)
    num = pool(x * m, s, s, ceil_mode=True)
    den = pool(m, s, s, ceil_mode=True)
    out = num / den.clamp_min(torch.finfo(t.dtype).tiny)
    cells = math.prod(out.shape[2:])
    out = out.reshape(b, lead, d, cells).transpose(-1, -2)
    if keep is None:
        return out, None
    return out, den.reshape(b, lead, cells)[:, 0] > 0

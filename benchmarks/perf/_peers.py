"""Peer implementations the speed benchmarks time against (learn2learn's MAML step)."""
from __future__ import annotations

import copy


def learn2learn_maml_step(l2l, net, *, inner_lr: float, outer_lr: float, first_order: bool,
                          steps: int):
    """``step(episodes)``: one learn2learn MAML meta-step (mean query loss over the episodes,
    ``steps`` inner SGD steps of ``inner_lr`` via ``clone()``/``adapt()``, Adam at
    ``outer_lr``), on a copy of ``net``; ``l2l`` is the imported learn2learn module."""
    import torch
    import torch.nn.functional as F

    meta = l2l.algorithms.MAML(copy.deepcopy(net), lr=inner_lr, first_order=first_order)
    opt = torch.optim.Adam(meta.parameters(), lr=outer_lr)

    def step(eps):
        meta.train()
        opt.zero_grad(set_to_none=True)
        for ep in eps:
            fast = meta.clone()
            for _ in range(steps):
                fast.adapt(F.cross_entropy(fast(ep.support_x), ep.support_y))
            (F.cross_entropy(fast(ep.query_x), ep.query_y) / len(eps)).backward()
        opt.step()

    return step

"""The relation module d(·) of Relation Networks (Sung et al., CVPR 2018), as L2G describes it.

L2G (Lee et al.), eq. (10): s_{c,m} = d(concat(ρ_c, f_θ(x̃_m))), the relation score between class
prototype ρ_c (eq. 9, the sum of the class's support features) and query m, trained with the MSE of
eq. (11). "Implementation Details": the relation module is "two convolutional blocks and two fully
connected layers"; as in Sung et al., each block is ``Conv2d(3x3, 64) -> BatchNorm -> ReLU ->
MaxPool2d(2)``, then ``fc1`` (-> hidden = 8, ReLU) and ``fc2`` (-> 1, sigmoid), so s ∈ (0, 1).

Input: a concatenated pair of feature maps, ``(P, in_channels, h, w)`` with ``in_channels = 2C``
for a backbone giving ``(C, h, w)`` maps; the prototype comes first in the channel order (Sung et
al.'s code concatenates sample features, then query features). :meth:`RelationModule.pairwise`
builds all (class, query) pairs and returns ``(Q, N)`` scores.

Small maps. Sung et al. use unpadded convolutions on mini-ImageNet (19x19 -> 17 -> 8 -> 6 -> 3) and
padding 1 on Omniglot (5x5 -> 5 -> 2 -> 2 -> 1). ``padding="auto"`` follows that: 0 if both unpadded
blocks leave at least a 1x1 map, else 1. A max-pool is applied only where the map is at least 2x2
(a 1x1 map passes unchanged), so the 64x1x1 features of Conv-4 on 28x28 Omniglot do not collapse:
1x1 -> 1x1 -> 1x1 -> fc1 on 64 values. Both choices are fixed at build time from ``feature_size``.
Initialisation: PyTorch's defaults (neither paper states one).
"""
from __future__ import annotations

import torch
from torch import nn

from fewshot.errors import ConfigError
from fewshot.nn.registry import check_input, conv_output, image_hw, positive_int

__all__ = ["RelationModule"]


class RelationBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, padding: int, pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=padding)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.conv(x))))


class RelationModule(nn.Module):
    """d(concat(ρ_c, f(x̃))) ∈ (0, 1); see the module docstring.

    Args:
        in_channels: channels of the concatenated pair (2C for C-channel feature maps).
        hidden: width of ``fc1`` (8 in Sung et al.).
        feature_size: (h, w) of the feature maps (an int for square maps); required.
        channels: filters of the two conv blocks (64).
        padding: "auto", 0 or 1 (see the module docstring).
    """

    def __init__(self, in_channels: int, hidden: int = 8, *, feature_size=None, channels: int = 64,
                 padding="auto"):
        super().__init__()
        where = "RelationModule"
        in_channels = positive_int(in_channels, "in_channels", where)
        hidden = positive_int(hidden, "hidden", where)
        channels = positive_int(channels, "channels", where)
        if feature_size is None:
            raise ConfigError(
                "RelationModule: feature_size=(h, w) of the backbone's feature maps is required "
                "(use RelationModule.for_backbone(backbone) with a flatten=False backbone)."
            )
        h, w = image_hw(feature_size, where)
        if padding == "auto":

            def fits(n: int) -> bool:
                for _ in range(2):
                    n = conv_output(n, 3, 1, 0)
                    n = n // 2 if n >= 2 else n
                    if n < 1:
                        return False
                return True

            padding = 0 if fits(h) and fits(w) else 1
        if padding not in (0, 1) or isinstance(padding, bool):
            raise ConfigError(f"{where}: option 'padding' must be 'auto', 0 or 1, got {padding!r}.")
        self.in_shape = (in_channels, h, w)
        self.padding = padding
        blocks, c = [], in_channels
        for i in range(2):
            h, w = conv_output(h, 3, 1, padding), conv_output(w, 3, 1, padding)
            if h < 1 or w < 1:
                raise ConfigError(
                    f"{where}: feature maps of size {feature_size!r} vanish in conv block {i + 1} with "
                    f"padding={padding}; use padding=1 or 'auto'."
                )
            pool = h >= 2 and w >= 2
            if pool:
                h, w = h // 2, w // 2
            blocks.append(RelationBlock(c, channels, padding, pool))
            c = channels
        self.block1, self.block2 = blocks
        self.fc1 = nn.Linear(channels * h * w, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.relu = nn.ReLU()

    @classmethod
    def for_backbone(cls, backbone: nn.Module, hidden: int = 8, **options) -> "RelationModule":
        """The relation module for a backbone built with ``flatten=False`` (uses its ``out_shape``)."""
        if getattr(backbone, "flatten", False) or not hasattr(backbone, "out_shape"):
            raise ConfigError(
                "RelationModule.for_backbone: the backbone must return feature maps; build it with "
                "flatten=False."
            )
        c, h, w = backbone.out_shape
        return cls(2 * c, hidden, feature_size=(h, w), **options)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        """``(P, in_channels, h, w)`` concatenated pairs -> ``(P,)`` relation scores in (0, 1)."""
        check_input(pairs, self.in_shape, "RelationModule")
        z = self.block2(self.block1(pairs)).flatten(1)
        return torch.sigmoid(self.fc2(self.relu(self.fc1(z)))).squeeze(1)

    def pairwise(self, prototypes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """s_{c,m} (L2G eq. 10) for every prototype ``(N, C, h, w)`` and query ``(Q, C, h, w)``.

        Returns ``(Q, N)``: row m, column c is d(concat(ρ_c, f(x̃_m))).
        """
        n, q = prototypes.shape[0], queries.shape[0]
        pairs = torch.cat(
            [prototypes.unsqueeze(0).expand(q, *prototypes.shape),
             queries.unsqueeze(1).expand(q, n, *queries.shape[1:])],
            dim=2,
        )
        return self(pairs.reshape(q * n, *pairs.shape[2:])).view(q, n)

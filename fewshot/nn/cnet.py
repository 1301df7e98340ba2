"""CNet1-4 (CIFAR-10) and CCNet1-4 (CIFAR-100): the VGG-inspired classifiers of MLTP.

Deng & Zhang, "Is the Meta-Learning Idea Able to Improve the Generalization of Deep Neural Networks
on the Standard Supervised Learning?", ICPR 2020, sec. IV. The paper's notation: "Conv(c, f)
represents the convolutional layer with c kernels of size f x f", "Fc(m) represents the fully
connected layer with output size m", "MP is the max-pooling layer", "Softmax(n) is the Softmax layer
with output size n". Sec. IV-A (CIFAR-10, 32x32 RGB):

    CNet1: Conv(256, 3) + MP + Fc(512) + Softmax(10)
    CNet2: Conv(128, 3) + Conv(128, 3) + MP + Fc(256) + Softmax(10)
    CNet3: Conv(128, 3) + Conv(128, 3) + MP + Fc(256) + Fc(256) + Softmax(10)
    CNet4: Conv(128, 3) + Conv(128, 3) + MP + Conv(256, 3) + Conv(256, 3) + MP + Conv(512, 3) +
           Conv(512, 3) + MP + Fc(1024) + Softmax(10)   (with weight decay 1e-4)

Sec. IV-B (CIFAR-100): CCNet1-4 are the same four bodies with Softmax(100) (the paper's "CCNe1" is
CCNet1). "All weights are initialized with Xavier initializer."

What the paper leaves unsaid, and how it is read here (VGG, Simonyan & Zisserman 2015, which the
paper names as the inspiration, fixes each point):

* convolutions are 3x3, stride 1, padding 1 ("same"), with a bias, each followed by ReLU;
* MP is a 2x2 max-pool with stride 2 (32 -> 16 -> 8 -> 4);
* every hidden Fc(m) is followed by ReLU; the flattened maps feed the first Fc;
* Softmax(n) is the linear layer ``head`` with n outputs; the softmax itself is in the
  cross-entropy loss, so the network returns logits;
* no batch normalisation and no dropout are listed for these nets, so none is used by default;
  ``batch_norm=True`` (BN after each conv, before ReLU) and ``dropout=p`` (after each hidden Fc)
  are options, as sec. III-D says both are "directly implemented in the network architecture";
* Xavier = Glorot-uniform, U(-a, a) with a = sqrt(6/(fan_in+fan_out)) (TensorFlow's default
  ``xavier_initializer``), biases zero; BN weight 1 / bias 0;
* weight decay belongs to the optimiser (the training config), not to the network.

``num_classes`` sets the head's size: the paper's 10 for cnetK and 100 for ccnetK, but any value is
accepted (cnetK and ccnetK differ only there). Layout: ``features`` (Conv2d/ReLU/MaxPool2d),
``hidden`` (Linear/ReLU), ``head`` (Linear).
"""
from __future__ import annotations

import torch
from torch import nn

from fewshot.errors import ConfigError
from fewshot.nn.registry import boolean, check_input, image_hw, register_classifier

__all__ = ["PaperNet", "ARCHITECTURES"]

# (conv widths with "M" for MP, hidden Fc sizes): sec. IV-A / IV-B verbatim.
ARCHITECTURES: dict[int, tuple[tuple, tuple]] = {
    1: ((256, "M"), (512,)),
    2: ((128, 128, "M"), (256,)),
    3: ((128, 128, "M"), (256, 256)),
    4: ((128, 128, "M", 256, 256, "M", 512, 512, "M"), (1024,)),
}


class PaperNet(nn.Module):
    """A CNet/CCNet body: ``features`` -> flatten -> ``hidden`` -> ``head`` (logits)."""

    def __init__(self, variant: int, *, in_channels: int, image_size, num_classes: int, name: str,
                 batch_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        where = f"classifier '{name}'"
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{where}: option 'dropout' must be a probability in [0, 1), got {dropout!r}.")
        batch_norm = boolean(batch_norm, "batch_norm", where)
        convs, fcs = ARCHITECTURES[variant]
        h, w = image_hw(image_size, where)
        self.name = name
        self.in_shape = (int(in_channels), h, w)
        self.num_classes = int(num_classes)
        layers: list[nn.Module] = []
        c = in_channels
        for spec in convs:
            if spec == "M":
                h, w = h // 2, w // 2
                if h < 1 or w < 1:
                    raise ConfigError(
                        f"{where}: image_size {image_size!r} is too small: a max-pool leaves an empty map "
                        f"(the net halves the image {convs.count('M')} times; CIFAR images are 32x32)."
                    )
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(nn.Conv2d(c, spec, kernel_size=3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(spec))
                layers.append(nn.ReLU())
                c = spec
        self.features = nn.Sequential(*layers)
        self.out_shape = (c, h, w)
        hidden: list[nn.Module] = []
        d = c * h * w
        for m in fcs:
            hidden += [nn.Linear(d, m), nn.ReLU()]
            if dropout > 0:
                hidden.append(nn.Dropout(dropout))
            d = m
        self.hidden = nn.Sequential(*hidden)
        self.feature_dim = d
        self.head = nn.Linear(d, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier (Glorot-uniform) weights, zero biases, as sec. IV states."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The input of ``head``: ``(B, feature_dim)`` (the last hidden Fc's activations)."""
        check_input(x, self.in_shape, f"classifier '{self.name}'")
        return self.hidden(self.features(x).flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_shape, f"classifier '{self.name}'")
        return self.head(self.hidden(self.features(x).flatten(1)))


def _register(variant: int, prefix: str, paper_classes: int) -> None:
    name = f"{prefix}{variant}"

    def build(*, in_channels: int, image_size, num_classes: int, batch_norm: bool = False,
              dropout: float = 0.0) -> PaperNet:
        return PaperNet(variant, in_channels=in_channels, image_size=image_size, num_classes=num_classes,
                        name=name, batch_norm=batch_norm, dropout=dropout)

    convs, fcs = ARCHITECTURES[variant]
    body = " + ".join(["MP" if s == "M" else f"Conv({s}, 3)" for s in convs] + [f"Fc({m})" for m in fcs])
    build.__name__ = name
    build.__doc__ = f"{name.upper()} (MLTP, ICPR 2020, sec. IV): {body} + Softmax({paper_classes})."
    register_classifier(name)(build)


for _v in ARCHITECTURES:
    _register(_v, "cnet", 10)
    _register(_v, "ccnet", 100)


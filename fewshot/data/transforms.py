"""Batched image conversion and augmentation presets, on tensors, per image, seeded.

Every image goes through the same two steps, on a whole batch at once:

1. ``uint8 (B, C, H, W)`` -> float ``x / 255`` (optionally augmented here, in raw [0, 1] pixel
   space, so padding is black as in ``torchvision.transforms.RandomCrop(padding=p)``);
2. normalisation: ``"store"`` -- ``(x - mean_c) / std_c`` with the store's per-channel
   statistics (fused with step 1 into one affine map ``x * (1/(255 std_c)) - mean_c/std_c``
   when nothing is augmented); ``"per_image"`` -- ``tf.image.per_image_standardization``:
   ``(x - mean(x)) / max(std(x), 1/sqrt(C*H*W))`` over each image's pixels and channels;
   ``"none"`` -- ``x / 255`` only.

The augmentations draw a *separate* random choice per image (torchvision's v2 transforms
applied to a batch tensor draw one choice for the whole batch) from an explicit
``torch.Generator``, so a seed fixes them. Presets (:func:`get_preset`):

========== ============ ==========================================================
name       normalise    training augmentation (evaluation: the original image)
========== ============ ==========================================================
cifar      per_image    pad 4 + random HxW crop + horizontal flip (MLTP on CIFAR)
tiny       store        pad 8 + random HxW crop + horizontal flip (MLTP on Tiny ImageNet)
episodic   store        horizontal flip + pad H//8 + random HxW crop (optional, episodes)
none       store        nothing
========== ============ ==========================================================

Any other callable can be given as augmentation: it receives the float batch in [0, 1]
(``(B, C, H, W)``) and must return a batch of the same shape; wrap a torchvision transform
in :class:`PerImage` to draw its random parameters per image.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
import torch.nn.functional as F

from fewshot.errors import ConfigError, unknown_name

NORMALIZE_MODES = ("store", "per_image", "none")


class RandomHorizontalFlip:
    """Flip each image left-right with probability ``p`` (independently per image)."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"RandomHorizontalFlip: p must lie in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        flip = torch.rand(x.shape[0], generator=generator) < self.p
        flip = flip.to(x.device).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(flip, x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomCropPad:
    """Zero-pad each side by ``padding`` pixels, then crop a random ``size x size`` window per
    image (``size=None``: the input's own height/width), as torchvision's
    ``RandomCrop(size, padding)`` but with one offset per image, in one gather."""

    def __init__(self, padding: int, size: Optional[int] = None):
        if padding < 0:
            raise ConfigError(f"RandomCropPad: padding must be >= 0, got {padding}")
        self.padding, self.size = int(padding), (None if size is None else int(size))

    def __call__(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        b, _, h, w = x.shape
        p = self.padding
        sh = sw = self.size
        if sh is None:
            sh, sw = h, w
        if sh > h + 2 * p or sw > w + 2 * p:
            raise ConfigError(f"RandomCropPad: crop {sh}x{sw} is larger than the padded image "
                              f"{h + 2 * p}x{w + 2 * p}")
        oy = torch.randint(0, h + 2 * p - sh + 1, (b,), generator=generator).to(x.device)
        ox = torch.randint(0, w + 2 * p - sw + 1, (b,), generator=generator).to(x.device)
        xp = F.pad(x, (p, p, p, p)) if p else x
        rows = (oy[:, None] + torch.arange(sh, device=x.device))[:, :, None]  # (B, sh, 1)
        cols = (ox[:, None] + torch.arange(sw, device=x.device))[:, None, :]  # (B, 1, sw)
        bi = torch.arange(b, device=x.device)[:, None, None]
        out = xp.permute(0, 2, 3, 1)[bi, rows, cols]  # (B, sh, sw, C)
        return out.permute(0, 3, 1, 2).contiguous(memory_format=_format_of(x))

    def __repr__(self) -> str:
        return f"RandomCropPad(padding={self.padding}, size={self.size})"


class Compose:
    """Apply transforms in order, passing the generator to each that takes one."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        for t in self.transforms:
            x = call_augment(t, x, generator)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class PerImage:
    """Apply a per-image transform (e.g. a torchvision v2 transform) to each image of a batch
    separately, so each draws its own random parameters (a Python loop over images: use the
    batched transforms above where speed matters). Seeded: the global torch RNG is forked and
    seeded from ``generator`` for the call."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, x: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.stack([self.transform(img) for img in x])

    def __repr__(self) -> str:
        return f"PerImage({self.transform!r})"


def _format_of(x: Tensor):
    return torch.channels_last if (x.dim() == 4 and x.shape[1] > 1 and
                                   x.is_contiguous(memory_format=torch.channels_last) and
                                   not x.is_contiguous()) else torch.contiguous_format


def _takes_generator(fn: Callable) -> bool:
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def call_augment(fn: Callable, x: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """``fn(x, generator=generator)`` if ``fn`` takes a generator, else ``fn(x)``."""
    out = fn(x, generator=generator) if _takes_generator(fn) else fn(x)
    if not isinstance(out, Tensor) or out.shape[0] != x.shape[0]:
        raise ConfigError(f"augmentation {fn!r} must return a (B, C, H, W) tensor for a batch of "
                          f"{x.shape[0]} images")
    return out


@dataclass(frozen=True)
class Preset:
    """A named pair (normalisation, training augmentation); evaluation never augments."""

    name: str
    normalize: str  # "store" | "per_image" | "none"
    train: Optional[Callable]

    def augment(self, train: bool) -> Optional[Callable]:
        return self.train if train else None


def _presets(image_size: Optional[int]):
    return {
        "cifar": Preset("cifar", "per_image", Compose([RandomCropPad(4), RandomHorizontalFlip()])),
        "tiny": Preset("tiny", "store", Compose([RandomCropPad(8), RandomHorizontalFlip()])),
        "episodic": Preset("episodic", "store", Compose([
            RandomHorizontalFlip(), RandomCropPad(max(1, (image_size or 32) // 8))])),
        "none": Preset("none", "store", None),
    }


PRESETS = ("cifar", "tiny", "episodic", "none")


def get_preset(name: Union[str, Preset, None], image_size: Optional[int] = None) -> Preset:
    """The preset called ``name`` (None -> "none"). ``image_size`` sets the episodic crop
    padding (``image_size // 8``)."""
    if isinstance(name, Preset):
        return name
    if name is None:
        name = "none"
    table = _presets(image_size)
    if not isinstance(name, str) or name not in table:
        raise ConfigError("data.augment: " + unknown_name("augmentation preset", str(name), table))
    return table[name]


def resolve(augment, image_size: Optional[int] = None) -> Tuple[str, Optional[Callable]]:
    """(normalisation mode, training augmentation) for an ``augment`` argument: a preset name,
    a :class:`Preset`, None, or a callable (store normalisation, the callable as augmentation)."""
    if augment is None or isinstance(augment, (str, Preset)):
        p = get_preset(augment, image_size)
        return p.normalize, p.train
    if callable(augment):
        return "store", augment
    raise ConfigError(f"augment must be a preset name ({', '.join(PRESETS)}), a callable or None; "
                      f"got {augment!r}")


def affine_coefficients(mean: Sequence[float], std: Sequence[float], normalize: str,
                        channels: int, device=None) -> Tuple[Tensor, Tensor]:
    """(scale, shift) of shape (1, C, 1, 1) with ``x_norm = x_uint8 * scale + shift``."""
    if normalize == "store":
        m = torch.tensor(list(mean), dtype=torch.float32)
        s = torch.tensor(list(std), dtype=torch.float32).clamp_min(1e-8)
        if m.numel() == 1 and channels > 1:
            m, s = m.expand(channels), s.expand(channels)
        if m.numel() != channels:
            raise ConfigError(f"store statistics have {m.numel()} channels, images have {channels}")
        scale, shift = 1.0 / (255.0 * s), -m / s
    else:
        scale = torch.full((channels,), 1.0 / 255.0)
        shift = torch.zeros(channels)
    return scale.view(1, -1, 1, 1).to(device), shift.view(1, -1, 1, 1).to(device)


def per_image_standardization(x: Tensor) -> Tensor:
    """``tf.image.per_image_standardization``: ``(x - mean) / max(std, 1/sqrt(N))`` per image,
    ``N = C*H*W`` (population std)."""
    n = x[0].numel()
    flat = x.reshape(x.shape[0], -1)
    mean = flat.mean(1)
    std = flat.std(1, unbiased=False).clamp_min(1.0 / float(n) ** 0.5)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (x - mean.view(shape)) / std.view(shape)


def convert(x: Tensor, scale: Tensor, shift: Tensor, *, normalize: str = "store",
            augment: Optional[Callable] = None, generator: Optional[torch.Generator] = None,
            channels_last: bool = False) -> Tensor:
    """uint8 ``(B, C, H, W)`` (any strides, e.g. a permuted NHWC gather) -> float32 images,
    augmented (in [0, 1] space) then normalised; ``scale``/``shift`` from
    :func:`affine_coefficients` on ``x``'s device."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if x.dim() != 4:
        raise ConfigError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if augment is None and normalize != "per_image":
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=fmt)
        out.copy_(x)
        b, c, h, w = x.shape
        if channels_last and c > 1 and out.numel():
            # NHWC memory: a (1,C,1,1) broadcast over the innermost dim of size C is slow;
            # view rows of W*C values and scale by the per-channel values tiled W times
            rows = out.permute(0, 2, 3, 1).reshape(b * h, w * c)
            rows.mul_(scale.reshape(c).repeat(w)).add_(shift.reshape(c).repeat(w))
            return out
        return out.mul_(scale).add_(shift)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=fmt)
    out.copy_(x).mul_(1.0 / 255.0)
    if augment is not None:
        out = call_augment(augment, out, generator)
    if normalize == "per_image":
        out = per_image_standardization(out)
    elif normalize == "store":
        out = (out * 255.0) * scale + shift
    return out.contiguous(memory_format=fmt)

"""``glyphs``: the built-in default dataset, generated deterministically from a seed.

An Omniglot-like set of stroke-drawn characters that needs no input files:

* a **class** (a "character") is a random set of 2-5 strokes on the canvas ``[-1, 1]^2``.
  Each stroke is a straight line, a circular arc or a cubic Bezier curve; after the first,
  a stroke starts on a point of an earlier stroke with probability 0.6, so most characters
  are connected like handwriting. Every stroke is stored as a chain of two cubic Bezier
  segments (7 control points): a line has collinear control points, an arc of sweep
  ``phi`` is two segments of sweep ``phi/2`` with the usual handle length
  ``(4/3) tan(phi/8) r``.
* an **instance** (one "drawing" of the character) jitters every control point by
  ``N(0, sigma^2)`` (per-instance, independently), applies a random affine map
  ``x -> R(theta) Sh(s) diag(a_x, a_y) x + t`` (small rotation, shear, anisotropic scale,
  translation) and draws the strokes with a random pen width, anti-aliased: the strokes are
  rasterised with PIL at 4x the output size and box-filtered down to ``size x size``.

Images are uint8 grayscale, ink bright (255) on a dark (0) background, shape
``(N, size, size, 1)``; labels are sorted ascending, ``per_class`` images per class.

:func:`prepare` writes the default stores: 1200 classes of 20 images, split by class into
``train`` (800 classes), ``val`` (200) and ``test`` (200), the same sizes as Omniglot's
(the Vinyals split has 1028/172/423 x 4 rotations). All randomness comes from
``numpy.random.default_rng(seed)`` (PCG64), so a seed gives the same dataset everywhere.

Difficulty, measured on the test classes with seed 0 (see ``tests/data/test_glyphs.py``):
raw-pixel nearest-prototype 5-way 1-shot accuracy is 0.569 +- 0.007 (5-shot 0.861 +- 0.005;
chance 0.2; 600 fixed 15-query episodes of the test split, seed 0), while a
metric learned on the train classes does clearly better (a 4-block conv ProtoNet trained for only
100 episodes of 20-way 1-shot reaches about 0.90 5-way 1-shot; in the test, a 3-block conv
ProtoNet trained for 60 episodes on 100 characters reaches 0.81 where raw pixels get 0.59).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from fewshot.data.store import write_store
from fewshot.errors import ConfigError

#: the dataset name used by ``fewshot data prepare glyphs``
NAME = "glyphs"
#: default class counts of the three splits and images per class
SPLITS = (("train", 800), ("val", 200), ("test", 200))
PER_CLASS = 20
IMAGE_SIZE = 28

_SUPERSAMPLE = 4
_POINTS_PER_SEGMENT = 12
_MAX_STROKES = 5
_CONTROL = 7  # two cubic Bezier segments per stroke

# per-instance variation (canvas units: the canvas is [-1, 1]^2)
_JITTER = 0.08  # std of control-point jitter
_ROTATION = np.deg2rad(15.0)  # uniform in [-r, r]
_SHEAR = 0.18  # uniform in [-s, s]
_SCALE = (0.82, 1.12)  # per-axis uniform
_TRANSLATE = 0.16  # uniform in [-t, t] per axis
_WIDTH = (1.3, 2.6)  # pen width in output pixels, uniform


def _arc_controls(center: np.ndarray, radius: float, start: float, sweep: float) -> np.ndarray:
    """7 control points of a circular arc as two cubic Bezier segments of sweep/2 each."""
    half = sweep / 2.0
    h = 4.0 / 3.0 * np.tan(half / 4.0) * radius  # handle length of a cubic arc
    ang = start + half * np.arange(3)
    ends = center + radius * np.stack([np.cos(ang), np.sin(ang)], 1)  # (3, 2)
    tang = np.stack([-np.sin(ang), np.cos(ang)], 1)  # unit tangents (direction of +angle)
    return np.stack([ends[0], ends[0] + h * tang[0], ends[1] - h * tang[1], ends[1],
                     ends[1] + h * tang[1], ends[2] - h * tang[2], ends[2]])


def _split_cubic(p: np.ndarray) -> np.ndarray:
    """de Casteljau split of one cubic (4, 2) at t=1/2 into 7 control points."""
    p01, p12, p23 = (p[0] + p[1]) / 2, (p[1] + p[2]) / 2, (p[2] + p[3]) / 2
    p012, p123 = (p01 + p12) / 2, (p12 + p23) / 2
    mid = (p012 + p123) / 2
    return np.stack([p[0], p01, p012, mid, p123, p23, p[3]])


def _point_on(stroke: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A point on a stroke given by 7 control points (one of its segment end points or
    the curve at a random parameter)."""
    seg = rng.integers(0, 2)
    c = stroke[3 * seg: 3 * seg + 4]
    t = rng.uniform(0.0, 1.0)
    b = np.array([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3])
    return b @ c


def _class_strokes(rng: np.random.Generator) -> Tuple[np.ndarray, int]:
    """Control points (5, 7, 2) of one character (unused strokes zero) and its stroke count."""
    n = int(rng.integers(2, _MAX_STROKES + 1))
    strokes = np.zeros((_MAX_STROKES, _CONTROL, 2))
    for k in range(n):
        start = None
        if k > 0 and rng.uniform() < 0.6:
            start = _point_on(strokes[int(rng.integers(0, k))], rng)
        kind = rng.choice(3, p=[0.35, 0.3, 0.35])
        if kind == 0:  # line
            p0 = start if start is not None else rng.uniform(-0.7, 0.7, 2)
            ang = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(0.6, 1.4)
            p1 = np.clip(p0 + length * np.array([np.cos(ang), np.sin(ang)]), -0.85, 0.85)
            t = np.linspace(0, 1, _CONTROL)[:, None]
            s = p0 + t * (p1 - p0)
        elif kind == 1:  # arc
            radius = rng.uniform(0.25, 0.6)
            sweep = rng.uniform(np.pi / 2, 1.7 * np.pi) * rng.choice([-1, 1])
            a0 = rng.uniform(0, 2 * np.pi)
            if start is not None:
                center = start - radius * np.array([np.cos(a0), np.sin(a0)])
            else:
                center = rng.uniform(-0.4, 0.4, 2)
            s = _arc_controls(center, radius, a0, sweep)
        else:  # cubic Bezier
            p0 = start if start is not None else rng.uniform(-0.75, 0.75, 2)
            rest = np.clip(p0 + rng.normal(0, 0.55, (3, 2)), -0.9, 0.9)
            s = _split_cubic(np.concatenate([p0[None], rest]))
        strokes[k] = s
    # centre the character's bounding box on the canvas and fit it inside [-0.8, 0.8]
    used = strokes[:n].reshape(-1, 2)
    lo, hi = used.min(0), used.max(0)
    centre = (lo + hi) / 2
    extent = max(float((hi - lo).max()) / 2, 1e-6)
    scale = min(1.0, 0.8 / extent)
    strokes[:n] = (strokes[:n] - centre) * scale
    return strokes, n


def _bezier_points(ctrl: np.ndarray) -> np.ndarray:
    """Evaluate chains of two cubic segments: (..., 7, 2) -> (..., 2*P, 2) polyline points."""
    t = np.linspace(0.0, 1.0, _POINTS_PER_SEGMENT)
    basis = np.stack([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t ** 2 * (1 - t), t ** 3], 1)  # (P,4)
    seg0 = np.einsum("pk,...kd->...pd", basis, ctrl[..., 0:4, :])
    seg1 = np.einsum("pk,...kd->...pd", basis, ctrl[..., 3:7, :])
    return np.concatenate([seg0, seg1[..., 1:, :]], axis=-2)


def generate_glyphs(num_classes: int, per_class: int, seed: int = 0,
                    size: int = IMAGE_SIZE) -> Tuple[np.ndarray, np.ndarray]:
    """Generate ``num_classes`` characters with ``per_class`` drawings each.

    Returns ``(images, labels)``: uint8 ``(num_classes * per_class, size, size, 1)`` and
    int64 labels ``0..num_classes-1`` sorted ascending (class ``c`` is rows
    ``c*per_class .. (c+1)*per_class - 1``). Deterministic in ``seed``: the characters come
    from the stream ``default_rng([seed, 0])`` in order (so the first ``m`` characters of a
    larger call are the characters of a call with ``num_classes=m``), the drawings from
    ``default_rng([seed, 1, num_classes, per_class])``.
    """
    if num_classes < 1 or per_class < 1 or size < 8:
        raise ConfigError(
            f"glyphs: need num_classes >= 1, per_class >= 1 and size >= 8, got "
            f"num_classes={num_classes}, per_class={per_class}, size={size}")
    class_rng = np.random.default_rng([int(seed), 0])
    strokes = np.zeros((num_classes, _MAX_STROKES, _CONTROL, 2))
    counts = np.zeros(num_classes, dtype=np.int64)
    for c in range(num_classes):
        strokes[c], counts[c] = _class_strokes(class_rng)

    n = num_classes * per_class
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    rng = np.random.default_rng([int(seed), 1, num_classes, per_class])
    # per-instance jitter of every control point; the shared end points of the two Bezier
    # segments move together (they are one control point).
    ctrl = strokes[labels] + rng.normal(0.0, _JITTER, (n, _MAX_STROKES, _CONTROL, 2))
    affine, trans, width = _random_affines(rng, n)
    pts = _bezier_points(ctrl)  # (n, S, L, 2)
    pts = np.einsum("nij,nslj->nsli", affine, pts) + trans[:, None, None, :]
    big = size * _SUPERSAMPLE
    # canvas [-1, 1] -> pixel coordinates of the supersampled canvas
    pix = ((pts + 1.0) * 0.5 * (big - 1)).astype(np.float32)
    pen = np.maximum(1, np.rint(width * _SUPERSAMPLE)).astype(np.int64)

    return _render(pix, pen, counts[labels], size)[..., None], labels


def _random_affines(rng: np.random.Generator, n: int):
    """Per instance: A = R(theta) @ Sh(shear) @ diag(scale) (n, 2, 2), the translation t
    (n, 2) and the pen width (n,), drawn from ``rng`` in that order."""
    theta = rng.uniform(-_ROTATION, _ROTATION, n)
    shear = rng.uniform(-_SHEAR, _SHEAR, n)
    scale = rng.uniform(_SCALE[0], _SCALE[1], (n, 2))
    trans = rng.uniform(-_TRANSLATE, _TRANSLATE, (n, 2))
    width = rng.uniform(_WIDTH[0], _WIDTH[1], n)
    cos, sin = np.cos(theta), np.sin(theta)
    rot = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # (n,2,2)
    sh = np.zeros((n, 2, 2))
    sh[:, 0, 0] = sh[:, 1, 1] = 1.0
    sh[:, 0, 1] = shear
    return rot @ sh @ (np.eye(2)[None] * scale[:, None, :]), trans, width


def _render(pix: np.ndarray, pen: np.ndarray, strokes: np.ndarray, size: int) -> np.ndarray:
    """Draw instance i's first ``strokes[i]`` polylines ``pix[i]`` with pen width ``pen[i]``
    and round caps on the supersampled canvas, then box-filter down to (n, size, size)."""
    from PIL import Image, ImageDraw  # Pillow: only needed to draw glyphs

    n, big = pix.shape[0], size * _SUPERSAMPLE
    out = np.empty((n, size, size), dtype=np.uint8)
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        draw.rectangle((0, 0, big, big), fill=0)
        w = int(pen[i])
        r = w / 2.0
        for s in range(int(strokes[i])):
            line = pix[i, s]
            draw.line([tuple(p) for p in line.tolist()], fill=255, width=w, joint="curve")
            for p in (line[0], line[-1]):  # round pen caps
                draw.ellipse((p[0] - r, p[1] - r, p[0] + r, p[1] + r), fill=255)
        out[i] = np.asarray(canvas.reduce(_SUPERSAMPLE))
    return out


def class_names(num_classes: int) -> List[str]:
    """Names of the generated characters: ``glyph0000``, ``glyph0001``, ..."""
    width = max(4, len(str(num_classes - 1)))
    return [f"glyph{c:0{width}d}" for c in range(num_classes)]


def prepare(root: Path, seed: int = 0, *, splits=SPLITS, per_class: int = PER_CLASS,
            size: int = IMAGE_SIZE, from_path: Optional[Path] = None) -> List[Path]:
    """Generate the dataset and write one store per split under ``root``.

    ``root`` is the dataset folder (the stores are ``root/<split>.h5``; the data-store's
    ``store_path('glyphs', split, data_root)`` is ``<data_root>/glyphs/<split>.h5``, so
    ``prepare.py`` passes ``<data_root>/glyphs``). Classes ``0..799`` of the generated
    set are ``train``, the next 200 ``val``, the last 200 ``test`` (by default). Each
    store is written atomically by :func:`fewshot.data.store.write_store`.
    ``from_path`` must be None: glyphs need no input files.
    """
    if from_path is not None:
        raise ConfigError("glyphs are generated, they read no files: drop --from "
                          f"'{from_path}' (use `fewshot data prepare glyphs`)")
    root = Path(root)
    total = sum(int(k) for _, k in splits)
    images, labels = generate_glyphs(total, per_class, seed=seed, size=size)
    names = class_names(total)
    paths = []
    first = 0
    for split, k in splits:
        k = int(k)
        rows = slice(first * per_class, (first + k) * per_class)
        path = root / f"{split}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        paths.append(Path(write_store(
            path, images[rows], labels[rows] - first, names[first:first + k],
            dataset=NAME, split=split, source=f"generated by fewshot glyphs (seed={seed})")))
        first += k
    return paths

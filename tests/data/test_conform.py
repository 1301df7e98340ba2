"""Images brought to another shape (fewshot.data.conform): PIL's ITU-R 601-2 luma for
RGB -> L (closed form), repetition for L -> RGB, Lanczos resize, exact statistics of the
converted split, and the lazy store's reads equal to the in-memory conversion."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fewshot.data.conform import conform_images, conform_store, describe_conversion
from fewshot.data.store import ImageStore
from fewshot.errors import DataError


def test_rgb_to_l_is_the_601_2_luma_in_pil_fixed_point():
    """Flat red, green, blue, white: L = (19595 R + 38470 G + 7471 B + 2^15) >> 16 (PIL's
    fixed-point 0.299 / 0.587 / 0.114), i.e. 76, 150, 29, 255; same size, so no resize."""
    colours = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (10, 200, 90)])
    images = np.broadcast_to(colours[:, None, None, :], (5, 6, 6, 3)).astype(np.uint8)
    out = conform_images(images, (6, 6, 1))
    want = (19595 * colours[:, 0] + 38470 * colours[:, 1] + 7471 * colours[:, 2] + 2 ** 15) >> 16
    assert want[:4].tolist() == [76, 150, 29, 255]
    assert out.shape == (5, 6, 6, 1)
    np.testing.assert_array_equal(out[:, :, :, 0], np.broadcast_to(want[:, None, None], (5, 6, 6)))


def test_l_to_rgb_repeats_and_lanczos_keeps_flat_images_flat():
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 7, 7, 1), dtype=np.uint8)
    rgb = conform_images(grey, (7, 7, 3))
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], grey[..., 0])
    flat = np.full((2, 20, 20, 1), 100, np.uint8)
    np.testing.assert_array_equal(conform_images(flat, (28, 28, 1)), 100)  # weights sum to 1
    # a non-flat image: the PIL Lanczos resize of the same array, per image
    want = np.asarray(Image.fromarray(grey[0, ..., 0], "L").resize((12, 12), Image.LANCZOS))
    np.testing.assert_array_equal(conform_images(grey[:1], (12, 12, 1))[0, ..., 0], want)
    assert describe_conversion((20, 20, 3), (28, 28, 1)) == \
        "RGB->L (ITU-R 601-2 luma), 20x20->28x28 Lanczos"
    assert describe_conversion((28, 28, 1), (28, 28, 1)) == "none"


def test_other_channel_counts_are_refused():
    with pytest.raises(DataError, match="4 channels; only 1 \\(L\\) and 3 \\(RGB\\)"):
        conform_images(np.zeros((1, 4, 4, 4), np.uint8), (4, 4, 1))


@pytest.mark.parametrize("in_memory", [True, False])
def test_conformed_store_statistics_and_reads(in_memory):
    """Statistics of the converted split = numpy's population mean/std of the converted pixels
    (x/255); rows read back equal the PIL conversion of the source rows; classes kept."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 10, 10, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(4), 3)
    src = ImageStore.from_arrays(images, labels, ["a", "b", "c", "d"], dataset="colour", split="test")
    assert conform_store(src, (10, 10, 3)) is src
    out = conform_store(src, (14, 14, 1), in_memory=in_memory)
    want = np.stack([np.asarray(Image.fromarray(im, "RGB").convert("L").resize((14, 14), Image.LANCZOS))
                     for im in images])[..., None]
    assert out.in_memory is in_memory and out.image_shape == (14, 14, 1)
    assert out.class_names == src.class_names and out.class_offsets.tolist() == [0, 3, 6, 9, 12]
    np.testing.assert_array_equal(out.read(np.array([11, 0, 5])), want[[11, 0, 5]])
    x = want.astype(np.float64) / 255
    assert out.mean == pytest.approx((x.mean(),), abs=1e-12)
    assert out.std == pytest.approx((x.std(),), abs=1e-12)
    assert "conformed: RGB->L (ITU-R 601-2 luma), 10x10->14x14 Lanczos" in out.source

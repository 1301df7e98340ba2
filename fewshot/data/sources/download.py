"""Explicit downloads (``fewshot data download NAME``), delegated to the libraries that own
the download links and checksums, then converted like local files:

* omniglot: ``torchvision.datasets.Omniglot`` (background and evaluation zips, md5-checked);
* cifar10 / cifar100: ``torchvision.datasets.CIFAR10`` / ``CIFAR100`` (md5-checked archives);
  cifar-fs and fc100 fetch the same CIFAR-100 archive (they are class splits of it);
* tiny-imagenet: ``torchvision.datasets.utils.download_and_extract_archive`` of the official
  zip with its md5 (:data:`TINY_IMAGENET_MD5`);
* mini-imagenet / tiered-imagenet: ``learn2learn.vision.datasets.MiniImagenet`` /
  ``TieredImagenet`` (``download=True``), which fetch the pickles converted here.

Raw files go to ``<data root>/<name>/raw/`` and are kept (re-running skips the download
where the delegate does). Nothing else in fewshot touches the network.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional

from fewshot.errors import DataError

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"


def _fetch_omniglot(raw: Path) -> Path:
    import torchvision.datasets as tvd
    for background in (True, False):
        tvd.Omniglot(str(raw), background=background, download=True)
    return raw / "omniglot-py"


def _fetch_cifar10(raw: Path) -> Path:
    import torchvision.datasets as tvd
    tvd.CIFAR10(str(raw), train=True, download=True)
    return raw


def _fetch_cifar100(raw: Path) -> Path:
    import torchvision.datasets as tvd
    tvd.CIFAR100(str(raw), train=True, download=True)
    return raw


def _fetch_tiny(raw: Path) -> Path:
    from torchvision.datasets.utils import download_and_extract_archive
    if not (raw / "tiny-imagenet-200" / "wnids.txt").is_file():
        download_and_extract_archive(TINY_IMAGENET_URL, str(raw), md5=TINY_IMAGENET_MD5)
    return raw


def _l2l():
    try:
        import learn2learn
    except ImportError as e:
        raise DataError(f"downloading this dataset needs learn2learn ({e}); install it "
                        "(scripts/install_learn2learn.sh) or download the files by hand, see "
                        "datasets/README.md") from None
    return learn2learn


def _fetch_mini(raw: Path) -> Path:
    l2l = _l2l()
    for mode in ("train", "validation", "test"):
        l2l.vision.datasets.MiniImagenet(str(raw), mode=mode, download=True)
    return raw


def _fetch_tiered(raw: Path) -> Path:
    l2l = _l2l()
    for mode in ("train", "validation", "test"):
        l2l.vision.datasets.TieredImagenet(str(raw), mode=mode, download=True)
    return raw


FETCHERS: Dict[str, Callable[[Path], Path]] = {
    "omniglot": _fetch_omniglot,
    "cifar10": _fetch_cifar10,
    "cifar100": _fetch_cifar100,
    "cifar-fs": _fetch_cifar100,  # CIFAR-FS / FC100 are class splits of the CIFAR-100 files
    "fc100": _fetch_cifar100,
    "tiny-imagenet": _fetch_tiny,
    "mini-imagenet": _fetch_mini,
    "tiered-imagenet": _fetch_tiered,
}


def fetch(name: str, dataset_dir: Path, raw_dir: Optional[Path] = None) -> Path:
    """Download ``name``'s official files into ``raw_dir`` (default ``dataset_dir/raw``) and
    return the path to convert from."""
    if name not in FETCHERS:
        raise DataError(f"dataset '{name}' has no downloader; known: {', '.join(sorted(FETCHERS))}")
    raw = Path(raw_dir) if raw_dir is not None else Path(dataset_dir) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    try:
        return FETCHERS[name](raw)
    except DataError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        raise DataError(f"downloading {name} into {raw} failed ({type(e).__name__}: {e}); check "
                        f"the network, or download by hand as datasets/{name}/README.md "
                        "explains and run `fewshot data prepare "
                        f"{name} --from PATH`") from None

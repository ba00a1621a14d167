"""Standard MNIST (60k train / 10k test) from a data dir: ``mnist.npz`` or the four IDX files.

``load(data_dir)`` looks for, in order: ``mnist.npz`` (keys ``x_train``,
``y_train``, ``x_test``, ``y_test``, uint8), the IDX files (``train-images-idx3-ubyte``
…, optionally ``.gz``); if none is there and ``download_missing``, it downloads the
gzipped IDX files (one process at a time per data dir: the ranks of a job share it) and
checks each one's SHA-256 before using it. :func:`default_data_dir` is where the job looks
when it is given none: the repository ships ``examples/mnist/data/mnist.npz``, so a checkout
works offline; an installed package downloads once into the user's cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import os
import struct
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# SHA-256 of the standard gzipped IDX files.
FILES = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
ENV_DATA_DIR = "TORCHLOOM_MNIST_DIR"
# this file is src/torchloom/examples/mnist/mnist_data.py in a checkout
CHECKOUT_DATA = Path(__file__).resolve().parents[4] / "examples" / "mnist" / "data"


def default_data_dir() -> Path:
    """Where MNIST is read from when the job is given no ``--data-dir``.

    In order: ``$TORCHLOOM_MNIST_DIR``; the checkout's ``examples/mnist/data`` when this
    package runs from a torchloom checkout (``pip install -e``) that has ``mnist.npz``; else
    ``$XDG_CACHE_HOME/torchloom/mnist`` (``~/.cache/torchloom/mnist``), where :func:`load`
    downloads it the first time.
    """
    if os.environ.get(ENV_DATA_DIR):
        return Path(os.environ[ENV_DATA_DIR]).expanduser()
    if (CHECKOUT_DATA / "mnist.npz").exists():
        return CHECKOUT_DATA
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "torchloom" / "mnist"


class DataError(Exception):
    """MNIST is not in the data dir and could not be downloaded, or a file is corrupt."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a uint8 array of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(data_dir: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (data_dir / name).exists():
            return data_dir / name
    return None


def download(data_dir: Path, *, timeout_s: float = 30.0) -> None:
    """Download the four gzipped IDX files, verifying each SHA-256.

    Raises:
        DataError: no mirror served a file with the expected checksum.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with _locked(data_dir / ".download.lock"):
        for name, digest in FILES.items():
            _download_one(data_dir, name, digest, timeout_s=timeout_s)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process at a time (the other ranks wait, then find the files there)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_one(data_dir: Path, name: str, digest: str, *, timeout_s: float) -> None:
    target = data_dir / name
    if target.exists() and sha256(target) == digest:
        return
    errors = []
    tmp = target.with_suffix(".part")
    for mirror in MIRRORS:
        try:
            with (
                urllib.request.urlopen(mirror + name, timeout=timeout_s) as resp,
                open(tmp, "wb") as out,
            ):
                out.write(resp.read())
        except OSError as exc:
            errors.append(f"{mirror}: {exc}")
            continue
        if sha256(tmp) != digest:
            tmp.unlink(missing_ok=True)
            errors.append(f"{mirror}: checksum mismatch")
            continue
        tmp.replace(target)
        return
    raise DataError(f"could not download {name}: " + "; ".join(errors))


STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def present(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds MNIST: ``mnist.npz`` or all four IDX files (not checked)."""
    data_dir = Path(data_dir)
    return (data_dir / "mnist.npz").exists() or all(_find_idx(data_dir, s) for s in STEMS)


def load(data_dir: Path, *, download_missing: bool = True) -> Arrays:
    """``(x_train [60000,28,28] uint8, y_train [60000] uint8, x_test [10000,28,28] uint8, y_test [10000] uint8)``.

    Raises:
        DataError: not found (and not downloadable), or of the wrong shape.
    """
    data_dir = Path(data_dir)
    npz = data_dir / "mnist.npz"
    if npz.exists():
        with np.load(npz) as d:
            arrays: Arrays = (d["x_train"], d["y_train"], d["x_test"], d["y_test"])
    else:
        paths = [_find_idx(data_dir, s) for s in STEMS]
        if any(p is None for p in paths):
            if not download_missing:
                raise DataError(f"no mnist.npz or IDX files in {data_dir}")
            download(data_dir)
            paths = [_find_idx(data_dir, s) for s in STEMS]
        x_tr, y_tr, x_te, y_te = (read_idx(p) for p in paths if p is not None)
        arrays = (x_tr, y_tr, x_te, y_te)
    x_tr, y_tr, x_te, y_te = arrays
    if (
        x_tr.shape != (60000, 28, 28)
        or y_tr.shape != (60000,)
        or x_te.shape != (10000, 28, 28)
        or y_te.shape != (10000,)
    ):
        raise DataError(f"unexpected MNIST shapes {[a.shape for a in arrays]} in {data_dir}")
    return arrays

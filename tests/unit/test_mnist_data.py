import gzip
import hashlib
import multiprocessing
import struct

import numpy as np
import pytest

from tests.helpers import REPO, mnist_dir
from torchloom.examples.mnist import mnist_data


def write_idx(path, arr):
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if str(path).endswith(".gz"):
        path.write_bytes(gzip.compress(data, compresslevel=1))
    else:
        path.write_bytes(data)


def test_shipped_npz_is_the_standard_mnist():
    x_tr, y_tr, x_te, y_te = mnist_data.load(mnist_dir(), download_missing=False)
    assert x_tr.shape == (60000, 28, 28) and x_te.shape == (10000, 28, 28)
    assert x_tr.dtype == np.uint8 and set(np.unique(y_tr)) == set(range(10))
    assert np.bincount(y_te).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_idx_files_plain_and_gzipped(tmp_path):
    x_tr, y_tr, x_te, y_te = mnist_data.load(mnist_dir(), download_missing=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", x_tr)
    write_idx(tmp_path / "train-labels-idx1-ubyte", y_tr)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x_te)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y_te)
    a = mnist_data.load(tmp_path, download_missing=False)
    assert np.array_equal(a[0], x_tr) and np.array_equal(a[3], y_te)


def test_missing_data_offline_is_a_clear_error(tmp_path):
    with pytest.raises(mnist_data.DataError, match=r"no mnist\.npz"):
        mnist_data.load(tmp_path, download_missing=False)


def test_download_rejects_a_bad_checksum(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    for name in mnist_data.FILES:
        (served / name).write_bytes(b"not mnist")
    monkeypatch.setattr(mnist_data, "MIRRORS", (served.as_uri() + "/",))
    with pytest.raises(mnist_data.DataError, match="checksum mismatch"):
        mnist_data.download(tmp_path / "data")
    assert not any((tmp_path / "data").glob("*.gz"))


def test_wrong_shapes_are_refused(tmp_path):
    np.savez(
        tmp_path / "mnist.npz",
        x_train=np.zeros((5, 28, 28), np.uint8),
        y_train=np.zeros(5, np.uint8),
        x_test=np.zeros((5, 28, 28), np.uint8),
        y_test=np.zeros(5, np.uint8),
    )
    with pytest.raises(mnist_data.DataError, match="unexpected MNIST shapes"):
        mnist_data.load(tmp_path)


def _load_from(data_dir, mirrors, files):
    mnist_data.MIRRORS, mnist_data.FILES = mirrors, files
    return [a.shape for a in mnist_data.load(data_dir)]


def test_ranks_download_once_into_a_shared_dir_and_load_it(tmp_path):
    """Four processes (the ranks of a job) load from an empty data dir at once: the files are
    downloaded from the mirror, checked against their SHA-256 and read by every one."""
    x_tr, y_tr, x_te, y_te = mnist_data.load(mnist_dir(), download_missing=False)
    served = tmp_path / "served"
    served.mkdir()
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    stems += ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    files = {}
    for stem, arr in zip(stems, (x_tr, y_tr, x_te, y_te), strict=True):
        write_idx(served / f"{stem}.gz", arr)
        files[f"{stem}.gz"] = hashlib.sha256((served / f"{stem}.gz").read_bytes()).hexdigest()
    target = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(4) as pool:
        shapes = pool.starmap(_load_from, [(target, (served.as_uri() + "/",), files)] * 4)
    assert shapes == [[(60000, 28, 28), (60000,), (10000, 28, 28), (10000,)]] * 4
    assert sorted(p.name for p in target.glob("*.gz")) == sorted(files)
    assert not list(target.glob("*.part"))


def test_default_data_dir(tmp_path, monkeypatch):
    """$TORCHLOOM_MNIST_DIR first; from a checkout its examples/mnist/data; else the cache."""
    monkeypatch.setenv(mnist_data.ENV_DATA_DIR, str(tmp_path / "mine"))
    assert mnist_data.default_data_dir() == tmp_path / "mine"
    monkeypatch.delenv(mnist_data.ENV_DATA_DIR)
    assert mnist_data.default_data_dir() == REPO / "examples" / "mnist" / "data"
    monkeypatch.setattr(mnist_data, "CHECKOUT_DATA", tmp_path / "no-checkout")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mnist_data.default_data_dir() == tmp_path / "xdg" / "torchloom" / "mnist"

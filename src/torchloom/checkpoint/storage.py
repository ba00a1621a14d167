"""Where a job's checkpoints live: a local directory or any fsspec URL (``s3://bucket/prefix``
through s3fs, ``gs://``, …), with DCP's writer and reader for it.

A local directory uses DCP's ``FileSystemWriter``/``FileSystemReader``; a URL uses DCP's fsspec
ones. Credentials and endpoints come from the usual places of the filesystem (for S3: the
``AWS_*`` environment variables, ``AWS_ENDPOINT_URL`` for an S3-compatible server) or from
``options`` (passed to ``fsspec``).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Mapping
from typing import Any

import fsspec
from torch.distributed.checkpoint._extension import ZStandard
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter


class Store:
    """A checkpoint storage root.

    Args:
        root: a local directory or an fsspec URL.
        options: keyword options of the URL's filesystem (``fsspec.url_to_fs``), e.g.
            ``{"endpoint_url": ...}`` for s3fs.

    Raises:
        ValueError: the URL's protocol is unknown to fsspec.
        ImportError: its filesystem's package is not installed (``s3fs`` for ``s3://``).
    """

    def __init__(self, root: str | os.PathLike[str], *, options: Mapping[str, Any] | None = None):
        self.url = os.fspath(root)
        self.remote = "://" in self.url and not self.url.startswith("file://")
        self.options = dict(options or {})
        self.fs, self.root = fsspec.url_to_fs(self.url, **self.options)

    def path(self, *parts: str) -> str:
        """``root/part/…`` in the filesystem's own terms (no protocol)."""
        return posixpath.join(self.root, *parts)

    def display(self, path: str) -> str:
        """``path`` as a person (and the registry) names it: with its protocol when remote."""
        return str(self.fs.unstrip_protocol(path)) if self.remote else path

    def writer(self, path: str, *, compress: bool) -> StorageWriter:
        """DCP's writer for a checkpoint at ``path`` (zstd-compressed files when asked)."""
        ext = [ZStandard()] if compress else None
        if self.remote:
            return FsspecWriter(self.fs.unstrip_protocol(path), _extensions=ext, **self.options)
        self.fs.makedirs(path, exist_ok=True)
        return FileSystemWriter(path, _extensions=ext)

    def reader(self, path: str) -> StorageReader:
        """DCP's reader for the checkpoint at ``path``."""
        if self.remote:
            return FsspecReader(self.fs.unstrip_protocol(path), **self.options)
        return FileSystemReader(path)

    def files(self, path: str, pattern: str) -> list[str]:
        """The files in ``path`` whose names match ``pattern`` (glob), sorted; listed anew
        (an object store's client caches listings, and other ranks write beside us)."""
        self.fs.invalidate_cache(path)
        return sorted(str(p) for p in self.fs.glob(posixpath.join(path, pattern)))

    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache(posixpath.dirname(path))
        return bool(self.fs.exists(path))

    def size(self, path: str) -> int:
        return int(self.fs.size(path))

    def sha256(self, path: str) -> str:
        """SHA-256 of a file's content (read once, in 1 MiB pieces)."""
        h = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def remove(self, path: str) -> None:
        """Remove a checkpoint's directory and everything in it (nothing there: no error)."""
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def copy(self, path: str, dest: Store, dest_path: str) -> int:
        """Copy the checkpoint at ``path`` to ``dest_path`` of ``dest``; the bytes copied."""
        total = 0
        for src in self.fs.find(path):
            rel = posixpath.relpath(src, path)
            target = posixpath.join(dest_path, rel)
            dest.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            with self.fs.open(src, "rb") as fi, dest.fs.open(target, "wb") as fo:
                while chunk := fi.read(1 << 20):
                    fo.write(chunk)
                    total += len(chunk)
        return total

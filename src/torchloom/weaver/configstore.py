"""The jobs' desired configs in the ``loom_config`` KV bucket, as this Weaver wrote them.

Every write is a compare-and-set on the revision this Weaver last wrote or read, so it never
overwrites a document it has not seen. A write by anything else — another Weaver that took
the lease, or a foreign writer (anyone may on a non-secure local NATS; a bug could) — is
noticed twice: by the next compare-and-set, which fails, and at once by :meth:`is_own`
on the bucket's subject, which the Weaver watches like the ranks do. What to do about it is
the Weaver's decision (:func:`torchloom.weaver.control.restore`).
"""

from __future__ import annotations

from torchloom.protocol import DesiredConfig, encode, names
from torchloom.transport import KeyValue


class ConfigStore:
    """This Weaver's view of the config bucket: revision and bytes of each job's document.

    Args:
        kv: the ``loom_config`` bucket.
    """

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv
        self.revisions: dict[str, int] = {}
        """Revision of each job's key as this Weaver last read or wrote it."""
        self._written: dict[str, bytes] = {}

    def loaded(self, job_id: str, raw: bytes, revision: int) -> None:
        """Take a document read at start as this Weaver's own."""
        self.revisions[job_id] = revision
        self._written[job_id] = raw

    def is_own(self, job_id: str, data: bytes) -> bool:
        """Whether ``data``, seen on the job's KV subject, is what this Weaver wrote last
        (a False may still be its own write, seen late: :meth:`current` tells for sure)."""
        return self._written.get(job_id) == data

    async def write(self, doc: DesiredConfig, *, revision: int | None = None) -> int:
        """Store ``doc`` if the key is still at ``revision`` (default: the one last seen).

        Returns:
            The new revision, once the server acknowledged the write (it is on disk).

        Raises:
            ConflictError: someone else wrote the key since.
            NotReachableError: the write was not acknowledged.
        """
        raw = encode(doc)
        self._written[doc.job_id] = raw  # before the write: its echo may come before the ack
        expected = self.revisions.get(doc.job_id, 0) if revision is None else revision
        self.revisions[doc.job_id] = await self.kv.update(
            names.config_key(doc.job_id), raw, revision=expected
        )
        return self.revisions[doc.job_id]

    async def landed(self, job_id: str, tried: list[bytes]) -> int | None:
        """Which of the documents in ``tried`` — writes of ``job_id``'s config that were not
        acknowledged — is the key's value now, if one is: the write landed, its
        acknowledgement was lost. That one becomes this store's own (its revision is the
        key's); None when none of them is there.

        Raises:
            NotReachableError: the server did not answer.
        """
        raw, revision = await self.current(job_id)
        if raw is None or raw not in tried:
            return None
        self.revisions[job_id] = revision
        self._written[job_id] = raw
        return tried.index(raw)

    async def current(self, job_id: str) -> tuple[bytes | None, int]:
        """The key's document now and its revision (``None`` for a deleted key).

        Raises:
            NotReachableError: the server did not answer.
        """
        return await self.kv.get_entry(names.config_key(job_id), consistent=True)

    def foreign(self, revision: int, job_id: str) -> bool:
        """Whether ``revision`` of the job's key was written by someone else."""
        return revision != self.revisions.get(job_id, 0)

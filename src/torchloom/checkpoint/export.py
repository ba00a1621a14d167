"""A checkpoint's model weights as one safetensors file, for use outside training."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from torchloom.checkpoint.storage import Store


def export_safetensors(
    directory: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    key: str = "model",
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, list[int]]:
    """Write the tensors of ``state[key]`` of a DCP checkpoint as one safetensors file (the
    consolidated weights: ``safetensors.torch.load_file`` then ``model.load_state_dict``).
    Reads the whole checkpoint into CPU memory once (a remote one is copied to a temporary
    directory first).

    Args:
        directory: the checkpoint's directory (DCP's ``.metadata`` and ``.distcp`` files), a
            local path or an fsspec URL.
        out: the file to write.
        key: the entry of the Checkpointer's ``state`` to export (``"model"``).
        storage_options: keyword options of the URL's filesystem.

    Returns:
        The shape of every tensor written, by name.

    Raises:
        FileNotFoundError: no checkpoint in ``directory``.
        KeyError: the checkpoint has no ``key`` entry, or no tensor under it.
    """
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    store = Store(directory, options=storage_options)
    if not store.exists(store.path(".metadata")):
        raise FileNotFoundError(f"no checkpoint in {store.url} (no .metadata)")
    with tempfile.TemporaryDirectory(prefix="torchloom-export-") as tmp:
        src = store.root
        if store.remote:
            src = os.path.join(tmp, "checkpoint")
            store.copy(store.root, Store(src), src)
        whole = Path(tmp) / "whole.pt"
        dcp_to_torch_save(src, whole)
        sd = torch.load(whole, map_location="cpu", weights_only=False)
    part = sd.get(key)
    tensors = (
        {k: v.detach().contiguous() for k, v in part.items() if isinstance(v, torch.Tensor)}
        if isinstance(part, dict)
        else {}
    )
    if not tensors:
        raise KeyError(f"the checkpoint has no tensors under {key!r} (entries: {sorted(sd)})")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata={"source": store.url, "key": key})
    return {k: list(v.shape) for k, v in tensors.items()}

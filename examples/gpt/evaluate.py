"""The GPT job's evaluator: scores each complete checkpoint on the held-out split, apart from the
training ranks, and reports ``eval_loss`` / ``eval_perplexity`` to the checkpoint's registry
entry (``torchloom checkpoint list``, the dashboard's eval chart, a ``checkpoint_evaluated``
history event).

    torchloom run --replicas 1 --nproc-per-group 2 --job gpt \\
        --evaluator "python examples/gpt/evaluate.py" -- \\
        python examples/gpt/train.py --checkpoint-dir runs/gpt-ckpt

It takes the training script's model and data flags (``--layers``, ``--context``, …: give it the
ones you gave the job) and needs no process group: DCP reads every rank's shards (DDP or FSDP2)
into one unsharded model. It ends when the job's ranks are gone and every complete checkpoint
was scored.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import GPT, GPTConfig
from train import evaluate, parse_args

import torchloom.evaluator
from torchloom.protocol import CheckpointRecord


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # DCP says it loads "in a single process" each time: that is the point here
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    args = parse_args(argv)
    config = GPTConfig(layers=args.layers, heads=args.heads, d_model=args.d_model,
                       context=args.context)  # fmt: skip
    text = torch.frombuffer(bytearray(args.corpus.read_bytes()), dtype=torch.uint8).long()
    held_out = text[len(text) * 9 // 10 :]  # the training script's split
    model = GPT(config)

    def score(rec: CheckpointRecord) -> dict[str, float]:
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=rec.storage, no_dist=True)  # the shards of every rank
        model.load_state_dict(state["model"])
        loss = evaluate(model, held_out, args)
        return {"eval_loss": loss, "eval_perplexity": math.exp(loss)}

    scored = torchloom.evaluator.watch(args.job_id, score)
    print(f"gpt evaluator: {len(scored)} checkpoint(s) scored")


if __name__ == "__main__":
    main()

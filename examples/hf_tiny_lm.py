"""A tiny causal language model trained with the Hugging Face ``Trainer``, steered by torchloom.

No downloads: the model is a 2-layer GPT-2 built from a config (about 0.2 M parameters),
the tokens are bytes (vocabulary 256, no tokenizer), the text is the Book of Genesis shipped
in ``examples/data/kjv-genesis.txt``. The one added line is the callback::

    pip install -e '.[transformers]'
    torchloom up &
    torchrun --nproc-per-node=2 examples/hf_tiny_lm.py --max-steps 400
    torchloom set lr=0.0005 grad_clip=0.5      # the schedule is rescaled around the new peak

Each rank writes ``<out-dir>/rank<r>.json`` at the end: the learning rate and
``max_grad_norm`` its Trainer ran with at every change (seen from the Trainer's own optimizer
and arguments), the Trainer's log history, the last step and a digest of the weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from torchloom.integrations.transformers import TorchloomCallback

CORPUS = Path(__file__).resolve().parent / "data" / "kjv-genesis.txt"


class ByteChunks(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """The corpus as overlapping windows of ``context`` bytes: ``input_ids`` = ``labels``
    (``[context] int64``; the model shifts the labels itself)."""

    def __init__(self, text: bytes, *, context: int) -> None:
        self.data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        self.context = context

    def __len__(self) -> int:
        return (len(self.data) - 1) // (self.context // 2) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.data[i * (self.context // 2) : i * (self.context // 2) + self.context]
        return {"input_ids": ids, "labels": ids}


class Seen(TrainerCallback):  # type: ignore[misc]
    """Records the schedule's peak lr (its ``base_lrs``) and ``max_grad_norm`` that the
    Trainer's own objects hold, at every change."""

    def __init__(self, delay_ms: float) -> None:
        self.seen: list[tuple[int, float, float]] = []
        self.delay_ms = delay_ms

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        lr = kw["lr_scheduler"].base_lrs[0]
        if not self.seen or self.seen[-1][1:] != (lr, args.max_grad_norm):
            self.seen.append((state.global_step, lr, args.max_grad_norm))
        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)  # tests: time to steer a short run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=16, help="per rank")
    ap.add_argument("--context", type=int, default=64, help="bytes per sample")
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--out-dir", type=Path, default=Path("runs/hf_tiny_lm"))
    ap.add_argument("--step-delay-ms", type=float, default=0.0)
    ap.add_argument("--no-torchloom", action="store_true", help="the same run without the callback")
    args = ap.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256, n_positions=args.context, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=10, eos_token_id=10,  # byte-level: newline ends a verse
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    train = ByteChunks(CORPUS.read_bytes(), context=args.context)
    targs = TrainingArguments(
        output_dir=str(args.out_dir / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=20,
        max_grad_norm=args.grad_clip,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    seen = Seen(args.step_delay_ms)
    torchloom_cb = None if args.no_torchloom else TorchloomCallback()  # the one added line
    callbacks = [seen] + ([torchloom_cb] if torchloom_cb else [])
    trainer = Trainer(model=model, args=targs, train_dataset=train, callbacks=callbacks)
    trainer.train()

    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().numpy().tobytes())
    summary = {
        "rank": targs.process_index,
        "step": trainer.state.global_step,
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "max_grad_norm": targs.max_grad_norm,
        "seen": seen.seen,
        "log_history": trainer.state.log_history,
        "params_sha256": digest.hexdigest(),
        "stop_reason": torchloom_cb.run.stop_reason if torchloom_cb and torchloom_cb.run else None,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"rank{targs.process_index}.json").write_text(json.dumps(summary))
    if torch.distributed.is_initialized():
        # the Trainer (accelerate) starts the process group and leaves it: gloo's threads
        # still running at interpreter exit abort the process ("terminate called …", -6)
        torch.distributed.barrier()  # no rank tears down while another is in a collective
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

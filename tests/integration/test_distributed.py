"""gather_with_grad on 2 gloo ranks under DDP: the pairwise loss and its gradients equal the
single-process full-batch ones (and the loss on each rank's shard alone does not)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchloom.distributed import gather_with_grad, pairwise_distance_loss

pytestmark = pytest.mark.integration
WORLD, BATCH = 2, 12


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 8, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def rank_main(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        net = torch.nn.parallel.DistributedDataParallel(model())
        x, y = data()
        shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        emb = net(x[shard])
        gathered_y = gather_with_grad(y[shard])
        loss = pairwise_distance_loss(gather_with_grad(emb), gathered_y)
        loss.backward()
        alone = pairwise_distance_loss(net(x[shard]), y[shard])  # the shard only, for contrast
        torch.save(
            {
                "loss": loss.detach(),
                "alone": alone.detach(),
                "labels": gathered_y,
                "grads": [p.grad.clone() for p in net.parameters()],
            },
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_pairwise_loss_and_gradients_on_two_ranks_equal_the_full_batch(tmp_path: Path) -> None:
    mp.spawn(rank_main, args=(f"file://{tmp_path}/store", str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    net = model()
    x, y = data()
    full = pairwise_distance_loss(net(x), y)
    full.backward()
    for r in ranks:
        assert torch.equal(r["labels"], y)  # integer tensors gathered in rank order
        assert torch.allclose(r["loss"], full.detach(), atol=1e-6)
        for got, want in zip(r["grads"], net.parameters(), strict=True):
            assert torch.allclose(got, want.grad, atol=1e-6, rtol=1e-5)
    # without the gather each rank sees a different loss: the test can tell them apart
    assert not torch.allclose(ranks[0]["alone"], full.detach(), atol=1e-4)


def test_one_process_gets_its_tensor_back() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x

"""Two gloo processes, each holding part of a batch, against one process holding all of it.

The losses score local queries against candidates gathered with `gather_with_grad`. DDP averages the loss and the
gradients over ranks; these tests do that averaging by hand and require the single-process loss and gradients on
the concatenated batch, with no world-size rescaling anywhere.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from unime.distributed import gather_with_grad, local_offset, rank, world_size
from unime.losses import info_nce, unime_hard_negative_loss

WORLD = 2
BATCH, NEGATIVES, DIM = 6, 2, 8
# Rows per rank: an even split (what DDP sees every step) and an uneven one (a short last batch).
SPLITS = {"even": (3, 3), "uneven": (4, 2)}
LOSS_FNS = {"info_nce": info_nce, "unime_hard_negative": unime_hard_negative_loss}
LOSS_KWARGS = {"temperature": 0.05, "margin": 0.1, "k": 5}


def full_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed batch both set-ups see: queries, positives near them, unrelated negatives (float64)."""
    generator = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64), dim=-1)
    noise = torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64)
    positive = F.normalize(query + 0.6 * noise, dim=-1)
    negatives = F.normalize(torch.randn(BATCH, NEGATIVES, DIM, generator=generator, dtype=torch.float64), dim=-1)
    return query, positive, negatives


def kwargs_for(loss_name: str) -> dict:
    return LOSS_KWARGS if loss_name == "unime_hard_negative" else {"temperature": LOSS_KWARGS["temperature"]}


def rows_of(split: tuple[int, ...], r: int) -> slice:
    start = sum(split[:r])
    return slice(start, start + split[r])


def join_gloo_group(r: int, port: int, world: int = WORLD) -> None:
    """Make this process rank `r` of a local gloo group of `world` processes (one torch thread each)."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=r, world_size=world, timeout=timedelta(seconds=60))


def _worker(r: int, port: int, out_dir: str) -> None:
    """One rank: compute every case on its rows, average like DDP, save what the parent checks."""
    join_gloo_group(r, port)
    try:
        results: dict = {"rank": rank(), "world_size": world_size()}
        full = full_batch()
        for split_name, split in SPLITS.items():
            mine = rows_of(split, r)
            for loss_name, loss_fn in LOSS_FNS.items():
                for with_negatives in (False, True):
                    leaves = [x[mine].clone().requires_grad_(True) for x in full]
                    query, positive, negatives = leaves
                    loss = loss_fn(query, positive, negatives if with_negatives else None, **kwargs_for(loss_name))
                    # DDP averages over ranks; a rank's mean over its rows must weigh by its share of the batch so
                    # that the average is the mean over the whole batch (a no-op, 1.0, for the even split).
                    scaled = loss * split[r] * WORLD / BATCH
                    scaled.backward()
                    averaged_loss = scaled.detach().clone()
                    dist.all_reduce(averaged_loss)
                    averaged_loss /= WORLD
                    grads = []
                    for leaf, whole in zip(leaves, full, strict=True):
                        # The rows are this rank's "parameters": put its gradient in place, all-reduce, average.
                        grad = torch.zeros_like(whole)
                        if leaf.grad is not None:
                            grad[mine] = leaf.grad
                        dist.all_reduce(grad)
                        grads.append(grad / WORLD)
                    results[(split_name, loss_name, with_negatives)] = {"loss": averaged_loss, "grads": grads}

        # gather_with_grad alone, on unequal shards: rank 0 holds 3 rows, rank 1 holds 1.
        sizes = (3, 1)
        data = torch.arange(4 * 3, dtype=torch.float64).reshape(4, 3)
        local = data[rows_of(sizes, r)].clone().requires_grad_(True)
        gathered = gather_with_grad(local)
        # Each rank's loss weighs the gathered rows differently; each rank must get the sum of all ranks' weights.
        weights = torch.randn(4, 3, generator=torch.Generator().manual_seed(100 + r), dtype=torch.float64)
        (gathered * weights).sum().backward()
        results["gather"] = {
            "gathered": gathered.detach(),
            "offset": local_offset(sizes[r]),
            "grad": local.grad,
        }
        torch.save(results, Path(out_dir) / f"rank{r}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    """Run both ranks once for the whole module and load what each saved."""
    out_dir = tmp_path_factory.mktemp("distributed")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_know_who_they_are(rank_results):
    assert [(res["rank"], res["world_size"]) for res in rank_results] == [(0, 2), (1, 2)]
    # And without a process group: one rank.
    assert (rank(), world_size()) == (0, 1)


@pytest.mark.parametrize("with_negatives", [False, True])
@pytest.mark.parametrize("loss_name", list(LOSS_FNS))
@pytest.mark.parametrize("split_name", list(SPLITS))
def test_two_ranks_match_one_process_on_the_concatenated_batch(rank_results, split_name, loss_name, with_negatives):
    leaves = [x.clone().requires_grad_(True) for x in full_batch()]
    query, positive, negatives = leaves
    loss = LOSS_FNS[loss_name](query, positive, negatives if with_negatives else None, **kwargs_for(loss_name))
    loss.backward()
    for res in rank_results:
        case = res[(split_name, loss_name, with_negatives)]
        torch.testing.assert_close(case["loss"], loss.detach(), rtol=1e-12, atol=1e-12)
        for name, got, leaf in zip(("query", "positive", "negatives"), case["grads"], leaves, strict=True):
            expected = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=f"{name} gradients differ")
    if with_negatives:
        # Not vacuous: the negatives really are trained.
        assert leaves[2].grad.abs().sum() > 0


def test_gather_with_grad_on_unequal_shards(rank_results):
    data = torch.arange(4 * 3, dtype=torch.float64).reshape(4, 3)
    weight_sum = sum(
        torch.randn(4, 3, generator=torch.Generator().manual_seed(100 + r), dtype=torch.float64) for r in range(WORLD)
    )
    for r, res in enumerate(rank_results):
        gathered = res["gather"]
        torch.testing.assert_close(gathered["gathered"], data)
        assert gathered["offset"] == (0, 3)[r]
        mine = rows_of((3, 1), r)
        torch.testing.assert_close(gathered["grad"], weight_sum[mine])


def test_gather_with_grad_is_identity_without_a_process_group():
    tensor = torch.randn(3, 4)
    assert gather_with_grad(tensor) is tensor
    assert local_offset(3) == 0

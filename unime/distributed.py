"""Cross-process helpers for losses: who am I, and gather candidates from every rank with exact gradients.

Every function here works in a single process too: without an initialised `torch.distributed` process group the
world is one rank, `gather_with_grad` returns its input and `local_offset` is 0, so the losses need no branches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when `torch.distributed` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of ranks in the default process group, 1 without one."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default process group, 0 without one."""
    return dist.get_rank() if is_distributed() else 0


def gather_sizes(n_local: int, device: torch.device | str = "cpu") -> list[int]:
    """The number of rows every rank holds, in rank order (a collective: every rank must call it).

    Args:
        n_local: the number of rows this rank holds.
        device: where the exchanged size tensor lives; it must suit the backend (a CUDA device for NCCL).

    Returns:
        `world_size()` integers; `[n_local]` without a process group.
    """
    if not is_distributed():
        return [n_local]
    local = torch.tensor([n_local], dtype=torch.int64, device=device)  # [1]
    sizes = [torch.zeros_like(local) for _ in range(world_size())]
    dist.all_gather(sizes, local)
    return [int(size.item()) for size in sizes]


def local_offset(n_local: int, device: torch.device | str = "cpu") -> int:
    """The index of this rank's first row in a tensor gathered by `gather_with_grad` (a collective).

    Args:
        n_local: the number of rows this rank holds.
        device: as in `gather_sizes`.

    Returns:
        The sum of the row counts of the ranks before this one; 0 without a process group.
    """
    return sum(gather_sizes(n_local, device)[: rank()])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward gives each rank the gradient of the *sum* of all ranks' losses.

    Why a Function of our own: `dist.all_gather` is not differentiable, and the common workaround (gather without
    gradient, then put the local tensor back into its own slot) gives each rank only the gradient of its own loss
    for its own rows, which is why such code multiplies the loss by the world size. It is also easy to get wrong:
    the UniME reference forgets to put the local tensor back, so no gradient flows through the candidates at all.
    Here the backward all-reduces (sums) the incoming gradient and hands each rank the slice of its own input.
    A loss computed on local queries against gathered candidates, averaged across ranks by DDP, then has exactly
    the gradients of one process on the concatenated batch, with no world-size rescaling.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        sizes = gather_sizes(tensor.shape[0], tensor.device)
        me = rank()
        ctx.start = sum(sizes[:me])
        ctx.stop = ctx.start + sizes[me]
        # all_gather needs equal shapes on every rank: pad to the largest shard, then trim each shard back.
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))  # [max_n, ...]
        padded[: tensor.shape[0]] = tensor
        shards = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(shards, padded)
        return torch.cat([shard[:size] for shard, size in zip(shards, sizes, strict=True)], dim=0)  # [N, ...]

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every rank's loss may depend on every rank's rows: sum the gradients before taking our slice.
        grad = grad_output.contiguous().clone()  # [N, ...]
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.stop]  # [n_local, ...]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from all ranks along dim 0, in rank order, differentiably (a collective).

    Ranks may hold different numbers of rows. Its backward sums the gradient over all ranks and returns each rank
    the part for its own rows (what `torch.distributed.nn.functional.all_gather` does), so every rank must run the
    backward pass too.

    Args:
        tensor: `[n_local, ...]`; the trailing shape and dtype must be the same on every rank.

    Returns:
        `[sum of n_local over ranks, ...]`; `tensor` itself without a process group.
    """
    if not is_distributed() or world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)

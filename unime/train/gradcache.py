"""GradCache: a contrastive loss over a large batch, with memory bounded by the chunk size.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup". An in-batch
contrastive loss couples every example to every other, so the batch cannot simply be split into
gradient-accumulation micro-batches: that would change the loss (fewer negatives per query). GradCache
keeps the full-batch loss and gradients, and encodes in chunks:

1. Encode every chunk without grad (no activations kept) and concatenate the embeddings of each group.
2. Make those embeddings leaves, compute the loss on them, and take d loss / d embeddings: the loss only
   needs the `[N, D]` embeddings, which are tiny next to the encoder's activations.
3. Re-encode each chunk with grad and backpropagate `(embeddings * cached_grad).sum()`, whose gradient with
   respect to the chunk's embeddings is exactly the cached one; the chain rule does the rest. Parameter
   gradients accumulate over the chunks to the full-batch gradient.

Cost: one extra forward pass (about +1/3 compute for a forward+backward step); peak activation memory
is that of one chunk instead of the whole batch.

Known problem with sharded optimisers: step 3 runs one backward pass per chunk within one optimizer step.
DeepSpeed ZeRO-2/3 partition (and reduce-scatter) gradients in hooks that expect one backward per
micro-batch, and several of them break its gradient bookkeeping: wrong or missing gradients, or errors
(sentence-transformers issues #3173 and #3531 report it with CachedMultipleNegativesRankingLoss). Single-device
and DDP training are fine (DDP through `no_sync`, below). This module does not check which
engine runs it: the training loop decides which combinations to allow.

What `encode` gives a chunk is either single vectors `[n, D]`, or a multi-vector head's token matrices with
their mask, a pair `([n, T, d], [n, T])`: each chunk pads to its own longest input, so a group's chunks are
padded to one length `T` (masked) before the loss sees them, and each chunk's cached gradient is trimmed back
to its own length. The mask carries no gradient.

Losses given to `encode_with_grad_cache` must be pure functions of the embeddings (DESIGN.md, contract 5):
parameters inside `compute_loss` (say, a learnable temperature) would get no gradient, because step 2 asks
autograd for the gradient of the embeddings only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

Features = dict[str, torch.Tensor]
# Single vectors [n, D], or token matrices [n, T, d] with their [n, T] boolean mask.
Representation = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
Encode = Callable[[Features], Representation]
ComputeLoss = Callable[[dict[str, Representation]], torch.Tensor]
Backward = Callable[[torch.Tensor], None]

T = TypeVar("T")


class RandContext:
    """Snapshot of the CPU and CUDA random number generators, replayed by `with ctx:`.

    Taken before a chunk's first (no-grad) forward pass and entered around its second (with-grad) one, so that
    dropout (and anything else random in the encoder) draws the same masks twice: otherwise the gradient of
    step 3 would belong to a different network than the embeddings the loss saw in step 1, and GradCache would
    no longer give the full-batch gradient.

    Entering forks the generators (`torch.random.fork_rng`): on exit they are back where they were before
    entering, so replaying a chunk neither rewinds nor advances the caller's random stream.

    Args:
        cuda_devices: CUDA devices whose generators to capture. Default: the current device when CUDA is
            initialised (what `accelerate` sets per process), none otherwise.
    """

    def __init__(self, cuda_devices: Sequence[int | torch.device] | None = None) -> None:
        if cuda_devices is None:
            cuda_devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        self.cuda_devices = [_cuda_index(device) for device in cuda_devices]
        self.cpu_state = torch.get_rng_state()
        self.cuda_states = [torch.cuda.get_rng_state(device) for device in self.cuda_devices]
        self._fork: AbstractContextManager | None = None

    def __enter__(self) -> RandContext:
        if self._fork is not None:
            raise RuntimeError("RandContext is not re-entrant: exit it before entering it again")
        self._fork = torch.random.fork_rng(devices=self.cuda_devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        for device, state in zip(self.cuda_devices, self.cuda_states, strict=True):
            torch.cuda.set_rng_state(state, device)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        fork, self._fork = self._fork, None
        assert fork is not None
        fork.__exit__(*exc_info)


def _cuda_index(device: int | torch.device) -> int:
    if isinstance(device, int):
        return device
    if device.type != "cuda":
        raise ValueError(f"RandContext captures CUDA generators; got device {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


def split_into_chunks(items: Sequence[T], chunk_size: int | None) -> list[list[T]]:
    """Consecutive chunks of at most `chunk_size` items (the last one may be shorter).

    `chunk_size=None` gives the whole sequence as one chunk (GradCache off); an empty sequence gives no chunk.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    items = list(items)
    if not items:
        return []
    if chunk_size is None:
        return [items]
    return [items[start : start + chunk_size] for start in range(0, len(items), chunk_size)]


def encode_with_grad_cache(
    encode: Encode,
    chunks: Mapping[str, Sequence[Features]],
    compute_loss: ComputeLoss,
    backward: Backward = torch.Tensor.backward,
    no_sync: Callable[[], AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Compute a contrastive loss over all chunks and backpropagate it into the encoder, one chunk at a time.

    Parameter gradients equal those of `encode_without_cache` on the same chunks (and, when the encoder is
    deterministic, on the whole batch at once); peak activation memory is that of the largest chunk.

    Args:
        encode: features of one chunk -> embeddings `[n, D]` (e.g. `embedder.embed`), or token matrices and
            their mask `([n, T, d], [n, T])` (e.g. `embedder.embed_multi_vector`), with grad when grad is on.
        chunks: group name (`"query"`, `"positive"`, `"negatives"`, ...) -> that group's feature chunks, in
            order. Each group's embeddings reach `compute_loss` concatenated in this order.
        compute_loss: group name -> `[N_g, D]` embeddings (or `([N_g, T_g, d], [N_g, T_g])` token matrices
            padded to the group's longest chunk) of the whole group -> scalar loss. It may contain a
            differentiable all_gather: every rank runs it exactly once per call.
        backward: how to backpropagate a scalar, e.g. `accelerator.backward` (which applies loss scaling and
            gradient-accumulation division; it is called once per chunk, on the surrogate of step 3).
        no_sync: DDP's `no_sync` (e.g. `lambda: accelerator.no_sync(model)`): all chunk backward passes but the
            last run inside it, so gradients are all-reduced once, after they have all accumulated.

    Several backward passes per optimizer step: not for DeepSpeed ZeRO-2/3 (see the module docstring).

    Returns:
        The loss, detached: its graph starts at the cached leaves and has been consumed already, so the
        caller can only log it; keeping it attached would also keep the loss graph (and, with a gathered
        loss, the gathered embeddings) alive until the caller drops it.
    """
    _check_chunks(chunks)

    # Step 1: embeddings of every chunk without grad; RNG recorded before each chunk so step 3 can replay it.
    rand_contexts: dict[str, list[RandContext]] = {}
    cached: dict[str, list[Representation]] = {}
    with torch.no_grad():
        for group, group_chunks in chunks.items():
            rand_contexts[group], cached[group] = [], []
            for features in group_chunks:
                rand_contexts[group].append(RandContext())
                cached[group].append(_detach(_check_embeddings(encode(features), group)))  # [n, D] or pair

    # Step 2: the loss on leaf embeddings, and its gradient with respect to them. autograd.grad (not
    # `backward`) so that the cached gradients are the plain d loss / d embeddings: loss scaling and
    # accumulation division happen once, in `backward` of step 3, not twice.
    # Every rank must run this step once per call, in step: the loss may all_gather the embeddings (a
    # collective), and the backward of that gather inside autograd.grad is another one.
    leaves = {group: _concat(parts) for group, parts in cached.items()}  # [N_g, D] or ([N_g, T_g, d], mask)
    differentiable = [_values(leaf).requires_grad_(True) for leaf in leaves.values()]
    with torch.enable_grad():
        loss = compute_loss(leaves)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError(f"compute_loss must return a scalar tensor, got {_describe(loss)}")
        # materialize_grads: a group the loss ignores gets zero gradients, and every chunk still runs one
        # backward, so the number of backward and no_sync calls does not depend on the loss.
        grads = torch.autograd.grad(loss, differentiable, materialize_grads=True)
    cached_grads = {
        group: [
            # A chunk's token matrices were padded to the group's length: its gradient is trimmed back.
            chunk_grad[:, : _values(part).shape[1]] if chunk_grad.dim() == 3 else chunk_grad  # [n, D] / [n, T, d]
            for part, chunk_grad in zip(
                cached[group], grad.split([_values(part).shape[0] for part in cached[group]]), strict=True
            )
        ]
        for group, grad in zip(leaves, grads, strict=True)
    }
    del differentiable
    del leaves, cached

    # Step 3: re-encode each chunk with grad under its recorded RNG and push the cached gradient through it.
    total = sum(len(group_chunks) for group_chunks in chunks.values())
    position = 0
    for group, group_chunks in chunks.items():
        for features, rand_context, grad in zip(group_chunks, rand_contexts[group], cached_grads[group], strict=True):
            position += 1
            # DDP all-reduces gradients in every backward outside no_sync: only the last one needs to.
            sync = no_sync is None or position == total
            with rand_context, contextlib.nullcontext() if sync else no_sync():
                embeddings = _values(_check_embeddings(encode(features), group))  # [n, D] or [n, T, d]
                if embeddings.shape != grad.shape:
                    raise RuntimeError(
                        f"chunk {position} of group {group!r} gave embeddings of shape {tuple(embeddings.shape)} "
                        f"when re-encoded, but {tuple(grad.shape)} the first time: encode must be deterministic "
                        "given the RNG state"
                    )
                # A scalar whose gradient with respect to `embeddings` is `grad` (what `backward` needs, since
                # accelerate's backward takes a loss, not grad_tensors).
                surrogate = (embeddings * grad.to(embeddings.dtype)).sum()
                backward(surrogate)
    # Detached: the loss's graph ends at the cached leaves, not at the parameters, and autograd.grad has freed it.
    return loss.detach()


def encode_without_cache(
    encode: Encode,
    chunks: Mapping[str, Sequence[Features]],
    compute_loss: ComputeLoss,
    backward: Backward = torch.Tensor.backward,
) -> torch.Tensor:
    """The plain path, with the same interface: encode every chunk with grad, compute the loss, one backward.

    Activations of all chunks are alive at once, so memory grows with the batch; use it when the batch fits,
    since it skips GradCache's second forward pass. Returns the loss, detached.
    """
    _check_chunks(chunks)
    embeddings = {
        group: _concat([_check_embeddings(encode(features), group) for features in group_chunks])  # [N_g, D] / pair
        for group, group_chunks in chunks.items()
    }
    loss = compute_loss(embeddings)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError(f"compute_loss must return a scalar tensor, got {_describe(loss)}")
    backward(loss)
    return loss.detach()


def _check_chunks(chunks: Mapping[str, Sequence[Features]]) -> None:
    if not isinstance(chunks, Mapping) or not chunks:
        raise ValueError("chunks must be a non-empty mapping of group name -> list of feature chunks")
    for group, group_chunks in chunks.items():
        if isinstance(group_chunks, Mapping) or not isinstance(group_chunks, Sequence) or not group_chunks:
            raise ValueError(
                f"group {group!r} must be a non-empty list of feature chunks, got {_describe(group_chunks)}"
            )


def _check_embeddings(embeddings: Any, group: str) -> Representation:
    if isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2:
        return embeddings
    if isinstance(embeddings, tuple) and len(embeddings) == 2:
        tokens, mask = embeddings
        if (
            isinstance(tokens, torch.Tensor)
            and isinstance(mask, torch.Tensor)
            and tokens.dim() == 3
            and mask.dtype == torch.bool
            and mask.shape == tokens.shape[:2]
        ):
            return embeddings
    raise ValueError(
        f"encode must return embeddings [n, D] or token matrices with their mask ([n, T, d], bool [n, T]); for "
        f"group {group!r} it gave {_describe(embeddings)}"
    )


def _values(representation: Representation) -> torch.Tensor:
    """The part that carries gradient: the embeddings, or the token matrices without their mask."""
    return representation if isinstance(representation, torch.Tensor) else representation[0]


def _detach(representation: Representation) -> Representation:
    if isinstance(representation, torch.Tensor):
        return representation.detach()
    tokens, mask = representation
    return tokens.detach(), mask


def _concat(parts: Sequence[Representation]) -> Representation:
    """A group's chunks as one: embeddings concatenated, or token matrices padded (masked) to the longest."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)  # [N, D]
    length = max(tokens.shape[1] for tokens, _ in parts)
    tokens = torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t, _ in parts])  # [N, T, d]
    mask = torch.cat([F.pad(m, (0, length - m.shape[1]), value=False) for _, m in parts])  # [N, T]
    return tokens, mask


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_describe(item) for item in value) + ")"
    return f"{type(value).__name__}"

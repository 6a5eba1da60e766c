"""Collectives the losses need, importable without DeepSpeed: all_gather that keeps gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    Each rank's local loss uses all ranks' features, so the gradient of the global loss for
    rank r's features is the sum over ranks of their gradients w.r.t. slice r: an all_reduce (SUM)
    followed by taking our slice (a reduce-scatter). Together with the data-parallel gradient
    average this gives exactly the gradient of the full-batch loss averaged over ranks.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group):
        ctx.group = group
        world = dist.get_world_size(group)
        out = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(out, x.contiguous(), group=group)
        ctx.rank, ctx.size = dist.get_rank(group), x.shape[0]
        return torch.cat(out, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, differentiably.

    Returns ``x`` itself when not distributed.
    """
    _, world = world_info()
    if world == 1:
        return x
    return _AllGatherWithGrad.apply(x, group)

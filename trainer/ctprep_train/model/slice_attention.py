"""SliceAwareAttention: self-attention plus a learnable per-head bias indexed by slice distance.

Token layout (shared with ``patch_embed``): token 0 is CLS, tokens 1..P are patches in
z-major raster order (pz, py, px) = Conv3d flatten order. ``z_index[i]`` is the patch
layer (z) of token i and -1 for CLS.

Bias rule: ``bias[h, i, j] = table[h, min(|z_i - z_j|, max_distance - 1)]`` for two patch
tokens; any pair that involves CLS uses its own learned per-head entry
(``table[h, max_distance]``), so CLS is never pretended to sit on a slice.

Kernels (exact, all compute the same function):

- ``flex``: FlexAttention with a ``score_mod`` that gathers the bias from the table; no
  N x N tensor ever exists. Compiled on CUDA. On CPU FlexAttention runs forward only
  (torch raises NotImplementedError in backward), so it is usable there for inference only.
- ``blocked``: the memory-bounded exact CPU path. Query blocks of ``block_size``; the bias is
  added per block (broadcast per z-layer for the standard layout, gathered otherwise) and the
  block's scores are recomputed in backward from the saved log-sum-exp (flash-attention style),
  so memory is O(block_size x N), not O(N^2).
- ``augmented``: the bias folded into two extra blocks of head channels, so plain (flash)
  ``scaled_dot_product_attention`` computes it: each query gets the bias row of its patch layer
  (``table`` read off per layer pair, L + 1 values with CLS as one more "layer"), each key a
  one-hot of its layer, so ``q'.k' = scale * q.k + bias``. Exact (the one-hot picks one entry),
  O(N) memory, and the table gets its gradient through ordinary autograd. It costs L + 1 extra
  channels per head (L = patch layers): 3.7x faster than ``blocked`` at the demo's 513 tokens on
  CPU (docs/benchmarks.md, bench/attention.py). What ``auto`` picks off CUDA.
- ``reference``: the bias materialized as (H, N, N) + ``scaled_dot_product_attention``;
  the test oracle only (16,385 tokens x 12 heads would be 12.9 GB per layer).
- ``sdpa``: plain SDPA, no bias; what ``auto`` picks when the slice bias is switched off.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = ("auto", "flex", "augmented", "blocked", "reference", "sdpa")


def slice_distance_index(z_q: torch.Tensor, z_k: torch.Tensor, max_distance: int) -> torch.Tensor:
    """Table column for each (query, key) pair: clipped |z_q - z_k|, or ``max_distance`` if CLS is involved.

    Args:
        z_q: (Nq,) long, patch layer per query token, -1 for CLS.
        z_k: (Nk,) long, same for keys.
    Returns:
        (Nq, Nk) long in [0, max_distance].
    """
    d = (z_q[:, None] - z_k[None, :]).abs().clamp_(max=max_distance - 1)
    cls = (z_q[:, None] < 0) | (z_k[None, :] < 0)
    return d.masked_fill_(cls, max_distance)


def reference_slice_attention(q, k, v, table, z_index, scale=None):
    """Oracle: materialize the (H, N, N) bias and call SDPA. q, k, v: (B, H, N, Dh); table: (H, T)."""
    idx = slice_distance_index(z_index, z_index, table.shape[1] - 1)
    bias = table[:, idx].to(q.dtype)  # (H, N, N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0), scale=scale)


def raster_layer_size(z_index: torch.Tensor) -> int:
    """Tokens per z-layer if ``z_index`` is the standard layout (CLS, then equal z-major layers), else 0."""
    n = z_index.numel()
    if n < 2 or int(z_index[0]) != -1:
        return 0
    layers = int(z_index[-1]) + 1
    if layers <= 0 or (n - 1) % layers:
        return 0
    size = (n - 1) // layers
    expected = torch.arange(layers, device=z_index.device).repeat_interleave(size)
    return size if torch.equal(z_index[1:], expected) else 0


def _add_bias_(scores, table, z_q, z_index, layer_size: int):
    """scores (B, H, bq, N) += slice bias for queries ``z_q``, without an (H, bq, N) gather if possible.

    Returns the table columns used (for the backward scatter): (bq, N) generic, or (bq, layers) when
    keys follow the raster layout (``layer_size`` > 0), in which case the bias is broadcast per layer.
    """
    max_distance = table.shape[1] - 1
    if layer_size:
        layers = (z_index.numel() - 1) // layer_size
        idx = slice_distance_index(z_q, torch.arange(layers, device=z_q.device), max_distance)  # (bq, layers)
        cls_col = slice_distance_index(z_q, z_index[:1], max_distance)  # (bq, 1): CLS key column
        b, h, bq, n = scores.shape
        scores[..., :1] += table[:, cls_col].to(scores.dtype)
        scores[..., 1:].view(b, h, bq, layers, layer_size).add_(table[:, idx].to(scores.dtype)[None, ..., None])
        return idx, cls_col
    idx = slice_distance_index(z_q, z_index, max_distance)
    scores += table[:, idx].to(scores.dtype)
    return idx, None


def _bias_grad_(dtable, ds, idx, cls_col, layer_size: int):
    """dtable += the sum of dS over every (query, key) pair that used each table column."""
    h = dtable.shape[0]
    ds = ds.sum(0)  # (H, bq, N): the table is shared over the batch
    if layer_size:
        bq = ds.shape[1]
        per_layer = ds[..., 1:].reshape(h, bq, -1, layer_size).sum(-1)  # (H, bq, layers)
        dtable.index_add_(1, idx.reshape(-1), per_layer.reshape(h, -1))
        dtable.index_add_(1, cls_col.reshape(-1), ds[..., 0])
    else:
        dtable.index_add_(1, idx.reshape(-1), ds.reshape(h, -1))


class _BlockedSliceAttention(torch.autograd.Function):
    """Exact attention with the slice bias, one query block at a time, O(block x N) memory.

    Forward keeps only q, k, v, the output and the per-row log-sum-exp; backward rebuilds
    each block's scores (bias added again) and accumulates dq, dk, dv and the table grad.
    With the standard token layout the bias is broadcast per z-layer, never gathered per token.
    """

    @staticmethod
    def forward(ctx, q, k, v, table, z_index, block_size: int, scale: float, layer_size: int):
        b, h, n, _ = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)  # softmax in >= fp32 even for bf16 inputs
        out = torch.empty_like(q)
        lse = torch.empty(b, h, n, dtype=acc, device=q.device)
        kt = k.transpose(-1, -2)
        for s in range(0, n, block_size):
            e = min(s + block_size, n)
            scores = torch.matmul(q[:, :, s:e], kt).to(acc).mul_(scale)
            _add_bias_(scores, table, z_index[s:e], z_index, layer_size)
            m = torch.logsumexp(scores, dim=-1, keepdim=True)
            p = scores.sub_(m).exp_()
            out[:, :, s:e] = torch.matmul(p.to(v.dtype), v)
            lse[:, :, s:e] = m.squeeze(-1)
        ctx.save_for_backward(q, k, v, table, z_index, out, lse)
        ctx.block_size, ctx.scale, ctx.layer_size = block_size, scale, layer_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, table, z_index, out, lse = ctx.saved_tensors
        block_size, scale, layer_size = ctx.block_size, ctx.scale, ctx.layer_size
        n = q.shape[2]
        dout = dout.contiguous()
        acc = lse.dtype
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k, dtype=acc)
        dv = torch.zeros_like(v, dtype=acc)
        dtable = torch.zeros(table.shape, dtype=acc, device=table.device)
        delta = (dout.to(acc) * out.to(acc)).sum(-1)  # (B, H, N): rowsum(dO * O)
        kt = k.transpose(-1, -2)
        for s in range(0, n, block_size):
            e = min(s + block_size, n)
            scores = torch.matmul(q[:, :, s:e], kt).to(acc).mul_(scale)
            idx, cls_col = _add_bias_(scores, table, z_index[s:e], z_index, layer_size)
            p = scores.sub_(lse[:, :, s:e, None]).exp_()  # (B, H, bq, N)
            do = dout[:, :, s:e]
            dv += torch.matmul(p.transpose(-1, -2), do.to(acc))
            dp = torch.matmul(do, v.transpose(-1, -2)).to(acc)
            ds = p.mul_(dp.sub_(delta[:, :, s:e, None]))  # dS = P * (dP - delta), in place on p
            dq[:, :, s:e] = torch.matmul(ds, k.to(acc)).mul_(scale).to(q.dtype)
            dk += torch.matmul(ds.transpose(-1, -2), q[:, :, s:e].to(acc)).mul_(scale)
            if ctx.needs_input_grad[3]:
                _bias_grad_(dtable, ds, idx, cls_col, layer_size)
        return dq, dk.to(k.dtype), dv.to(v.dtype), dtable.to(table.dtype), None, None, None, None


def blocked_slice_attention(q, k, v, table, z_index, block_size: int = 256, scale=None):
    """Memory-bounded exact slice-biased attention (CPU training path). Shapes as the reference."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _BlockedSliceAttention.apply(q, k, v, table, z_index, int(block_size), float(scale),
                                        raster_layer_size(z_index))


def augmented_slice_attention(q, k, v, table, z_index, scale=None):
    """Exact slice-biased attention as plain SDPA over augmented heads (see the module docstring).

    q, k, v: (B, H, N, Dh); table: (H, max_distance + 1); z_index: (N,) long, -1 = CLS.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    max_distance = table.shape[1] - 1
    layers = int(z_index.max()) + 1 if z_index.numel() else 0
    cols = layers + 1  # one column per patch layer + one for CLS
    # layer ids of the columns, CLS last as -1, so slice_distance_index applies the CLS rule
    col_z = torch.arange(cols, device=z_index.device).masked_fill_(torch.arange(cols, device=z_index.device) == layers, -1)
    pair_bias = table[:, slice_distance_index(col_z, col_z, max_distance)]  # (H, cols, cols)
    col_of_token = torch.where(z_index < 0, layers, z_index)  # (N,)
    b, h, _, dv = v.shape
    q_extra = pair_bias[:, col_of_token].to(q.dtype)  # (H, N, cols): the bias row of the query's layer
    k_extra = F.one_hot(col_of_token, cols).to(k.dtype)  # (N, cols): which column the key reads
    qa = torch.cat([q * scale, q_extra.unsqueeze(0).expand(b, -1, -1, -1)], dim=-1)
    ka = torch.cat([k, k_extra.expand(b, h, -1, -1)], dim=-1)
    pad = qa.shape[-1] - dv  # the CPU flash kernel wants one head size for q, k and v
    va = torch.cat([v, v.new_zeros(b, h, v.shape[2], pad)], dim=-1) if pad > 0 else v
    return F.scaled_dot_product_attention(qa, ka, va, scale=1.0)[..., :dv]


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled once per process: the eager version is a slow forward-only fallback on CPU.
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


def flex_slice_attention(q, k, v, table, z_index, scale=None, compiled: bool | None = None):
    """FlexAttention with the slice bias as ``score_mod``; never builds an N x N tensor."""
    max_distance = table.shape[1] - 1
    if compiled is None:
        compiled = q.device.type == "cuda"

    def score_mod(score, b, h, q_idx, kv_idx):
        zq = z_index[q_idx]
        zk = z_index[kv_idx]
        d = torch.clamp((zq - zk).abs(), max=max_distance - 1)
        d = torch.where((zq < 0) | (zk < 0), max_distance, d)
        return score + table[h, d].to(score.dtype)

    return _flex_fn(bool(compiled))(q, k, v, score_mod=score_mod, scale=scale)


def select_kernel(requested: str, slice_bias: bool, device: torch.device, needs_grad: bool) -> str:
    """The kernel to run: ``requested`` if valid here, else the best valid one for ``auto``."""
    if requested not in KERNELS:
        raise ValueError(f"unknown attention kernel {requested!r}; valid choices: {', '.join(KERNELS)}")
    if not slice_bias:
        if requested not in ("auto", "sdpa"):
            raise ValueError(f"attention kernel {requested!r} applies the slice bias, which is off; use auto or sdpa")
        return "sdpa"
    if requested == "auto":
        return "flex" if device.type == "cuda" and flex_available() else "augmented"
    if requested == "sdpa":
        raise ValueError("attention kernel 'sdpa' would drop the slice bias; set slice_bias false or use auto")
    if requested == "flex":
        if not flex_available():
            raise RuntimeError("attention kernel 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        if device.type != "cuda" and needs_grad:
            raise RuntimeError(
                "FlexAttention cannot run backward on CPU; use kernel 'augmented' (or 'auto') for CPU training"
            )
    return requested


class SliceAwareAttention(nn.Module):
    """Multi-head self-attention with a learnable bias per head indexed by slice distance.

    Args:
        dim: token channels.
        num_heads: attention heads.
        max_slice_distance: table length in patch layers; farther pairs share the last entry.
        slice_bias: False = plain self-attention (ablation).
        kernel: one of ``KERNELS``; ``auto`` = flex on CUDA, augmented elsewhere.
        block_size: query tokens per block of the blocked kernel.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        max_slice_distance: int = 32,
        slice_bias: bool = True,
        kernel: str = "auto",
        block_size: int = 256,
        qkv_bias: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} not divisible by num_heads {num_heads}")
        select_kernel(kernel, slice_bias, torch.device("cpu"), needs_grad=False)  # fail early on bad options
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.kernel = kernel
        self.block_size = block_size
        self.max_slice_distance = max_slice_distance
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if slice_bias:
            # Columns 0..max_distance-1: slice distance; last column: any pair involving CLS.
            self.slice_bias_table = nn.Parameter(torch.zeros(num_heads, max_slice_distance + 1))
            nn.init.trunc_normal_(self.slice_bias_table, std=0.02)
        else:
            self.register_parameter("slice_bias_table", None)

    def resolve_kernel(self, x: torch.Tensor) -> str:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.qkv.weight.requires_grad)
        return select_kernel(self.kernel, self.slice_bias_table is not None, x.device, needs_grad)

    def attend(self, q, k, v, z_index, kernel: str):
        if kernel == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        table = self.slice_bias_table
        if kernel == "flex":
            return flex_slice_attention(q, k, v, table, z_index, scale=self.scale)
        if kernel == "augmented":
            return augmented_slice_attention(q, k, v, table, z_index, scale=self.scale)
        if kernel == "blocked":
            return blocked_slice_attention(q, k, v, table, z_index, self.block_size, scale=self.scale)
        return reference_slice_attention(q, k, v, table, z_index, scale=self.scale)

    def forward(self, x: torch.Tensor, z_index: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        """x: (B, N, C) tokens; z_index: (N,) long patch layer per token (-1 = CLS)."""
        b, n, c = x.shape
        if z_index.shape != (n,):
            raise ValueError(f"z_index has shape {tuple(z_index.shape)}, expected ({n},)")
        kernel = self.resolve_kernel(x) if kernel is None else select_kernel(
            kernel, self.slice_bias_table is not None, x.device, torch.is_grad_enabled()
        )
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.attend(qkv[0], qkv[1], qkv[2], z_index, kernel)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

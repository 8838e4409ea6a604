"""Paged KV cache: its layout, allocation, the write kernel and a gather reference.

Layout (one per layer, shared by the prefill and decode attention kernels):

* ``k_cache`` and ``v_cache`` are each ``[num_blocks, block_size, Hkv, D]``, contiguous, in the model
  dtype (bf16 / fp16 / fp32). ``block_size`` is a power of two >= 16.
* ``block_tables [B, max_blocks_per_seq]`` int32: the block ids holding sequence b's tokens in order;
  token j of sequence b lives in block ``block_tables[b, j // block_size]`` at offset
  ``j % block_size``. Unused entries are -1 and are never read.
* ``slot_mapping [T]`` int64: for each new token, its flat slot ``block_id * block_size + offset``;
  -1 means "do not write" (padding).
* ``seq_lens [B]`` int32: tokens in the cache for each sequence, including any just written.

:func:`allocate_kv_cache` makes one zeroed tensor ``[num_layers, 2, num_blocks, block_size, Hkv, D]``
and returns per-layer ``(k_cache, v_cache)`` views into it; each view is itself contiguous, so a
kernel sees exactly the layout above, and the whole cache is one allocation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._aot import KernelSpec
from ._common import DTYPES, HEAD_DIMS, TRITON_TYPE
from ._dispatch import use_triton


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype, device: torch.device | str
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Allocate a zeroed paged KV cache and return ``[(k_cache, v_cache)] * num_layers``.

    Each ``k_cache`` / ``v_cache`` is a contiguous ``[num_blocks, block_size, num_kv_heads, head_dim]``
    view of one ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` tensor of ``dtype``
    (reach it through ``k_cache._base``). Zeroed, so a stray read of an unwritten slot is finite.
    """
    for name, value in (("num_layers", num_layers), ("num_blocks", num_blocks),
                        ("num_kv_heads", num_kv_heads)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be one of {DTYPES}, got {dtype}")
    storage = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                          dtype=dtype, device=device)
    return [(storage[layer, 0], storage[layer, 1]) for layer in range(num_layers)]


# ---------------------------------------------------------------------------------------------------
# Kernel: one program per (new token, group of BLOCK_H KV heads) copies a [BLOCK_H, D] tile of k and
# of v into the token's slot. Rows of k/v are D-contiguous, so loads and stores are 16-byte vectors.
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr,                  # [T, Hkv, D] (any token/head strides, unit last-dim stride)
    k_cache_ptr, v_cache_ptr,      # [num_blocks * block_size, Hkv, D] contiguous
    slot_ptr,                      # [T] int64, -1 = skip
    num_kv_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cs, stride_ch,          # cache strides per slot and per head (elements)
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
):
    tok = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    dims = tl.arange(0, HEAD_DIM)                                # [D]
    slot = tl.load(slot_ptr + tok)                               # int64 scalar
    live_heads = tl.where(slot >= 0, num_kv_heads, 0)            # a -1 slot writes no head
    mask = (heads[:, None] < live_heads) & (dims[None, :] < HEAD_DIM)  # [BLOCK_H, D]
    tok64 = tok.to(tl.int64)
    src_k = k_ptr + tok64 * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    src_v = v_ptr + tok64 * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    # int64: slot * stride_cs passes 2**31 elements at 131072 blocks of 16 x 8 x 128. A -1 slot gives a
    # negative offset, but only on lanes the mask turns off.
    dst = slot * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    tl.store(k_cache_ptr + dst, tl.load(src_k, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(src_v, mask=mask), mask=mask)


def _block_h(head_dim: int) -> int:
    return max(1, 1024 // head_dim)  # ~1024 elements a tile: 2 KiB per tensor in bf16


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, *, head_dim: int, dtype: torch.dtype,
                device: torch.device, num_kv_heads: int | None = None, min_block_size: int = 1,
                contiguous: bool = True) -> tuple[int, int]:
    """The one check of a layer's cache pair against the layout above, run by every op that reads or
    writes it: ``k_cache`` and ``v_cache`` both ``[num_blocks, block_size, Hkv, head_dim]`` (``Hkv ==
    num_kv_heads`` when given), of ``dtype``, on ``device``, ``block_size`` a power of two >=
    ``min_block_size``, and contiguous unless ``contiguous=False`` (the torch references only view
    them). Returns ``(block_size, Hkv)``; raises ``ValueError`` / ``TypeError`` naming the bad value."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.shape[3] != head_dim:
            raise ValueError(f"{name} must be [num_blocks, block_size, Hkv, D={head_dim}], got shape "
                             f"{tuple(cache.shape)}")
        if num_kv_heads is not None and cache.shape[2] != num_kv_heads:
            raise ValueError(f"{name} is {tuple(cache.shape)}: expected Hkv={num_kv_heads}, D={head_dim}")
        if cache.dtype != dtype:
            raise TypeError(f"{name} dtype {cache.dtype} must match the inputs' dtype {dtype}")
        if cache.device != device:
            raise ValueError(f"{name} is on {cache.device}, the inputs on {device}")
        if contiguous and not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous (strides {cache.stride()})")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)}")
    block_size = k_cache.shape[1]
    if block_size < min_block_size or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= {min_block_size}, got {block_size}")
    return block_size, k_cache.shape[2]


def _write_kv_cache_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
    T, Hkv, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} must equal k shape {tuple(k.shape)}")
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"k/v need a unit last-dim stride, got {k.stride()} and {v.stride()}")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}, got {D}")
    if k.dtype not in DTYPES or v.dtype != k.dtype:
        raise TypeError(f"k/v dtypes must match and be one of {DTYPES}, got {k.dtype}, {v.dtype}")
    check_cache(k_cache, v_cache, head_dim=D, dtype=k.dtype, device=k.device, num_kv_heads=Hkv)
    if slot_mapping.shape != (T,) or slot_mapping.dtype != torch.int64 or slot_mapping.stride(0) != 1:
        raise ValueError(f"slot_mapping must be a contiguous [T={T}] int64 tensor, got "
                         f"{tuple(slot_mapping.shape)} {slot_mapping.dtype} strides {slot_mapping.stride()}")
    # The kernel dereferences every pointer on the launching device: a CPU slot_mapping next to CUDA
    # caches is not an error the interpreter can show.
    for name, t in (("v", v), ("slot_mapping", slot_mapping)):
        if t.device != k.device:
            raise ValueError(f"{name} is on {t.device}, k on {k.device}")
    if T == 0:
        return
    block_h = _block_h(D)
    grid = (T, triton.cdiv(Hkv, block_h))
    _write_kv_cache_kernel[grid](
        k, v, k_cache, v_cache, slot_mapping, Hkv,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        Hkv * D, D,
        HEAD_DIM=D, BLOCK_H=block_h, num_warps=4,
    )


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write new keys/values into the paged cache, in place.

    ``k``, ``v``: ``[T, Hkv, D]`` in the cache dtype; any token/head strides (e.g. views of a fused qkv
    projection) as long as the last dim is contiguous. ``k_cache``, ``v_cache``: ``[num_blocks,
    block_size, Hkv, D]`` contiguous. ``slot_mapping``: ``[T]`` int64 flat slots
    (``block_id * block_size + offset``); tokens whose slot is -1 are skipped. Slots are not
    bounds-checked on the device (that would need a host sync); the caller's block manager owns them.
    """
    if use_triton(k, v, k_cache, v_cache, slot_mapping):
        _write_kv_cache_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_cache_reference(k, v, k_cache, v_cache, slot_mapping)


def write_kv_cache_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             slot_mapping: torch.Tensor) -> None:
    """Torch reference of :func:`write_kv_cache` (in place; skips slots equal to -1)."""
    Hkv, D = k_cache.shape[2], k_cache.shape[3]
    keep = slot_mapping >= 0                      # [T] bool
    slots = slot_mapping[keep]                    # [T_kept]
    k_cache.view(-1, Hkv, D)[slots] = k[keep].to(k_cache.dtype)
    v_cache.view(-1, Hkv, D)[slots] = v[keep].to(v_cache.dtype)


def gather_kv_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table_row: torch.Tensor,
                        length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``length`` cached tokens of one sequence as contiguous ``([length, Hkv, D],) * 2``.

    ``block_table_row [max_blocks]`` (int32) is that sequence's row of ``block_tables``; only its
    first ``ceil(length / block_size)`` entries are read.
    """
    _, block_size, Hkv, D = k_cache.shape
    pos = torch.arange(int(length), device=k_cache.device)                # [length]
    blocks = block_table_row.to(device=k_cache.device, dtype=torch.long)[pos // block_size]
    slots = blocks * block_size + pos % block_size                         # [length]
    # index_select copies whole [Hkv, D] rows (one memcpy each) into a new contiguous tensor.
    return (torch.index_select(k_cache.view(-1, Hkv, D), 0, slots),
            torch.index_select(v_cache.view(-1, Hkv, D), 0, slots))


def paged_slots_reference(block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
                          block_size: int, *, prefix_tables: torch.Tensor | None = None,
                          prefix_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat cache slots of a batch of sequences, padded to ``max_len``: ``(slots, valid)``, both
    ``[B, max_len]`` (int64 and bool), for gathering ``k_cache.view(-1, Hkv, D)[slots]``.

    ``block_tables [B, W]`` int32 and ``seq_lens [B]`` (any int dtype, on the tables' device): token j
    of sequence b lives at ``block_tables[b, j // block_size] * block_size + j % block_size``; ``valid[b,
    j]`` is ``j < seq_lens[b]``, and ``max_len >= max(seq_lens)`` is a host int (sizing the output from
    ``seq_lens`` would need a read-back). With ``prefix_tables [B, W]`` and ``prefix_lens [B]``, tokens
    ``j < prefix_lens[b]`` are read through ``prefix_tables[b]`` instead (a shared prefix read through
    another sequence's row).

    Padding entries (``valid`` False) hold the slot of the sequence's last token, so a gather never
    touches a -1 table entry or an unwritten slot and stays finite; an empty sequence's entries hold a
    slot >= 0 of unspecified content. Callers mask padding by ``valid``.
    """
    device = block_tables.device
    lens = seq_lens.to(device=device, dtype=torch.long)                     # [B]
    pos = torch.arange(max_len, device=device)                              # [L]
    valid = pos[None, :] < lens[:, None]                                    # [B, L]
    pos = torch.minimum(pos[None, :], (lens - 1).clamp(min=0)[:, None])     # [B, L] padding -> last token
    col = pos // block_size                                                 # [B, L] table column
    blocks = block_tables.long().gather(1, col)                             # [B, L]
    if prefix_tables is not None:
        in_prefix = pos < prefix_lens.to(device=device, dtype=torch.long)[:, None]
        blocks = torch.where(in_prefix, prefix_tables.long().gather(1, col), blocks)
    # clamp: an empty sequence's row may be all -1, and a negative slot would index from the end.
    slots = (blocks * block_size + pos % block_size).clamp_(min=0)          # [B, L]
    return slots, valid


def aot_specs() -> list[KernelSpec]:
    """Every configuration :func:`_write_kv_cache_triton` can launch: one per dtype and head dim."""
    specs = []
    for dtype in DTYPES:
        ty = "*" + TRITON_TYPE[dtype]
        for d in HEAD_DIMS:
            signature = {
                "k_ptr": ty, "v_ptr": ty, "k_cache_ptr": ty, "v_cache_ptr": ty, "slot_ptr": "*i64",
                "num_kv_heads": "i32", "stride_kt": "i32", "stride_kh": "i32", "stride_vt": "i32",
                "stride_vh": "i32", "stride_cs": "i32", "stride_ch": "i32",
                "HEAD_DIM": "constexpr", "BLOCK_H": "constexpr",
            }
            specs.append(KernelSpec(
                name=f"write_kv_cache_{TRITON_TYPE[dtype]}_d{d}", fn=_write_kv_cache_kernel,
                signature=signature, constexprs={"HEAD_DIM": d, "BLOCK_H": _block_h(d)}, num_warps=4,
                # D >= 16 and fused-qkv token strides are multiples of 16 elements; tensors from the
                # caching allocator are 16-byte aligned.
                aligned=("k_ptr", "v_ptr", "k_cache_ptr", "v_cache_ptr", "stride_kt", "stride_kh",
                         "stride_vt", "stride_vh", "stride_cs", "stride_ch"),
            ))
    return specs

"""Paged KV cache: allocation layout, the write kernel against its reference, the gather reference."""

import pytest
import torch

import kernel_testing
from arkfast.kernels.paged_kv import (
    allocate_kv_cache,
    gather_kv_reference,
    paged_slots_reference,
    write_kv_cache,
    write_kv_cache_reference,
)


def test_allocate_layout():
    caches = allocate_kv_cache(3, num_blocks=5, block_size=16, num_kv_heads=2, head_dim=64,
                               dtype=torch.bfloat16, device="cpu")
    assert len(caches) == 3
    base = caches[0][0]._base
    for layer, (k_cache, v_cache) in enumerate(caches):
        for t in (k_cache, v_cache):
            assert t.shape == (5, 16, 2, 64) and t.dtype == torch.bfloat16 and t.is_contiguous()
            assert t._base is base  # one allocation, per-layer views
            assert torch.count_nonzero(t) == 0
    k_cache, v_cache = caches[1]
    k_cache.fill_(1.0)  # views do not overlap
    assert torch.count_nonzero(v_cache) == 0 and torch.count_nonzero(caches[0][0]) == 0
    assert torch.count_nonzero(caches[2][0]) == 0


@pytest.mark.parametrize("kwargs, err", [
    ({"block_size": 24}, ValueError), ({"block_size": 8}, ValueError), ({"head_dim": 48}, ValueError),
    ({"num_blocks": 0}, ValueError), ({"dtype": torch.int8}, TypeError)])
def test_allocate_rejects(kwargs, err):
    args = {"num_layers": 1, "num_blocks": 4, "block_size": 16, "num_kv_heads": 2, "head_dim": 64,
            "dtype": torch.float32, "device": "cpu"}
    args.update(kwargs)
    with pytest.raises(err, match=next(iter(kwargs))):
        allocate_kv_cache(**args)


def _fused_kv(T, Hq, Hkv, D, dtype):
    """k and v as non-contiguous head slices of a fused [T, Hq + 2 Hkv, D] projection."""
    qkv = torch.randn(T, Hq + 2 * Hkv, D, dtype=dtype)
    return qkv[:, Hq:Hq + Hkv], qkv[:, Hq + Hkv:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, Hkv, D, block_size", [(1, 1, 64, 16), (17, 3, 64, 16), (23, 10, 128, 32),
                                                   (9, 2, 16, 16)])
def test_write_kv_cache_matches_reference(triton_interp, dtype, T, Hkv, D, block_size):
    torch.manual_seed(T * 131 + Hkv * 7 + D)
    num_blocks = 6
    k, v = _fused_kv(T, 4, Hkv, D, dtype)
    assert T == 1 or not k.is_contiguous()
    # distinct slots in random order, some tokens padded with -1
    slots = torch.randperm(num_blocks * block_size)[:T].to(torch.int64)
    slots[torch.rand(T) < 0.25] = -1
    k_cache, v_cache = (torch.randn(num_blocks, block_size, Hkv, D).to(dtype) for _ in range(2))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache(k, v, k_cache, v_cache, slots)
    write_kv_cache_reference(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)  # a copy: bit-exact
    written = slots[slots >= 0]
    flat_k = k_cache.view(-1, Hkv, D)
    assert torch.equal(flat_k[written], k[slots >= 0])


def test_write_kv_cache_all_padding_and_empty(triton_interp):
    k_cache, v_cache = allocate_kv_cache(1, 2, 16, 2, 64, torch.float32, "cpu")[0]
    k, v = torch.randn(3, 2, 64), torch.randn(3, 2, 64)
    write_kv_cache(k, v, k_cache, v_cache, torch.full((3,), -1, dtype=torch.int64))
    assert torch.count_nonzero(k_cache) == 0 and torch.count_nonzero(v_cache) == 0
    write_kv_cache(k[:0], v[:0], k_cache, v_cache, torch.empty(0, dtype=torch.int64))


def test_write_kv_cache_cpu_default_runs_reference():
    k_cache, v_cache = allocate_kv_cache(1, 2, 16, 1, 32, torch.float32, "cpu")[0]
    k, v = torch.randn(2, 1, 32), torch.randn(2, 1, 32)
    write_kv_cache(k, v, k_cache, v_cache, torch.tensor([17, -1]))
    assert torch.equal(k_cache[1, 1], k[0]) and torch.equal(v_cache[1, 1], v[0])
    assert torch.count_nonzero(k_cache) == k[0].count_nonzero()


@pytest.mark.parametrize("bad, err, match", [
    ("slot_dtype", ValueError, "slot_mapping"), ("last_stride", ValueError, "last-dim"),
    ("cache_dtype", TypeError, "dtype"), ("cache_heads", ValueError, "Hkv"),
    ("v_shape", ValueError, "v shape"), ("slot_stride", ValueError, "contiguous"),
    ("slot_device", ValueError, "slot_mapping is on meta")])
def test_write_kv_cache_rejects(triton_interp, bad, err, match):
    k_cache, v_cache = allocate_kv_cache(1, 2, 16, 2, 64, torch.float32, "cpu")[0]
    k, v, slots = torch.randn(3, 2, 64), torch.randn(3, 2, 64), torch.arange(3)
    if bad == "slot_dtype":
        slots = slots.int()
    elif bad == "last_stride":
        k = torch.randn(3, 64, 2).transpose(1, 2)
    elif bad == "cache_dtype":
        k_cache = k_cache.half()
    elif bad == "cache_heads":
        k_cache = torch.zeros(2, 16, 4, 64)
    elif bad == "v_shape":
        v = torch.randn(3, 1, 64)
    elif bad == "slot_stride":  # the kernel reads slot t at slot_ptr + t
        slots = torch.arange(6)[::2]
    elif bad == "slot_device":  # a host slot_mapping next to device caches: the kernel would read a host pointer
        slots = torch.arange(3, device="meta")
    with pytest.raises(err, match=match):
        write_kv_cache(k, v, k_cache, v_cache, slots)


def test_gather_kv_reference():
    torch.manual_seed(0)
    block_size, Hkv, D = 16, 2, 32
    k_cache, v_cache = torch.randn(2, 8, block_size, Hkv, D).unbind(0)
    table = torch.tensor([5, 2, 7, -1], dtype=torch.int32)
    for length in (0, 1, 16, 37):
        k, v = gather_kv_reference(k_cache, v_cache, table, length)
        assert k.shape == (length, Hkv, D) and k.is_contiguous()
        for j in range(length):
            blk, off = int(table[j // block_size]), j % block_size
            assert torch.equal(k[j], k_cache[blk, off]) and torch.equal(v[j], v_cache[blk, off])


@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_slots_reference(block_size):
    """Slots against the per-token formula; padding holds the sequence's last slot, an empty sequence
    (a row of -1) a slot >= 0; a prefix is read through its own table."""
    gen = torch.Generator().manual_seed(block_size)
    lens = [0, 1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5]
    width = max(-(-n // block_size) for n in lens) + 1
    tables = torch.full((len(lens), width), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        need = -(-n // block_size)
        tables[b, :need] = torch.randperm(64, generator=gen)[:need].int()
    prefix_tables = torch.randint(0, 64, tables.shape, generator=gen, dtype=torch.int32)
    prefix_lens = torch.tensor([0, 1, 0, block_size, 3, 2 * block_size + 1])
    max_len = max(lens) + 2
    slots, valid = paged_slots_reference(tables, torch.tensor(lens, dtype=torch.int32), max_len, block_size)
    pre_slots, pre_valid = paged_slots_reference(tables, torch.tensor(lens), max_len, block_size,
                                                 prefix_tables=prefix_tables, prefix_lens=prefix_lens)
    assert slots.shape == (len(lens), max_len) and slots.dtype == torch.int64 and valid.dtype == torch.bool
    assert torch.equal(valid, pre_valid) and bool((slots >= 0).all()) and bool((pre_slots >= 0).all())
    for b, n in enumerate(lens):
        assert valid[b].tolist() == [j < n for j in range(max_len)]
        for j in range(max_len):
            tok = min(j, n - 1)
            if tok < 0:
                continue
            table = prefix_tables if tok < prefix_lens[b] else tables
            assert slots[b, j] == tables[b, tok // block_size] * block_size + tok % block_size
            assert pre_slots[b, j] == table[b, tok // block_size] * block_size + tok % block_size


def test_aot_compiles_sm90():
    records = kernel_testing.assert_compiles_sm90("arkfast.kernels.paged_kv")
    assert all(r["vector_loads"] for r in records)


def test_offsets_are_int64():
    # token * token stride (fused-qkv views of a long prefill) and slot * slot stride (131072 blocks of
    # 16 x 8 x 128 pass 2**31 elements).
    kernel_testing.assert_int64_offsets("arkfast.kernels.paged_kv", {
        f"write_kv_cache_{t}_d{d}": ("stride_kt", "stride_vt", "stride_cs") for t in ("fp32", "bf16")
        for d in (16, 128)})

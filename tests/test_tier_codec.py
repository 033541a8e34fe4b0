"""Tier codecs (kv_tier_codec): blocks coded on their way into the tiers and decoded into
the pool on load. Round trips stay within each codec's quantization step, a block written
under one codec is never read under another (namespace miss, rejected header, rejected
scales), and the engine serves tier-loaded prefixes; codec none keeps the exact bytes."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import xxhash

from strata import LLM, SamplingParams
from strata.config import CacheConfig, TierConfig
from strata.kv.cache import KVCache
from strata.kv.codec import BlockShape, get_codec
from strata.kv.codec_fp8 import FP8_MAX
from strata.kv.codec_int import value_group
from strata.kv.prefix import BlockRef
from strata.kv.tiers import block_format
from strata.kv.tiers.base import BlockLayout, StoredBlock
from strata.kv.tiers.cpu import CPUTier
from strata.kv.tiers.disk import DiskTier, layout_digest
from strata.kv.tiers.lower import LowerTiers
from strata.kv.tiers.remote import RemoteTier
from strata.kv.tiers.slot_codec import stored_block_problem
from strata.kv.tiers.transfer import BlockTransfer
from tests.conftest import assert_no_leaks

CODECS = ["fp8", "int8", "int4"]
LAYERS, HEADS, DIM, BS = 3, 2, 64, 16
MODEL: Any = SimpleNamespace(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM)


def _pool(num_blocks: int = 6) -> KVCache:
    """A float32 raw pool filled with keys that have an outlier channel, a constant one
    and one far from zero, as real keys do."""
    kv = KVCache(MODEL, num_blocks, BS, torch.float32, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    kv.k.copy_(torch.randn(kv.k.shape, generator=gen) * 2)
    kv.k[..., 5] += 60.0
    kv.k[..., 7] = 3.25
    kv.k[..., 9] = 1000.0 + torch.randn(kv.k.shape[:-1], generator=gen) * 1e-3
    kv.v.copy_(torch.randn(kv.v.shape, generator=gen))
    return kv


def _layout(codec: str) -> BlockLayout:
    name = get_codec(codec).layout_name if codec != "none" else "raw"
    return BlockLayout("ab" * 32, LAYERS, HEADS, DIM, BS, "float32", codec=name)


def _round_trip(kv: KVCache, codec: str, ids: list[int]) -> tuple[torch.Tensor, ...]:
    """Store pool blocks `ids` into tier slots and load them back into blocks 3, 4, 5."""
    layout = _layout(codec)
    slab = torch.zeros((len(ids), layout.nbytes), dtype=torch.uint8)
    transfer = BlockTransfer(kv, slab, None if codec == "none" else get_codec(codec))
    transfer.store(ids, list(range(len(ids))), None)
    dst = [3, 4, 5][: len(ids)]
    transfer.load(list(range(len(ids))), dst)
    return kv.k[:, ids], kv.v[:, ids], kv.k[:, dst], kv.v[:, dst], slab


def _step(x: torch.Tensor, dim: int, levels: int) -> torch.Tensor:
    """The int codecs' quantization step of x's groups along `dim`: the min-max range over
    the levels, widened by the float16 rounding of zero (one ulp of the minimum) and scale."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    ulp = (torch.nextafter(lo.half(), torch.tensor(torch.inf).half()) - lo.half()).float()
    tiny = torch.finfo(torch.float16).tiny
    return ((hi - lo + ulp) / levels * (1 + 2**-10) + tiny).expand_as(x)


def _bounds(codec: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element error bounds of a round trip (k, v: [layers, n, tokens, heads, dim])."""
    if codec == "fp8":  # 3 mantissa bits: half a step is |x|/16; subnormals 2^-10 of the scale
        return tuple(  # type: ignore[return-value]
            x.abs() / 16 + x.abs().amax(-1, keepdim=True) / FP8_MAX * 2.0**-10 + 1e-6 * x.abs()
            for x in (k, v)
        )
    levels = (1 << int(codec.removeprefix("int"))) - 1
    k_step = _step(k, dim=2, levels=levels)  # K: per channel over the block's tokens
    g = value_group(DIM)
    vg = v.reshape(*v.shape[:-1], DIM // g, g)  # V: per token and group of channels
    v_step = _step(vg, dim=-1, levels=levels).reshape(v.shape)
    return k_step / 2 + 1e-6 * k.abs(), v_step / 2 + 1e-6


# ---- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_through_tier_slots_stays_within_the_quantization_step(codec: str) -> None:
    kv = _pool()
    k, v, dk, dv, slab = _round_trip(kv, codec, [0, 2, 1])
    k_bound, v_bound = _bounds(codec, k, v)
    assert ((dk - k).abs() <= k_bound).all() and ((dv - v).abs() <= v_bound).all()
    assert not torch.equal(dk, k)  # lossy: the bound is what holds, not equality
    # The slots hold exactly the pool codec's parts, layer after layer, and decode as it does.
    c = get_codec(codec)
    ek, ev = c.decode(c.encode(k.flatten(0, 1), v.flatten(0, 1)), torch.float32)
    assert torch.equal(dk.flatten(0, 1), ek) and torch.equal(dv.flatten(0, 1), ev)
    assert slab.shape[1] == c.bytes_per_block(LAYERS, kv.shape, torch.float32)


def test_codec_none_copies_the_exact_bytes() -> None:
    kv = _pool()
    k, v, dk, dv, slab = _round_trip(kv, "none", [2, 0])
    assert torch.equal(dk, k) and torch.equal(dv, v)
    raw = slab.view(torch.float32).view(2, LAYERS, 2, BS, HEADS, DIM)
    assert torch.equal(raw[:, :, 0], k.transpose(0, 1))
    assert torch.equal(raw[:, :, 1], v.transpose(0, 1))


@pytest.mark.parametrize("codec", ["none", *CODECS])
def test_batched_gather_and_scatter_match_the_per_block_copies(codec: str) -> None:
    """The batched rows the CUDA path stages (SlotCodec.gather/scatter) hold exactly the
    bytes the CPU path writes to its slots, and scatter back to the same pool contents."""
    kv = _pool()
    ids = [4, 0, 2]
    *_, slab = _round_trip(kv, codec, ids)  # slots 0..2 <- blocks 4, 0, 2 (CPU path)
    transfer = BlockTransfer(kv, slab, None if codec == "none" else get_codec(codec))
    rows = torch.empty((len(ids), *transfer.block_shape), dtype=torch.uint8)
    before = _pool()
    kv.k.copy_(before.k)
    kv.v.copy_(before.v)
    transfer.rows.gather(torch.tensor(ids), rows)
    assert torch.equal(rows.flatten(1), slab)
    transfer.rows.scatter(rows, torch.tensor([1, 3, 5]))
    _round_trip(before, codec, ids)  # the CPU path decodes them into blocks 3, 4, 5
    assert torch.equal(kv.k[:, [1, 3, 5]], before.k[:, [3, 4, 5]])
    assert torch.equal(kv.v[:, [1, 3, 5]], before.v[:, [3, 4, 5]])


def test_coded_blocks_are_smaller_by_the_codec_ratio() -> None:
    raw = _layout("none").nbytes
    assert raw == LAYERS * 2 * BS * HEADS * DIM * 4
    ratios = {c: raw / _layout(c).nbytes for c in CODECS}
    # Per head and block of 16 tokens x 64 channels (fp32: 8192 bytes): fp8 codes + a
    # float32 scale per token; int codes + float16 scale and zero per K channel and per
    # token and 32 V channels.
    per_head = {"fp8": 2 * (16 * 64 + 16 * 4), "int8": 2 * 16 * 64 + 2 * 64 * 2 + 16 * 2 * 2 * 2,
                "int4": 2 * 16 * 32 + 2 * 64 * 2 + 16 * 2 * 2 * 2}  # fmt: skip
    assert ratios == {c: pytest.approx(8192 / n) for c, n in per_head.items()}
    assert ratios["fp8"] > 3.7 and ratios["int8"] > 3.3 and ratios["int4"] > 5.8


# ---- never read under another codec -------------------------------------------------------


def _key(i: int) -> bytes:
    return hashlib.sha256(f"block {i}".encode()).digest()


def _coded_block(codec: str, i: int = 0) -> StoredBlock:
    kv = _pool()
    *_, slab = _round_trip(kv, codec, [i])
    return StoredBlock(_key(i), tuple(range(i, i + BS)), slab[0].clone())


def test_another_codec_is_another_namespace(tmp_path: Path) -> None:
    digests = {layout_digest(_layout(c)) for c in ["none", *CODECS]}
    assert len(digests) == 4
    DiskTier(_layout("fp8"), tmp_path, 1 << 20).put([_coded_block("fp8")])
    for other in ["none", "int8", "int4"]:
        layout = _layout(other)
        tier = DiskTier(layout, tmp_path, 1 << 20)
        assert tier.contains([_key(0)]) == [False] and tier.get([_key(0)]) == [None]
    assert DiskTier(_layout("fp8"), tmp_path, 1 << 20).contains([_key(0)]) == [True]
    # The remote key of a block names its layout digest, codec included (no server needed).
    names = {c: RemoteTier(_layout(c), "redis://127.0.0.1:1").name_of(_key(0)) for c in CODECS}
    assert len(set(names.values())) == 3
    assert all(f":{layout_digest(_layout(c))}:".encode() in n for c, n in names.items())


def test_a_header_of_another_codec_is_rejected() -> None:
    data = bytearray(b"".join(block_format.encode(_layout("fp8"), _coded_block("fp8"))))
    for reader in ["none", "int8", "int4"]:  # the codec field is checked before the lengths
        with pytest.raises(block_format.BlockFormatError, match="codec mismatch"):
            block_format.decode(_layout(reader), bytes(data), _key(0))
    # A forged header: the codec field rewritten and the checksum recomputed.
    data[128:144] = b"kivi-int8".ljust(16, b"\0")
    data[12:28] = xxhash.xxh3_128(bytes(data[28:])).digest()
    with pytest.raises(block_format.BlockFormatError, match="codec mismatch"):
        block_format.decode(_layout("fp8"), bytes(data), _key(0))
    with pytest.raises(block_format.BlockFormatError, match="payload length mismatch"):
        block_format.decode(_layout("int8"), bytes(data), _key(0))


@pytest.mark.parametrize("codec", CODECS)
def test_scales_that_are_not_finite_are_rejected(codec: str) -> None:
    layout = _layout(codec)
    good = _coded_block(codec)
    assert stored_block_problem(layout, good.payload) is None
    assert stored_block_problem(_layout("none"), torch.full((8,), 255, dtype=torch.uint8)) is None
    specs = get_codec(codec).parts(BlockShape(BS, HEADS, DIM), torch.float32)
    offset = specs[0].nbytes  # the first scale part follows the K codes
    bad = good.payload.clone()
    row = bad.view(LAYERS, -1)[LAYERS - 1]  # the last layer's row
    nan = torch.tensor([float("nan")], dtype=specs[1].dtype).view(torch.uint8)
    row[offset : offset + nan.numel()] = nan
    assert "not finite" in (stored_block_problem(layout, bad) or "")


def test_a_checksummed_block_with_bad_scales_is_a_deleted_miss(tmp_path: Path) -> None:
    """A writer without a secret can forge a block that passes its checksum: its scales
    are checked before it enters the cpu tier."""
    layout = _layout("fp8")
    disk = DiskTier(layout, tmp_path, 1 << 20)
    block = _coded_block("fp8")
    block.payload.view(torch.float32)[BS * HEADS * DIM // 4] = float("inf")  # a K scale
    disk.put([block])
    cpu = CPUTier(layout, 4 * layout.nbytes, pin_memory=False)
    assert LowerTiers(cpu, [disk]).read([BlockRef(block.key, block.token_ids)]) == []
    assert cpu.num_blocks == 0 and disk.contains([block.key]) == [False]
    assert disk.stats.snapshot()["corrupt"] == 1
    fine = _coded_block("fp8", 1)
    disk.put([fine])
    assert LowerTiers(cpu, [disk]).read([BlockRef(fine.key, fine.token_ids)]) == [fine.key]


# ---- config and engine ---------------------------------------------------------------------


def test_config_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="kv_tier_codec must be one of none, fp8, int8, int4"):
        TierConfig(cpu_memory=1, codec="int2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="none is on: set kv_cpu_memory"):
        TierConfig(codec="fp8")
    with pytest.raises(ValueError, match="needs kv_cache_dtype auto"):
        CacheConfig(kv_cache_dtype="int8", tiers=TierConfig(cpu_memory=1, codec="fp8"))


GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
KW: dict[str, Any] = {"device": "cpu", "block_size": 4, "max_model_len": 48}


def _prompts() -> list[list[int]]:
    return [[(i * 37 + j * 11) % 500 + 3 for j in range(41)] for i in range(4)]


@pytest.fixture(scope="module")
def folder(tiny_models: dict[str, Any]) -> Path:
    return tiny_models["llama-gqa"][0]


@pytest.mark.parametrize("codec", CODECS)
def test_engine_serves_prefixes_loaded_through_a_tier_codec(folder: Path, codec: str) -> None:
    llm = LLM(str(folder), num_kv_blocks=16, kv_cpu_memory=0.01, kv_tier_codec=codec, **KW)
    assert llm.engine.tiers is not None
    layout = llm.engine.tiers.cpu.layout
    assert layout.codec == get_codec(codec).layout_name
    assert layout.nbytes < llm.engine.kv_cache.block_bytes  # the raw pool's block
    first = [o.token_ids for o in llm.generate(_prompts(), GREEDY)]
    llm.engine.kv.evict_all_cached()
    again = [o.token_ids for o in llm.generate(_prompts(), GREEDY)]
    assert all(len(t) == 6 for t in again)
    stats = llm.stats()
    assert stats["prefix_cache_tier_hit_tokens"] == 4 * 40 and stats["kv_tier_partial_loads"] == 0
    if codec == "int8":  # the tiny model's margins hold against int8 KV
        assert again == first
    assert_no_leaks(llm)
    llm.close()


def test_engines_of_other_tier_codecs_never_share_disk_blocks(folder: Path, tmp_path: Path) -> None:
    kw = {**KW, "num_kv_blocks": 64, "kv_disk_dir": str(tmp_path)}
    prompt = _prompts()[:1]
    hits = []
    for codec in ["fp8", "none", "int4", "fp8"]:
        llm = LLM(str(folder), kv_tier_codec=codec, **kw)
        assert len(llm.generate(prompt, GREEDY)[0].token_ids) == 6
        hits.append(llm.stats()["prefix_cache_tier_hit_tokens"])
        llm.close()
    assert hits == [0, 0, 0, 40]  # only the second fp8 engine finds the first one's blocks
    roots = {c: LLM(str(folder), kv_cpu_memory=0.01, kv_tier_codec=c, **kw).engine.kv.root
             for c in ["none", "fp8"]}  # fmt: skip
    assert roots["none"] != roots["fp8"]


def test_swapped_sequences_come_back_through_the_codec(folder: Path) -> None:
    """Swap preemption moves a running sequence's blocks through the cpu tier: under a tier
    codec they come back decoded, and every sequence still completes without leaks."""
    long = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = [[(i * 53 + j * 7) % 500 + 3 for j in range(37)] for i in range(4)]
    llm = LLM(str(folder), num_kv_blocks=22, kv_cpu_memory=0.01, preemption_mode="swap",
              kv_tier_codec="int8", **KW)  # fmt: skip
    outs = llm.generate(prompts, long)
    assert all(len(o.token_ids) == 10 for o in outs)
    stats = llm.stats()
    assert stats["num_swaps"] == stats["num_preemptions"] > 0
    assert stats["prefix_cache_tier_hit_tokens"] > 0
    assert_no_leaks(llm)
    llm.close()

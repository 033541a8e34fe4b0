"""Triton paged attention on the GPU: correctness against the reference, and speed.

Correctness: fresh random bf16 inputs for every check (shuffled block tables, random
lengths); the reference backend runs on float32 copies of the same values. A check
passes when ||out - ref|| / ||ref|| <= 1e-2 and nothing is NaN; the KV write must equal
the reference's index_copy_ bit for bit.

Speed, Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128, bf16, block 16):
  decode   one layer's attend, replayed from a CUDA graph over enough layers' caches to
           exceed L2; KV bytes/s over the device copy bandwidth measured in this run
  prefill  one causal sequence of 8k / 32k tokens; TFLOP/s over the bf16 matmul rate
           measured in this run (torch SDPA's flash kernel on the same shape for scale)

    python benchmarks/gpu_check.py --only attention [--sweep]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import torch

from strata.attention.backend import BatchLayout
from strata.attention.reference import ReferenceAttention
from strata.attention.triton_backend import TritonAttention
from strata.attention.triton_decode import DecodeTile, decode_attention
from strata.attention.triton_prefill import PrefillTile, prefill_attention

Specs = list[tuple[int, int]]  # (query_len, context_len) per sequence
TOLERANCE = 1e-2
# A CPU dry run of check_case: TRITON_INTERPRET=1, DEVICE "cpu", DTYPE float16 (the
# interpreter's tl.dot gets bf16 wrong; on the GPU bf16 is right).
DEVICE = "cuda"
DTYPE = torch.bfloat16


def random_batch(
    specs: Specs, block_size: int, gen: torch.Generator
) -> tuple[BatchLayout, torch.Tensor, int]:
    """Layout over a shuffled pool, the step's slots (device), and the pool's block count."""
    need = [-(-ctx // block_size) for _, ctx in specs]
    num_blocks = sum(need) + 4
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for (q_len, ctx), n in zip(specs, need, strict=True):
        table = [pool.pop() for _ in range(n)]
        tables.append(table)
        positions = range(ctx - q_len, ctx)
        slots += [table[p // block_size] * block_size + p % block_size for p in positions]
    layout = BatchLayout([q for q, _ in specs], [c for _, c in specs], tables, block_size)
    return layout, torch.tensor(slots, dtype=torch.long, device=DEVICE), num_blocks


def check_case(specs: Specs, block_size: int, kv_heads: int, group: int, head_dim: int,
               gen: torch.Generator) -> float:  # fmt: skip
    """Relative error of the Triton backend (bf16) against the reference (float32)."""
    layout, slots, num_blocks = random_batch(specs, block_size, gen)
    tokens = sum(q for q, _ in specs)
    dev = torch.device(DEVICE)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, device=dev, dtype=DTYPE)
    v_cache = torch.randn(shape, device=dev, dtype=DTYPE)
    q, k, v = (torch.randn(tokens, h, head_dim, device=dev, dtype=DTYPE)
               for h in (kv_heads * group, kv_heads, kv_heads))  # fmt: skip
    scale = head_dim**-0.5

    ref = ReferenceAttention()
    ref_meta = ref.prepare(layout, slots, dev)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref.write_kv(ref_k, ref_v, k, v, ref_meta)
    backend = TritonAttention()
    meta = backend.prepare(layout, slots, dev)
    backend.write_kv(k_cache, v_cache, k, v, meta)
    if not (torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)):
        return math.inf
    out = backend.attend(q, k_cache, v_cache, meta, scale).float()
    want = ref.attend(q.float(), ref_k.float(), ref_v.float(), ref_meta, scale)
    if out.isnan().any():
        return math.nan
    return ((out - want).norm() / want.norm()).item()


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


FAMILIES: dict[str, Callable[[torch.Generator], Specs]] = {
    "decode b1 ctx 1..32k": lambda g: [(1, _randint(g, 1, 32768))],
    "decode b1 ctx 32k": lambda g: [(1, 32768)],
    "decode b8 ctx 1..8k": lambda g: [(1, _randint(g, 1, 8192)) for _ in range(8)],
    "decode b64 ctx 1..2k": lambda g: [(1, _randint(g, 1, 2048)) for _ in range(64)],
    "prefill b2, no prefix": lambda g: [(n, n) for n in (_randint(g, 2, 4096) for _ in "ab")],
    "prefill chunk + prefix..32k": lambda g: [
        (q, _randint(g, q, 32768)) for q in [_randint(g, 2, 2048)]
    ],
    "mixed 16 dec + 3 chunks": lambda g: (
        [(1, _randint(g, 1, 4096)) for _ in range(16)]
        + [(q, q + _randint(g, 0, 8192)) for q in (_randint(g, 2, 1024) for _ in "abc")]
    ),
}


def check_attention(seed: int = 0) -> bool:
    """Every family at head_dim 64/128, block 16/32, GQA 1/4/8 (2 KV heads)."""
    gen = torch.Generator().manual_seed(seed)
    errors: dict[str, list[float]] = {}
    for head_dim in (64, 128):
        for block_size in (16, 32):
            for group in (1, 4, 8):
                for name, make in FAMILIES.items():
                    err = check_case(make(gen), block_size, 2, group, head_dim, gen)
                    errors.setdefault(f"{name}, d{head_dim}", []).append(err)
                    if not err <= TOLERANCE:  # NaN fails too
                        print(f"FAIL {name} d{head_dim} bs{block_size} G{group}: {err}")
    print("\nTriton (bf16) vs reference (float32): block 16/32 x GQA 1/4/8, fresh inputs each")
    print(f"{'shape family':<36} {'checks':>6} {'max rel err':>12}  result")
    failed = False
    for key, errs in errors.items():
        worst = math.nan if any(math.isnan(e) for e in errs) else max(errs)
        ok = worst <= TOLERANCE
        failed |= not ok
        print(f"{key:<36} {len(errs):>6} {worst:>12.2e}  {'PASS' if ok else 'FAIL'}")
    return not failed


def median_time(fn: Callable[[], object], reps: int = 20) -> float:
    """Median seconds per call, timed with CUDA events after two warm-up calls."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def graph_time(fn: Callable[[], object], reps: int = 30) -> float:
    """Median seconds per replay of a CUDA graph of fn."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_time(graph.replay, reps)


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.randn(2**29, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), 10)
    return 2 * src.numel() * src.element_size() / seconds


def matmul_rate() -> float:
    """FLOP/s of an 8192^3 bf16 matrix product on random data."""
    a, b = (torch.randn(8192, 8192, device=DEVICE, dtype=DTYPE) for _ in "ab")
    return 2 * 8192**3 / median_time(lambda: a @ b, 10)


HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16  # Llama-3-8B


def bench_decode(batch: int, ctx: int, bandwidth: float, tile: DecodeTile | None = None,
                 splits: int | None = None) -> tuple[float, float, float]:  # fmt: skip
    """(graph us per layer, eager us per layer, fraction of copy bandwidth)."""
    gen = torch.Generator().manual_seed(batch * ctx)
    layout, slots, num_blocks = random_batch([(1, ctx)] * batch, BLOCK, gen)
    layer_bytes = batch * ctx * KV_HEADS * HEAD_DIM * 2 * 2
    layers = max(2, min(64, -(-(1 << 29) // layer_bytes)))  # >= 512 MiB of KV in all
    shape = (layers, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    out = torch.empty_like(q)
    meta = TritonAttention().prepare(layout, slots, torch.device(DEVICE))
    assert meta.decode is not None

    def step() -> None:
        for i in range(layers):
            decode_attention(q, k_cache[i], v_cache[i], out, meta.decode, BLOCK,
                             HEAD_DIM**-0.5, splits, tile)  # fmt: skip

    per_layer = graph_time(step) / layers
    eager = median_time(step, 10) / layers
    return per_layer * 1e6, eager * 1e6, layer_bytes / per_layer / bandwidth


def bench_prefill(tokens: int, tile: PrefillTile | None = None) -> tuple[float, float, float]:
    """(ms, TFLOP/s of the Triton kernel, TFLOP/s of torch SDPA flash) for one sequence."""
    gen = torch.Generator().manual_seed(tokens)
    layout, slots, num_blocks = random_batch([(tokens, tokens)], BLOCK, gen)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    v_cache = torch.randn(shape, device=DEVICE, dtype=DTYPE)
    q = torch.randn(tokens, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    out = torch.empty_like(q)
    meta = TritonAttention().prepare(layout, slots, torch.device(DEVICE))
    assert meta.prefill is not None
    flops = 2 * 2 * HEADS * HEAD_DIM * tokens * (tokens + 1) / 2  # causal QK^T and PV
    seconds = median_time(
        lambda: prefill_attention(q, k_cache, v_cache, out, meta.prefill, BLOCK,
                                  HEAD_DIM**-0.5, tile), 5)  # fmt: skip
    qs = q.transpose(0, 1).unsqueeze(0)
    ks, vs = (torch.randn(1, HEADS, tokens, HEAD_DIM, device=DEVICE, dtype=DTYPE)
              for _ in "kv")  # fmt: skip
    sdpa = median_time(
        lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True), 5
    )
    return seconds * 1e3, flops / seconds / 1e12, flops / sdpa / 1e12


def bench_kv_write(tokens: int) -> tuple[float, float]:
    """(Triton us, two index_copy_ us) to store one layer's K/V of `tokens` tokens (graph)."""
    gen = torch.Generator().manual_seed(tokens)
    layout, slots, num_blocks = random_batch([(1, BLOCK)] * tokens, BLOCK, gen)
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = (torch.empty(shape, device=DEVICE, dtype=DTYPE) for _ in "kv")
    k, v = (torch.randn(tokens, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE) for _ in "kv")
    dev = torch.device(DEVICE)
    ours, theirs = TritonAttention(), ReferenceAttention()
    meta, ref_meta = ours.prepare(layout, slots, dev), theirs.prepare(layout, slots, dev)
    triton_s = graph_time(lambda: ours.write_kv(k_cache, v_cache, k, v, meta))
    torch_s = graph_time(lambda: theirs.write_kv(k_cache, v_cache, k, v, ref_meta))
    return triton_s * 1e6, torch_s * 1e6


DECODE_SHAPES = [(1, 4096), (1, 32768), (64, 1024), (1, 128), (8, 8192)]
PREFILL_TOKENS = [8192, 32768]


def bench_attention() -> None:
    bandwidth, rate = copy_bandwidth(), matmul_rate()
    print(f"\nceilings: device copy {bandwidth / 1e12:.2f} TB/s, "
          f"bf16 matmul {rate / 1e12:.0f} TFLOP/s")  # fmt: skip
    print(f"decode, Llama-3-8B attention (32 q / 8 kv heads, d128, block {BLOCK}), per layer")
    print(f"{'batch':>5} {'context':>7} {'graph us':>9} {'eager us':>9} {'GB/s':>7} {'of copy':>8}")
    for batch, ctx in DECODE_SHAPES:
        us, eager, frac = bench_decode(batch, ctx, bandwidth)
        gbs = frac * bandwidth / 1e9
        print(f"{batch:>5} {ctx:>7} {us:>9.1f} {eager:>9.1f} {gbs:>7.0f} {frac:>8.1%}")
    print("KV write, one layer (graph): tokens, Triton us, index_copy_ x2 us")
    for tokens in (64, 8192):
        ours, theirs = bench_kv_write(tokens)
        print(f"{tokens:>7} {ours:>8.1f} {theirs:>8.1f}")
    print("prefill, one causal sequence, same shape")
    print(f"{'tokens':>7} {'ms':>8} {'TFLOP/s':>8} {'of matmul':>10} {'SDPA TFLOP/s':>13}")
    for tokens in PREFILL_TOKENS:
        ms, tflops, sdpa = bench_prefill(tokens)
        print(f"{tokens:>7} {ms:>8.2f} {tflops:>8.0f} {tflops * 1e12 / rate:>10.1%} {sdpa:>13.0f}")


def sweep_tiles() -> None:
    """Tile and split choices of both kernels on the benchmark shapes (tunes the defaults)."""
    bandwidth = copy_bandwidth()
    print("\ndecode sweep: fraction of copy bandwidth (graph); splits None = default policy")
    tiles = [DecodeTile(64, 4, 3), DecodeTile(128, 4, 3), DecodeTile(64, 4, 4),
             DecodeTile(128, 4, 4), DecodeTile(64, 2, 3)]  # fmt: skip
    for batch, ctx, choices in [(1, 4096, (None, 32, 64)), (1, 32768, (None, 64, 128)),
                                (8, 8192, (None, 4, 8, 16)), (64, 1024, (None, 2, 4))]:  # fmt: skip
        for splits in choices:
            fracs = [bench_decode(batch, ctx, bandwidth, t, splits)[2] for t in tiles]
            cells = "  ".join(f"{f:.1%}" for f in fracs)
            print(f"  b{batch} ctx {ctx} splits {splits}: {cells}")
    print(f"  (columns: {', '.join(f'{t.block_n}/{t.num_warps}/{t.num_stages}' for t in tiles)})")
    print("prefill sweep: TFLOP/s at 8k, 32k tokens")
    for tile in [PrefillTile(128, 64, 8, 3), PrefillTile(128, 64, 4, 3),
                 PrefillTile(128, 64, 4, 2), PrefillTile(128, 64, 4, 4),
                 PrefillTile(128, 128, 4, 3), PrefillTile(128, 128, 4, 2),
                 PrefillTile(128, 32, 4, 3), PrefillTile(256, 64, 8, 3)]:  # fmt: skip
        try:
            rates = [bench_prefill(n, tile)[1] for n in PREFILL_TOKENS]
            print(f"  {tile}: " + "  ".join(f"{r:.0f}" for r in rates))
        except Exception as e:  # a tile may not fit shared memory
            print(f"  {tile}: {type(e).__name__}")


def attention_section(sweep: bool = False) -> bool:
    """Correctness then speed; True when every correctness check passed."""
    print(f"\nattention on {torch.cuda.get_device_name()}")
    ok = check_attention()
    bench_attention()
    if sweep:
        sweep_tiles()
    return ok

"""How fast a kernel gathers rows from pinned host memory, by host buffer size, row size,
rows per call and how the buffer was pinned (issue 16: the recall store's fetches).

    python benchmarks/uva_gather_sweep.py [--sizes-gib 0.25,8,64] [--row-kib 4,8,16]
        [--rows 4096,65536] [--pinning register,hugepages,torch] [--kernels 1024x4,2048x4,2048x8]
        [--json F] [--png F]

A profile of a graphed recall step at 128k (docs/benchmarks.md) found the row gather
(strata/ops/triton_row_copy.py) moving 4 KiB rows at about 30-34 GB/s inside the step,
where a microbenchmark over a 256 MiB buffer reached 49.5 GB/s and a pinned memcpy 55.
The store is 60-100 GiB: if the GPU's translations of host pages are what limits random
4 KiB reads, the rate falls with the buffer's size and rises with the row size and with
huge host pages. Each point gathers `rows` random rows (of `row` KiB) from a buffer of
`size` GiB into the GPU, through the same kernel, and reports GB/s over the median of 7.
`--kernels CHUNKxWARPS,...` runs the kernel with other elements per program and warps
too (the engine's is 1024x4), at the first row size and the largest buffer.

Pinning:
  torch       torch's pinned allocator (cudaHostAlloc; rounds up to a power of two)
  register    page-aligned host memory registered with cudaHostRegister (strata/pinned.py,
              what the recall store uses)
  hugepages   the same, from an anonymous mapping advised MADV_HUGEPAGE before first touch
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
from tqdm import tqdm

from strata.ops.triton_row_copy import CHUNK, _copy_rows_kernel, _Pinned
from strata.pinned import pinned_zeros

GIB = 1 << 30


def hugepage_pinned(nbytes: int) -> tuple[torch.Tensor, Any]:
    """A registered host buffer from an anonymous mapping advised to use huge pages; the
    mapping (returned beside it) must outlive the tensor."""
    size = -(-nbytes // (2 << 20)) * (2 << 20)
    area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_HUGEPAGE)
    tensor = torch.frombuffer(area, dtype=torch.uint8)
    tensor.zero_()  # first touch, after the advice
    err = torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), size, 0x01 | 0x02)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {int(err)}")
    return tensor, area


def host_buffer(kind: str, nbytes: int) -> tuple[torch.Tensor, Callable[[], None]]:
    """A pinned uint8 host buffer of nbytes, and what releases it."""
    if kind == "torch":  # freed blocks stay in torch's pinned cache unless emptied
        empty = getattr(torch._C, "_host_emptyCache", lambda: None)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True), empty
    if kind == "register":
        return pinned_zeros((nbytes,), torch.uint8), lambda: None
    tensor, area = hugepage_pinned(nbytes)

    def release() -> None:
        torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())

    del area  # the tensor's buffer keeps the mapping alive
    return tensor, release


def gather_gbps(
    host: torch.Tensor, row_bytes: int, rows: int, chunk: int = CHUNK, warps: int = 4,
    repeat: int = 7,
) -> float:  # fmt: skip
    """GB/s of gathering `rows` random rows of row_bytes from host (as bf16 rows) through
    the engine's row-copy kernel, with `chunk` elements a program and `warps` warps (the
    engine's: CHUNK and 4). The first call, checked row for row, also compiles."""
    elems = row_bytes // 2
    table = host[: host.numel() // row_bytes * row_bytes].view(torch.bfloat16).view(-1, elems)
    dev = torch.empty(rows, elems, dtype=torch.bfloat16, device="cuda")
    dst = torch.arange(rows, device="cuda")

    def launch(pick: torch.Tensor) -> None:
        _copy_rows_kernel[(rows, -(-elems // chunk))](
            _Pinned(table), dev, pick, dst, ROW=elems, CHUNK=chunk, num_warps=warps
        )

    check = torch.randint(0, table.shape[0], (rows,))
    table[check] = torch.randn(rows, elems, dtype=torch.bfloat16)  # the rows checked below
    launch(check.cuda())
    if not torch.equal(dev.cpu(), table[check]):
        raise RuntimeError(f"kernel {chunk}x{warps} gathered wrong rows")
    times = []
    for _ in range(repeat):
        pick = torch.randint(0, table.shape[0], (rows,), device="cuda")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch(pick)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return rows * row_bytes / statistics.median(times) / 1e9


def kernel_sweep(size: float, row_kib: int, counts: list[int], kernels: list[str]
                 ) -> list[dict[str, Any]]:  # fmt: skip
    host, release = host_buffer("register", int(size * GIB))
    points = []
    for spec in tqdm(kernels, desc="kernels"):
        chunk, warps = (int(x) for x in spec.split("x"))
        for rows in counts:
            rate = gather_gbps(host, row_kib << 10, rows, chunk, warps)
            points.append({"kernel": spec, "size_GiB": size, "row_KiB": row_kib, "rows": rows,
                           "GBps": rate})  # fmt: skip
    release()
    return points


def sweep(sizes: list[float], row_kib: list[int], counts: list[int], kinds: list[str]
          ) -> list[dict[str, Any]]:  # fmt: skip
    points = []
    bar = tqdm(total=len(sizes) * len(kinds) * len(row_kib) * len(counts), desc="gather")
    for kind in kinds:
        for size in sizes:
            host, release = host_buffer(kind, int(size * GIB))
            for kib in row_kib:
                for rows in counts:
                    rate = gather_gbps(host, kib << 10, rows)
                    points.append({"pinning": kind, "size_GiB": size, "row_KiB": kib,
                                   "rows": rows, "GBps": rate})  # fmt: skip
                    bar.write(f"{kind:<10} {size:>8g} {kib:>8} {rows:>8} {rate:>6.1f}")
                    bar.update()
            del host  # before release: torch's cache can only empty a freed block
            release()
    bar.close()
    return points


def memcpy_gbps() -> float:
    host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    dev.copy_(host, non_blocking=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    return 5 * host.numel() / (start.elapsed_time(end) / 1e3) / 1e9


def plot(points: list[dict[str, Any]], memcpy: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    counts = sorted({p["rows"] for p in points})
    fig, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 4.5), squeeze=False)
    for ax, rows in zip(axes[0], counts, strict=True):
        lines = sorted({(p["pinning"], p["row_KiB"]) for p in points})
        for kind, kib in lines:
            key = (kind, kib, rows)
            mine = [p for p in points if (p["pinning"], p["row_KiB"], p["rows"]) == key]
            ax.plot([p["size_GiB"] for p in mine], [p["GBps"] for p in mine], marker="o",
                    label=f"{kind}, {kib} KiB rows")  # fmt: skip
        ax.axhline(memcpy, color="gray", linestyle="--", label="pinned memcpy")
        ax.set_xscale("log")
        ax.set_xlabel("host buffer (GiB)")
        ax.set_ylabel("gather GB/s")
        ax.set_title(f"{rows} random rows a call")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes-gib", default="0.25,8,64", help="host buffer sizes (GiB)")
    p.add_argument("--row-kib", default="4,8,16", help="row sizes (KiB): 4 is a 16-token "
                   "block of one 128-dim head in bf16, the recall store's row")  # fmt: skip
    p.add_argument("--rows", default="4096,65536",
                   help="rows a call: 4096 is one layer's K (or V) misses of a 4-row page")
    p.add_argument("--pinning", default="register,hugepages,torch",
                   help="how the host buffer is pinned: torch, register, hugepages")
    p.add_argument("--kernels", default="1024x4,2048x4,2048x8,512x2",
                   help="CHUNKxWARPS kernel variants (registered buffer, first row size, "
                        "largest buffer); empty: none")
    p.add_argument("--json", default=None, help="write the points here")
    p.add_argument("--png", default=None, help="plot GB/s against buffer size here")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("uva_gather_sweep needs a CUDA GPU")
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    memcpy = memcpy_gbps()
    print("pinning    size GiB  row KiB     rows   GB/s (as measured)")
    points = sweep(floats(a.sizes_gib), [int(x) for x in a.row_kib.split(",")],
                   [int(x) for x in a.rows.split(",")], a.pinning.split(","))  # fmt: skip
    print(f"{torch.cuda.get_device_name()}: pinned memcpy {memcpy:.1f} GB/s")
    print("pinning    size GiB  row KiB     rows   GB/s  of memcpy")
    for q in points:
        print(f"{q['pinning']:<10} {q['size_GiB']:>8g} {q['row_KiB']:>8} {q['rows']:>8} "
              f"{q['GBps']:>6.1f} {q['GBps'] / memcpy:>9.0%}")  # fmt: skip
    kernels = []
    if a.kernels:
        kernels = kernel_sweep(max(floats(a.sizes_gib)), int(a.row_kib.split(",")[0]),
                               [int(x) for x in a.rows.split(",")], a.kernels.split(","))
    for q in kernels:
        print(f"kernel {q['kernel']:<8} {q['size_GiB']:>6g} GiB {q['row_KiB']} KiB rows "
              f"{q['rows']:>6} rows: {q['GBps']:.1f} GB/s")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"memcpy_GBps": memcpy, "points": points, "kernels": kernels}, f, indent=1)
    if a.png:
        plot(points, memcpy, a.png)


if __name__ == "__main__":
    main()

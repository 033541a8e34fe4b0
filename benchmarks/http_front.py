"""HTTP throughput against offline throughput at saturation, engine in process and in
its own process (issue 19), the latter behind 1 or more HTTP front processes
(--api-server-count): `strata bench throughput` offline, then over HTTP against
`strata serve` in each mode, alternating, `--repeats` times; prints one table.

    python benchmarks/http_front.py --model random:benchmarks/configs/tiny_host_bound.json \\
        --device cpu --vocab-size 2048 --kv-cache-memory 0.1 --torch-threads 1 --repeats 3 \\
        --api-server-count 1,2

Everything runs on this machine (server, engine and load generator share its cores).
`--spy DIR` records each run's engine under py-spy (the offline benchmark's process; the
engine process behind the HTTP front), as raw collapsed stacks that
benchmarks/spy_summary.py reads: where the engine's thread spends a step in each mode.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, run as a script

from strata.bench.server_process import last_lines, wait_healthy

Mode = tuple[list[str], int] | None  # (`strata serve` flags, client processes); None: offline


def modes(counts: list[int], in_process: bool, clients: list[int]) -> dict[str, Mode]:
    """mode name -> how it runs. "process": the engine in its own process behind one HTTP
    front; "fronts=N": behind N (--api-server-count N); each HTTP mode once per number of
    load-generator processes, named with it when there are several."""
    servers: dict[str, list[str]] = {}
    if in_process:
        servers["in-process"] = ["--engine-in-process"]
    for n in counts:
        servers["process" if n == 1 else f"fronts={n}"] = ["--api-server-count", str(n)]
    out: dict[str, Mode] = {"offline": None}
    for name, flags in servers.items():
        for c in clients:
            out[name if len(clients) == 1 else f"{name}, {c} clients"] = (flags, c)
    return out


def strata(*args: str) -> list[str]:
    return [sys.executable, "-m", "strata.cli", *args]


def workload(a: argparse.Namespace) -> list[str]:
    return [
        "--num-requests", str(a.num_requests), "--input-len", a.input_len,
        "--output-len", a.output_len, "--concurrency", str(a.concurrency), "--seed", "0",
    ]  # fmt: skip


def engine_flags(a: argparse.Namespace) -> list[str]:
    flags = ["--model", a.model, "--device", a.device]
    if a.kv_cache_memory is not None:
        flags += ["--kv-cache-memory", str(a.kv_cache_memory)]
    return flags


def run_offline(a: argparse.Namespace, out: Path) -> float:
    cmd = strata("bench", "throughput", *engine_flags(a), *workload(a), "--json", str(out))
    if a.spy is not None:
        cmd = [*spy_command(a.spy / f"spy_{out.stem}.txt"), "--", *cmd]
    run_quiet(cmd)
    return _tok_s(out)


def spy_command(path: Path) -> list[str]:
    """py-spy recording every thread, waits included, as raw collapsed stacks."""
    spy = shutil.which("py-spy") or "py-spy"
    return [spy, "record", "--nonblocking", "--idle", "--threads", "--rate", "100",
            "--format", "raw", "-o", str(path)]  # fmt: skip


def spy_engine(server: subprocess.Popen[bytes], path: Path) -> subprocess.Popen[bytes]:
    """py-spy on the server's engine process (its spawned child), until interrupted."""
    import psutil

    children = psutil.Process(server.pid).children(recursive=True)
    engines = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
    if not engines:
        raise RuntimeError("no engine process found under the server (--engine-in-process?)")
    cmd = [*spy_command(path), "--pid", str(engines[0].pid)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def run_http(a: argparse.Namespace, flags: list[str], clients: int, out: Path) -> float:
    url = f"http://127.0.0.1:{a.port}"
    log = out.with_suffix(".server.log")
    with log.open("wb") as sink:
        server = subprocess.Popen(
            strata("serve", *engine_flags(a), "--port", str(a.port), "--log-level", "WARNING",
                   *flags),
            stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_healthy(server, a.port, timeout_s=120, poll_s=0.2, log=log)
        spy = None if a.spy is None else spy_engine(server, a.spy / f"spy_{out.stem}.txt")
        cmd = strata(
            "bench", "throughput", "--url", url, "--vocab-size", str(a.vocab_size),
            *workload(a), "--client-processes", str(clients), "--json", str(out),
        )  # fmt: skip
        run_quiet(cmd)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
            spy.wait(60)
        return _tok_s(out)
    finally:
        server.terminate()
        server.wait(60)


def run_quiet(cmd: list[str]) -> None:
    """Runs `cmd` with its output held back; raises with the end of it if it fails."""
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        output = done.stdout.decode(errors="replace")
        failed = f"{' '.join(cmd[2:5])} failed ({done.returncode})"
        raise RuntimeError(f"{failed}:\n{last_lines(output)}")


def _tok_s(path: Path) -> float:
    data = json.loads(path.read_text())
    rows = data["results"] if isinstance(data, dict) else data
    return float(rows[-1]["output_tokens_per_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--kv-cache-memory", type=float, default=None, help="GiB (default: the engine's)"
    )
    p.add_argument("--vocab-size", type=int, required=True, help="the model's vocabulary")
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--input-len", default="16-32")
    p.add_argument("--output-len", default="128-128")
    p.add_argument("--concurrency", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--port", type=int, default=8790)
    p.add_argument(
        "--torch-threads", type=int, default=None,
        help="OMP_NUM_THREADS for every process (on a small CPU, an engine with more threads "
        "than it has cores to itself waits for them: 1 on 2 cores leaves one for HTTP)",
    )  # fmt: skip
    p.add_argument(
        "--api-server-count", default="1",
        help="HTTP front processes to measure the engine-process mode with, comma-separated "
        "(default 1; e.g. 1,2,4)",
    )  # fmt: skip
    p.add_argument(
        "--client-processes", default="1",
        help="processes of the load generator (strata bench throughput --client-processes), "
        "comma-separated: each HTTP mode runs once with each (default 1)",
    )  # fmt: skip
    p.add_argument("--no-in-process", action="store_true", help="skip --engine-in-process")
    p.add_argument(
        "--spy", type=Path, default=None, metavar="DIR",
        help="record each run's engine under py-spy into DIR (py-spy on PATH): the offline "
        "process, and the engine process behind the HTTP front",
    )  # fmt: skip
    a = p.parse_args()
    if a.spy is not None:
        a.spy.mkdir(parents=True, exist_ok=True)
    counts = [int(n) for n in a.api_server_count.split(",")]
    clients = [int(n) for n in a.client_processes.split(",")]
    if a.torch_threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(a.torch_threads)
    runs = modes(counts, not a.no_in_process, clients)
    results: dict[str, list[float]] = {mode: [] for mode in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for mode, how in runs.items():
                out = Path(tmp) / f"{mode.replace(', ', '_')}-{r}.json"
                tok_s = run_offline(a, out) if how is None else run_http(a, *how, out)
                results[mode].append(tok_s)
                print(f"run {r + 1}: {mode:<10} {tok_s:9.0f} out tok/s", flush=True)
                time.sleep(1)  # the server's port and processes are released
    offline = statistics.median(results["offline"])
    print(f"\n{os.cpu_count()} CPUs, torch threads {a.torch_threads or 'default'}; {a.model}; "
          f"{a.num_requests} requests, input {a.input_len}, output {a.output_len}, "
          f"concurrency {a.concurrency}")  # fmt: skip
    print("| mode | out tok/s, median | runs | of offline |\n|---|---|---|---|")
    for mode, values in results.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:,.0f}" for v in values)
        print(f"| {mode} | {median:,.0f} | {runs} | {median / offline:.0%} |")


if __name__ == "__main__":
    main()

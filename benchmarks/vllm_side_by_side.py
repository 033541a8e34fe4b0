"""Strata against vLLM 0.26.0 on the same GPU, the same requests, in one call.

Each engine runs in its own subprocess, one after the other, so each has the whole GPU;
a subprocess writes its numbers as JSON to a temporary file. Random weights on real shapes:
Strata loads `random:/tmp/vllm-models/NAME/config.json`, vLLM the same folder with
load_format="dummy"; the folder holds the Strata preset's config.json (plus
architectures=LlamaForCausalLM, dtype=bfloat16) and, when the bundle carried it, the
SmolLM2 tokenizer (49,152 ids; prompts use ids below that, outputs of a random model may
not, and both engines' detokenizers return nothing for such ids).

offline-1b  Llama-3.2-1B shape, 256 requests, input and output lengths uniform 100-1024
offline-8b  Llama-3-8B shape, the same workload; output tok/s and wall time
long        Llama-3-8B shape, 32 requests, input uniform 8k-16k, output 256
decode      Llama-3-8B shape, batch 1, contexts 128 / 4096 / 32768: ms per decode step =
            (time of prefill + N+1 tokens - time of prefill + 1 token) / N
serve       Llama-3.2-1B shape behind each engine's own OpenAI server (Strata: `strata serve
            --model random:FOLDER/config.json`; vLLM: its openai.api_server on FOLDER,
            --load-format dummy), driven by `strata bench serve --url` (a process of its
            own, streaming, token-id prompts on /v1/completions, greedy, ignore_eos) at
            Poisson rates 8, 32, 64 and inf req/s (--serve-rates), 256 requests a rate
            (fresh prompts each rate), input 100-1024 and output 64-256 tokens: output
            tok/s, TTFT p50/p99 and TPOT p50/p99 per rate. A warm-up of 32 requests runs
            first. Each server starts on a free localhost port in a process group of its
            own, logs to a temporary file (its tail printed on a failure), and is stopped
            with SIGTERM (SIGKILL after 20-30 s); the script checks that no process of the
            group is left and the port is free. --serve-timeout bounds one engine's start,
            warm-up and rates (default 420 s). Token ids in and out: the folder holds no
            tokenizer unless --serve-tokenizer, and vLLM runs --skip-tokenizer-init
            (streaming `return_token_ids` chunks) unless Strata's server has a tokenizer
            (it answers a text prompt) and the folder holds it.
(long and decode share one engine per side: max_model_len 33280, prefix caching off.)

Requests come from strata.bench.workload.random_workload (fixed seeds), greedy, ignore_eos,
all submitted at once. Strata is built as benchmarks/gpu_speed.py builds it (offline:
max_num_batched_tokens 4096, max_model_len 2048; decode: prefix caching off), its KV pool
from gpu_memory_utilization 0.9 like vLLM's. vLLM: bf16, gpu_memory_utilization 0.9,
max_model_len sized to the section, its default scheduler, CUDA graphs and
torch.compile on (defaults), prefix caching as Strata's (on for offline, off for
long/decode), and the tokenizer only when Strata has one too.

vLLM's subprocess sets VLLM_USE_FLASHINFER_SAMPLER=0 (FlashInfer is not carried; the
sampler is greedy anyway, so its top-k/top-p path is unused), VLLM_NO_USAGE_STATS=1 and
DO_NOT_TRACK=1 (no network there), HF_HUB_OFFLINE=1, VLLM_CACHE_ROOT under /tmp. Its
attention backend is vLLM's own choice on Hopper, FLASH_ATTN with FA3 (printed).

On the GPU machine (the script puts /tmp/vllm-site on vLLM's path itself), in two calls
on one warm machine, each under ten minutes: with .vllm-parts1 carried,
  bash benchmarks/vllm_device_join.sh; PYTHONPATH=. python3 benchmarks/vllm_side_by_side.py \
      --engines strata --json /tmp/sbs_strata.json
then with .vllm-parts2 carried,
  bash benchmarks/vllm_device_join.sh && PYTHONPATH=. python3 benchmarks/vllm_side_by_side.py \
      --engines vllm --reuse /tmp/sbs_strata.json --json $OUT/sbs.json
The --json file is rewritten after every engine run, so a killed call keeps what finished.
serve runs only when --only names it (vLLM's offline sections take ~5 of a call's 10
minutes), best alone (Strata about 2 minutes, vLLM about 3-4 with its start), e.g.
  PYTHONPATH=. python3 benchmarks/vllm_side_by_side.py --only serve --engines strata \
      --json /tmp/sbs_serve.json
then, vLLM unpacked and .vllm-parts-extra/ carried (vLLM's API server needs
prometheus-fastapi-instrumentator, which bundles before it was added lack; make the
folder with benchmarks/vllm_bundle.sh --extras),
  PYTHONPATH=. python3 benchmarks/vllm_side_by_side.py --only serve --engines vllm \
      --reuse /tmp/sbs_serve.json --json $OUT/sbs_serve.json
A server that this script could not stop (the call was cut off) gets SIGTERM from the
kernel when the script dies (PR_SET_PDEATHSIG), and its group is killed by the next run.
Here (CPU): python3 benchmarks/vllm_side_by_side.py --smoke   (tiny Strata; vLLM skipped
when it cannot be imported)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

SECTIONS = ("offline-1b", "offline-8b", "long", "decode", "serve")
# serve is asked for by name: with it, one vLLM call of all sections would pass 600 s
DEFAULT_SECTIONS = ("offline-1b", "offline-8b", "long", "decode")
MODEL_ROOT = Path("/tmp/vllm-models")
TOKENIZER_DIRS = ("/tmp/vllm-site/smollm2-tokenizer",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
TOKENIZER_VOCAB = 49152
DECODE_CONTEXTS = (128, 4096, 32768)
REPO = Path(__file__).resolve().parent.parent
EXTRA_WHEELS = ".vllm-parts-extra"  # carried beside .vllm-partsN; see vllm_extra_site
VLLM_SERVER_MODULES = ("prometheus_fastapi_instrumentator", "uvicorn", "fastapi")
SERVER_PGID_FILE = Path(tempfile.gettempdir()) / "sbs-serve-server.pgid"  # a server not stopped

# One engine per group; a group runs the sections it holds that --only names.
GROUPS: dict[str, dict[str, Any]] = {
    "offline-1b": {"preset": "llama-3.2-1b", "sections": ["offline-1b"], "max_model_len": 2048,
                   "max_positions": None, "prefix_caching": True},
    "offline-8b": {"preset": "llama-3-8b", "sections": ["offline-8b"], "max_model_len": 2048,
                   "max_positions": None, "prefix_caching": True},
    "long-decode": {"preset": "llama-3-8b", "sections": ["long", "decode"],
                    "max_model_len": 33280, "max_positions": 33280, "prefix_caching": False},
    "serve": {"preset": "llama-3.2-1b", "sections": ["serve"], "max_model_len": 2048,
              "max_positions": None, "prefix_caching": True},
}  # fmt: skip
SMOKE_GROUPS: dict[str, dict[str, Any]] = {
    "offline-1b": {"preset": "smollm2-135m", "sections": ["offline-1b"], "max_model_len": 256,
                   "max_positions": None, "prefix_caching": True, "layers": 2},
    "long-decode": {"preset": "smollm2-135m", "sections": ["long", "decode"],
                    "max_model_len": 512, "max_positions": 512, "prefix_caching": False,
                    "layers": 2},
    "serve": {"preset": "smollm2-135m", "sections": ["serve"], "max_model_len": 256,
              "max_positions": None, "prefix_caching": True, "layers": 2},
}  # fmt: skip


# ---- workloads ---------------------------------------------------------------------------


def _random_workload() -> Any:
    """strata.bench.workload.random_workload, loaded from its file: the vLLM worker must
    not import the strata package (its __init__ pulls in the whole engine)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "strata" / "bench" / "workload.py"
    spec = importlib.util.spec_from_file_location("_sbs_workload", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.random_workload


def workload(section: str, smoke: bool) -> Any:
    random_workload = _random_workload()
    vocab = TOKENIZER_VOCAB
    if smoke:
        if section == "long":
            return random_workload(4, (200, 300), (8, 8), vocab, 2)
        return random_workload(8, (10, 60), (5, 20), vocab, 0)
    if section == "long":
        return random_workload(32, (8192, 16384), (256, 256), vocab, 2)
    return random_workload(256, (100, 1024), (100, 1024), vocab, 0)


def warmup_workload() -> Any:
    return _random_workload()(4, (16, 16), (4, 4), TOKENIZER_VOCAB, 1)


def decode_prompt(ctx: int) -> list[int]:
    import numpy as np

    rng = np.random.default_rng(ctx)
    return rng.integers(100, TOKENIZER_VOCAB, ctx).tolist()


def decode_contexts(smoke: bool) -> tuple[int, ...]:
    return (32, 128) if smoke else DECODE_CONTEXTS


# ---- model folders -----------------------------------------------------------------------


def model_folder(group: str, spec: dict[str, Any], tokenizer_dir: str | None) -> Path:
    from strata.models.presets import PRESETS

    cfg = dict(PRESETS[spec["preset"]])
    if spec.get("max_positions"):
        cfg["max_position_embeddings"] = spec["max_positions"]
    if spec.get("layers"):
        cfg["num_hidden_layers"] = spec["layers"]
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["dtype"] = "bfloat16"
    cfg["torch_dtype"] = "bfloat16"
    folder = MODEL_ROOT / group
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copy(src, folder / name)
    return folder


def find_tokenizer_dir(explicit: str | None) -> str | None:
    candidates = [explicit] if explicit else list(TOKENIZER_DIRS)
    if not explicit:
        cache = Path(os.environ.get("STRATA_CACHE_DIR", Path.home() / ".cache" / "strata"))
        candidates += sorted(str(p.parent) for p in cache.glob("gguf/SmolLM2*/tokenizer.json"))
    for c in candidates:
        if c and (Path(c) / "tokenizer.json").is_file():
            return c
    return None


# ---- Strata worker -----------------------------------------------------------------------


def strata_worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from strata import LLM, SamplingParams
    from strata.bench.throughput import run_strata

    smoke = job["smoke"]
    device = "cpu" if smoke else "cuda"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    spec = f"random:{job['folder']}/config.json"
    opts: dict[str, Any] = {"max_model_len": job["max_model_len"],
                            "enable_prefix_caching": job["prefix_caching"]}  # fmt: skip
    if smoke:
        opts.update(device="cpu", dtype="float32", kv_cache_memory=0.25,
                    max_num_batched_tokens=512)  # fmt: skip
    elif job["group"] == "long-decode":
        opts.update(dtype="bfloat16", max_num_batched_tokens=32768, max_num_seqs=32)
    else:
        opts.update(dtype="bfloat16", max_num_batched_tokens=4096)
    if job.get("strata_kv_gib") and not smoke:
        opts["kv_cache_memory"] = job["strata_kv_gib"]
    opts["overlap_scheduling"] = job.get("strata_overlap", "auto")
    t0 = time.perf_counter()
    llm = LLM(spec, **opts)
    out: dict[str, Any] = {"engine": "strata", "startup_s": time.perf_counter() - t0,
                           "options": {k: str(v) for k, v in opts.items()},
                           "tokenizer": llm.engine.tokenizer is not None}  # fmt: skip
    run_strata(llm, warmup_workload(), 4)

    def timed(prompt: list[int], n: int) -> float:
        params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
        sync()
        start = time.perf_counter()
        llm.generate([prompt], params)
        sync()
        return time.perf_counter() - start

    for section in job["sections"]:
        if section == "decode":
            out[section] = decode_rows(timed, job)
            continue
        wl = workload(section, smoke)
        res = run_strata(llm, wl, len(wl.prompts))
        out[section] = {"seconds": res.seconds, "output_tok_s": res.output_tokens_per_s,
                        "output_tokens": res.output_tokens, "input_tokens": res.input_tokens,
                        "requests": res.num_requests}  # fmt: skip
    llm.close()
    return out


def decode_rows(timed: Any, job: dict[str, Any]) -> list[dict[str, Any]]:
    new = job["decode_steps"]
    rows = []
    for ctx in decode_contexts(job["smoke"]):
        prompt = decode_prompt(ctx)
        one = min(timed(prompt, 1) for _ in range(2))
        many = min(timed(prompt, new + 1) for _ in range(2))
        rows.append({"context": ctx, "step_ms": (many - one) / new * 1e3,
                     "prefill_plus_one_s": one})  # fmt: skip
    return rows


# ---- vLLM worker -------------------------------------------------------------------------


def vllm_worker(job: dict[str, Any]) -> dict[str, Any]:
    import vllm
    from vllm import LLM, SamplingParams

    folder = job["folder"]
    use_tokenizer = job.get("tokenizer", False) and (Path(folder) / "tokenizer.json").is_file()
    kwargs: dict[str, Any] = {
        "model": folder, "load_format": "dummy", "dtype": "bfloat16",
        "gpu_memory_utilization": job["gpu_memory_utilization"],
        "max_model_len": job["max_model_len"],
        "enable_prefix_caching": job["prefix_caching"],
        "skip_tokenizer_init": not use_tokenizer, "seed": 0,
    }  # fmt: skip
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    out: dict[str, Any] = {"engine": "vllm", "version": vllm.__version__,
                           "startup_s": time.perf_counter() - t0,
                           "options": {k: str(v) for k, v in kwargs.items()},
                           "tokenizer": use_tokenizer}  # fmt: skip
    out["effective"] = vllm_effective_config(llm)

    def params(n: int) -> Any:
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                              detokenize=use_tokenizer)  # fmt: skip

    def run(prompts: list[list[int]], lens: list[int]) -> tuple[float, int]:
        reqs = [{"prompt_token_ids": p} for p in prompts]
        start = time.perf_counter()
        outs = llm.generate(reqs, [params(n) for n in lens], use_tqdm=False)
        seconds = time.perf_counter() - start
        return seconds, sum(len(o.outputs[0].token_ids) for o in outs)

    wu = warmup_workload()
    run(wu.prompts, wu.output_lens)

    def timed(prompt: list[int], n: int) -> float:
        return run([prompt], [n])[0]

    for section in job["sections"]:
        if section == "decode":
            out[section] = decode_rows(timed, job)
            continue
        wl = workload(section, job["smoke"])
        seconds, produced = run(wl.prompts, wl.output_lens)
        if produced != wl.num_output_tokens:
            raise RuntimeError(f"vLLM produced {produced} tokens, expected "
                               f"{wl.num_output_tokens}")  # fmt: skip
        out[section] = {"seconds": seconds, "output_tok_s": produced / seconds,
                        "output_tokens": produced, "input_tokens": wl.num_input_tokens,
                        "requests": len(wl.prompts)}  # fmt: skip
    try:  # stop the engine-core process; the parent also kills the whole process group
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:
        print(f"vLLM shutdown: {e!r}", file=sys.stderr)
    return out


def vllm_effective_config(llm: Any) -> dict[str, Any]:
    """What vLLM chose: scheduler limits, CUDA graph mode, compile mode, attention."""
    info: dict[str, Any] = {}
    try:
        cfg = llm.llm_engine.vllm_config
        sc = cfg.scheduler_config
        info["max_num_batched_tokens"] = sc.max_num_batched_tokens
        info["max_num_seqs"] = sc.max_num_seqs
        info["async_scheduling"] = getattr(sc, "async_scheduling", None)
        info["enable_chunked_prefill"] = getattr(sc, "enable_chunked_prefill", None)
        cc = cfg.compilation_config
        info["compilation_mode"] = str(getattr(cc, "mode", None))
        info["cudagraph_mode"] = str(getattr(cc, "cudagraph_mode", None))
        info["attention_backend"] = str(cfg.attention_config.backend)
        info["enforce_eager"] = cfg.model_config.enforce_eager
        info["use_v2_model_runner"] = cfg.use_v2_model_runner
        info["prefix_caching"] = cfg.cache_config.enable_prefix_caching
    except Exception as e:  # informational only
        info["error"] = repr(e)
    return info


# ---- serve section -----------------------------------------------------------------------
# Each engine's own OpenAI server, started as a process group of its own on a free port,
# driven by `strata bench serve` (a separate process) at each request rate, then stopped.


def serve_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Rates, requests and lengths of the serve section. Inputs as offline (100-1024:
    the prefill shape, which TTFT depends on); outputs 64-256, so a request lives 1-3 s at
    low load and a rate-limited run lasts about requests/rate seconds (8 req/s: ~35 s)
    instead of being dominated by 1024-token tails; TPOT still averages >= 63 gaps."""
    if args.smoke:
        return {"rates": ["4", "inf"], "requests": 8, "input_len": "10-60",
                "output_len": "5-20", "warmup_requests": 4,
                "client_processes": args.serve_client_processes}  # fmt: skip
    rates = [r.strip() for r in args.serve_rates.split(",") if r.strip()]
    return {"rates": rates, "requests": args.serve_requests, "input_len": "100-1024",
            "output_len": "64-256", "warmup_requests": 32,
            "client_processes": args.serve_client_processes}  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port (TIME_WAIT connections do not count)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def server_command(engine: str, job: dict[str, Any], port: int) -> list[str]:
    folder = job["folder"]
    if engine == "strata":
        cmd = [sys.executable, "-m", "strata.cli", "serve",
               "--model", f"random:{folder}/config.json", "--host", "127.0.0.1",
               "--port", str(port), "--max-model-len", str(job["max_model_len"]),
               "--seed", "0"]  # fmt: skip
        if not job["prefix_caching"]:
            cmd.append("--no-prefix-caching")
        if job["smoke"]:
            return [*cmd, "--device", "cpu", "--dtype", "float32", "--kv-cache-memory", "0.25",
                    "--max-num-batched-tokens", "512"]  # fmt: skip
        batched = str(job.get("strata_serve_batched_tokens") or 4096)
        cmd += ["--device", "cuda", "--dtype", "bfloat16", "--max-num-batched-tokens", batched,
                "--gpu-memory-utilization", str(job["gpu_memory_utilization"])]  # fmt: skip
        if job.get("strata_kv_gib"):
            cmd += ["--kv-cache-memory", str(job["strata_kv_gib"])]
        return [*cmd, "--overlap-scheduling", job.get("strata_overlap", "auto")]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
           "--load-format", "dummy", "--dtype", "bfloat16", "--seed", "0",
           "--gpu-memory-utilization", str(job["gpu_memory_utilization"]),
           "--max-model-len", str(job["max_model_len"]),
           "--enable-prefix-caching" if job["prefix_caching"] else "--no-enable-prefix-caching",
           "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"]  # fmt: skip
    if not vllm_uses_tokenizer(job):
        cmd.append("--skip-tokenizer-init")  # token-id prompts and token_ids in the chunks
    return cmd


def vllm_uses_tokenizer(job: dict[str, Any]) -> bool:
    """vLLM detokenizes only where Strata does, and only with the folder's tokenizer."""
    return bool(job.get("tokenizer")) and (Path(job["folder"]) / "tokenizer.json").is_file()


def run_serve(engine: str, job: dict[str, Any], plan: dict[str, Any],
              timeout: float) -> dict[str, Any]:  # fmt: skip
    """Start the engine's server, bench it at every rate of `plan`, stop it. Never raises:
    a failure is the result's "error", with the server log's tail printed."""
    from strata.bench.server_process import wait_healthy

    print(f"\n--- {engine}: serve ({len(plan['rates'])} rates x {plan['requests']} requests, "
          f"in {plan['input_len']}, out {plan['output_len']})", flush=True)  # fmt: skip
    start = time.perf_counter()
    deadline = start + timeout
    port = free_port()
    cmd = server_command(engine, job, port)
    out: dict[str, Any] = {"engine": engine, "port": port, "command": " ".join(cmd),
                           "plan": plan}  # fmt: skip
    if engine == "vllm":
        out["tokenizer"] = vllm_uses_tokenizer(job)
    fd, log_path = tempfile.mkstemp(prefix=f"sbs-serve-{engine}-", suffix=".log")
    out["log"] = log_path
    proc: subprocess.Popen[bytes] | None = None
    try:
        if engine == "vllm":
            missing = vllm_server_missing(job)
            if missing:
                raise RuntimeError(
                    f"vLLM's API server needs {', '.join(missing)}, not on its path: carry "
                    f"{EXTRA_WHEELS}/ with their wheels (benchmarks/vllm_bundle.sh --extras)"
                )
        stop_leftover_server()
        proc = subprocess.Popen(cmd, env=engine_env(engine, job), cwd=REPO, stdout=fd,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=die_with_parent())  # fmt: skip
        SERVER_PGID_FILE.write_text(f"{proc.pid}\n")
        try:
            wait_healthy(proc, port, timeout_s=max(1.0, deadline - time.perf_counter()))
        except (RuntimeError, TimeoutError) as e:
            why = str(e).replace("strata serve", "the server")
            raise RuntimeError(f"{engine} server did not start: {why}") from None
        out["startup_s"] = time.perf_counter() - start
        print(f"{engine} server healthy on port {port} after {out['startup_s']:.1f} s", flush=True)
        out.update(server_info(engine, port))
        url = f"http://127.0.0.1:{port}"
        t0 = time.perf_counter()
        warm = {"requests": plan["warmup_requests"], "input_len": plan["input_len"],
                "output_len": "8-8", "client_processes": 1}  # fmt: skip
        bench(url, warm, "inf", 1000, deadline, quiet=True)  # first compiles stay out
        out["warmup_s"] = time.perf_counter() - t0
        rows: list[dict[str, Any]] = []
        out["serve"] = rows  # the rates done so far survive a failure of a later one
        for index, rate in enumerate(plan["rates"]):  # seeds as one sweep would use them
            rows.append(bench(url, plan, rate, index, deadline))
        bad = [f"rate {r['rate']}: {r['failed']} failed, {r['lost']} lost" for r in rows
               if r["failed"] or r["lost"]]  # fmt: skip
        if bad:
            out["error"] = "; ".join(bad)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        print(f"--- {engine} serve FAILED: {out['error']}\nserver log tail ({log_path}):\n"
              + log_tail(log_path, 40), flush=True)  # fmt: skip
    finally:
        os.close(fd)
        if proc is not None:
            out["stop"] = stop_server(proc, port)
            if not out["stop"]["group_left"]:
                SERVER_PGID_FILE.unlink(missing_ok=True)
        out["subprocess_s"] = time.perf_counter() - start
    out["effective"] = log_config(log_path)
    for key, line in out["effective"].items():
        print(f"{engine} {key}: {line[:400]}")
    return out


def log_config(path: str) -> dict[str, str]:
    """vLLM's startup lines that name what it chose (non-default args, chunked-prefill
    budget, the engine config, the attention backend)."""
    keys = {"non_default_args": "non-default args:",
            "chunked_prefill": "Chunked prefill is enabled",
            "engine_config": "Initializing a V1 LLM engine",
            "attention": "attention backend"}  # fmt: skip
    found: dict[str, str] = {}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                for key, needle in keys.items():
                    if key not in found and needle in line:
                        found[key] = line.strip()
    except OSError:
        pass
    return found


def die_with_parent() -> Callable[[], None]:
    """What the server's child runs before exec: SIGTERM it when this script dies (a device
    call cut off at its limit), so that it does not hold the GPU for the next call. prctl
    is looked up here, in the parent: dlopen in a forked child of a threaded process can
    deadlock."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def child() -> None:
        prctl(pr_set_pdeathsig, sigterm)

    return child


def stop_leftover_server() -> None:
    """Kill the process group of a server that an earlier run of this script started and
    could not stop (it was killed first), if that group still runs a server."""
    try:
        pgid = int(SERVER_PGID_FILE.read_text())
    except (OSError, ValueError):
        return
    members = group_members(pgid)
    cmdlines = []
    for pid in members:
        with contextlib.suppress(OSError):
            cmdlines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" "))
    if any(b"strata.cli" in c or b"vllm" in c for c in cmdlines):
        print(f"killing the process group {pgid} of an earlier run's server: {members}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        for _ in range(20):
            if not group_members(pgid):
                break
            time.sleep(0.5)
    SERVER_PGID_FILE.unlink(missing_ok=True)


def server_info(engine: str, port: int) -> dict[str, Any]:
    """Whether the server takes text prompts (its tokenizer), and vLLM's version."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    info: dict[str, Any] = {}
    try:
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        info["model"] = model
        if engine == "strata":
            body = {"model": model, "prompt": "hello there", "max_tokens": 1}
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
            info["tokenizer"] = r.status_code == 200
        else:
            info["version"] = httpx.get(f"{base}/version", timeout=10).json().get("version")
    except Exception as e:  # informational only
        info["info_error"] = repr(e)
    return info


def bench(url: str, plan: dict[str, Any], rate: str, seed: int, deadline: float,
          quiet: bool = False) -> dict[str, Any]:  # fmt: skip
    """`strata bench serve` at one rate (processes of its own, so a hang is killed at
    `deadline`): its numbers, the CPU use of its main process, and its event loops' lag
    (a p99 past 10 ms means the load generator's delays are in the latencies)."""
    fd, path = tempfile.mkstemp(prefix="sbs-bench-", suffix=".json")
    os.close(fd)
    args = ["bench", "serve", "--url", url, "--num-requests", str(plan["requests"]),
            "--request-rate", rate, "--input-len", plan["input_len"],
            "--output-len", plan["output_len"], "--vocab-size", str(TOKENIZER_VOCAB),
            "--seed", str(seed), "--no-progress", "--request-timeout", "120",
            "--client-processes", str(plan["client_processes"]), "--json", path]  # fmt: skip
    try:
        left = max(1.0, deadline - time.perf_counter())
        proc = subprocess.run([sys.executable, "-c", BENCH_CHILD, path, *args],
                              env=engine_env("strata", {}), cwd=REPO, capture_output=True,
                              text=True, timeout=left)  # fmt: skip
        result, usage = read_json(path), read_json(path + ".cpu")
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"strata bench serve at rate {rate} passed --serve-timeout") from None
    finally:
        for name in (path, path + ".cpu"):
            with contextlib.suppress(OSError):
                os.unlink(name)
    if not result.get("runs"):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"strata bench serve exited with {proc.returncode}:\n{tail}")
    cpu, wall = usage.get("cpu_s", 0.0), usage.get("wall_s", 0.0)
    run = result["runs"][0]
    sm = run["summary"]
    row = {"rate": rate, "output_tok_s": sm["output_throughput"],
           "request_s": sm["request_throughput"], "duration_s": sm["duration_s"],
           "ttft_p50_ms": sm["ttft_ms"]["p50"], "ttft_p99_ms": sm["ttft_ms"]["p99"],
           "tpot_p50_ms": sm["tpot_ms"]["p50"], "tpot_p99_ms": sm["tpot_ms"]["p99"],
           "completed": sm["completed"], "failed": sm["failed"], "lost": sm["lost"],
           "output_tokens": sm["output_tokens"], "input_tokens": sm["input_tokens"],
           "output_len_mismatches": run["output_len_mismatches"], "failures": run["failures"],
           "client_wall_s": wall, "client_cpu_s": cpu,
           "client": run.get("client", {})}  # fmt: skip
    if not quiet:
        print(f"  rate {rate:>4}: {row['output_tok_s']:8.0f} out tok/s  "
              f"TTFT p50/p99 {fmt_ms(row['ttft_p50_ms'])}/{fmt_ms(row['ttft_p99_ms'])} ms  "
              f"TPOT p50/p99 {fmt_ms(row['tpot_p50_ms'])}/{fmt_ms(row['tpot_p99_ms'])} ms  "
              f"{row['completed']}/{sm['num_requests']} ok in {row['duration_s']:.1f} s  "
              f"(client {cpu:.1f} CPU-s in {wall:.1f} s, loop lag p99 "
              f"{row['client'].get('lag_p99_ms', float('nan')):.1f} ms)", flush=True)  # fmt: skip
    return row


# `strata bench serve` with its CPU time and wall time measured around the run alone
# (imports first), written to JSON_PATH.cpu; argv: JSON_PATH then the command's arguments.
BENCH_CHILD = """
import json, resource, sys, time
import strata.bench.serve, strata.bench.serve_cli
from strata.cli import main
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
rc = main(sys.argv[2:])
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
with open(sys.argv[1] + ".cpu", "w") as f:
    json.dump({"rc": rc, "cpu_s": cpu, "wall_s": t1 - t0}, f)
sys.exit(rc)
"""


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def log_tail(path: str, lines: int) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return repr(e)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            pids.append(int(stat.parent.name))
    return pids


def stop_server(proc: subprocess.Popen[bytes], port: int) -> dict[str, Any]:
    """SIGTERM to the server's process group, SIGKILL after 20 s; then check that no
    process of the group is left and that nothing listens on the port any more."""
    t0 = time.perf_counter()
    pgid = proc.pid  # start_new_session: the server leads its own group
    signals = [signal.SIGTERM]
    try:
        os.killpg(pgid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
        for _ in range(20):  # the engine's children exit after the leader
            if not group_members(pgid):
                break
            time.sleep(0.5)
        if group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)
            signals.append(signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for _ in range(20):
        left, free = group_members(pgid), port_free(port)
        if not left and free:
            break
        time.sleep(0.5)
    names = [s.name for s in signals]
    out: dict[str, Any] = {"stop_s": time.perf_counter() - t0, "signals": names,
                           "group_left": left, "port_free": free,
                           "returncode": proc.returncode}  # fmt: skip
    state = "stopped" if not left and free else "NOT CLEANLY STOPPED"
    print(
        f"server {state} in {out['stop_s']:.1f} s ({'+'.join(names)}, "
        f"rc {proc.returncode}, group left {left}, port {port} free: {free})",
        flush=True,
    )
    return out


# ---- orchestration -----------------------------------------------------------------------


def engine_env(engine: str, job: dict[str, Any]) -> dict[str, str]:
    """The environment of an engine's process: the repository (and for vLLM the unpacked
    site) first on PYTHONPATH, vLLM kept offline and off FlashInfer."""
    env = dict(os.environ)
    paths = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if engine == "vllm":
        if os.path.isdir(job["vllm_site"]):
            paths.insert(1, job["vllm_site"])
        env.update(VLLM_USE_FLASHINFER_SAMPLER="0", VLLM_NO_USAGE_STATS="1",
                   DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   VLLM_CACHE_ROOT=env.get("VLLM_CACHE_ROOT", "/tmp/vllm-cache"),
                   TOKENIZERS_PARALLELISM="false")  # fmt: skip
        extra = vllm_extra_site()
        if extra:
            paths.insert(2, extra)
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def vllm_extra_site() -> str | None:
    """Pure-Python wheels carried in .vllm-parts-extra/ (packages that vLLM's API server
    needs and the bundle lacks: prometheus-fastapi-instrumentator), unzipped once into
    a folder that joins vLLM's path; None when none are carried."""
    import zipfile

    wheels = sorted((REPO / EXTRA_WHEELS).glob("*.whl"))
    if not wheels:
        return None
    target = Path(tempfile.gettempdir()) / "vllm-extra-site"
    for wheel in wheels:
        done = target / f".{wheel.name}.unpacked"
        if not done.exists():
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(target)
            done.touch()
    return str(target)


def vllm_server_missing(job: dict[str, Any]) -> list[str]:
    """Modules that vLLM's API server imports only while it builds its app (after the
    engine started) and that vLLM's path lacks."""
    code = (
        "import importlib.util as u, sys\nprint(*(m for m in sys.argv[1:] if not u.find_spec(m)))"
    )
    proc = subprocess.run([sys.executable, "-c", code, *VLLM_SERVER_MODULES],
                          env=engine_env("vllm", job), capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    return proc.stdout.split()


def run_subprocess(engine: str, job: dict[str, Any], timeout: float) -> dict[str, Any]:
    fd, path = tempfile.mkstemp(prefix=f"sbs-{engine}-", suffix=".json")
    os.close(fd)
    env = engine_env(engine, job)
    cmd = [sys.executable, __file__, "--worker", engine, "--job", json.dumps(job),
           "--result", path]  # fmt: skip
    print(f"\n--- {engine}: {job['group']} ({', '.join(job['sections'])})", flush=True)
    start = time.perf_counter()
    # Its own session, so that the engine's child processes (vLLM's engine core) can be
    # killed with it and leave the GPU free for the next engine.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        rc: int | str = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = time.perf_counter() - start
    kill_group(proc)
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError):
        result = {}
    finally:
        os.unlink(path)
    if not result:
        result = {"engine": engine, "error": f"worker exited with {rc}, no result"}
    result["subprocess_s"] = wall
    if result.get("error"):
        print(f"--- {engine} FAILED: {result['error']}", flush=True)
    return result


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """End whatever is left of the worker's process group (all of it on a timeout)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(3)
    proc.wait()


def worker_main(engine: str, job: dict[str, Any], result_path: str) -> int:
    try:
        out = strata_worker(job) if engine == "strata" else vllm_worker(job)
    except BaseException:
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        out = {"engine": engine, "error": tb.strip().splitlines()[-1], "traceback": tb}
    with open(result_path, "w") as f:
        json.dump(out, f, indent=1)
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: engine threads and child processes


def vllm_importable(site: str) -> str | None:
    """None when `from vllm import LLM` works in a fresh interpreter with `site` on the
    path, else the error."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", "from vllm import LLM, SamplingParams"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    if proc.returncode == 0:
        return None
    return (proc.stderr.strip().splitlines() or ["import vllm failed"])[-1]


def print_table(results: dict[str, Any]) -> None:
    print("\n== Strata vs vLLM (same GPU, same requests) ==")
    print(f"{'section':<12} {'metric':<22} {'Strata':>10} {'vLLM':>10} {'Strata/vLLM':>12}")
    for pair in results["groups"].values():
        s, v = pair.get("strata", {}), pair.get("vllm", {})
        for section in pair["sections"]:
            if section == "decode":
                vrows = {r["context"]: r for r in v.get("decode", [])}
                for row in s.get("decode", []):
                    vr = vrows.get(row["context"])
                    vms = vr["step_ms"] if vr else None
                    # for a time, Strata/vLLM below 1 means Strata is faster
                    print_row("decode", f"ms/step ctx {row['context']}", row["step_ms"], vms,
                              ".3f")  # fmt: skip
                if not s.get("decode"):
                    for ctx, vr in vrows.items():
                        print_row("decode", f"ms/step ctx {ctx}", None, vr["step_ms"], ".3f")
                continue
            if section == "serve":
                print_serve_rows(s.get("serve") or [], v.get("serve") or [])
                continue
            sr, vr = s.get(section), v.get(section)
            print_row(section, "output tok/s", sr and sr["output_tok_s"],
                      vr and vr["output_tok_s"], ".0f")  # fmt: skip
            print_row(section, "wall s", sr and sr["seconds"], vr and vr["seconds"], ".2f")
        for eng, r in (("Strata", s), ("vLLM", v)):
            if r.get("error"):
                print(f"{'':<12} {eng} error: {r['error']}")
    print(
        "(ratios of tok/s above 1 and of times below 1 favour Strata; serve: TTFT and TPOT "
        "ratios are Strata ms / vLLM ms, so below 1 = Strata answers sooner)"
    )
    print("features: " + "; ".join(results["features"]))


def print_serve_rows(srows: list[dict[str, Any]], vrows: list[dict[str, Any]]) -> None:
    """Per request rate: output tok/s, then TTFT and TPOT p50/p99 in ms."""
    by_rate: dict[str, dict[str, dict[str, Any]]] = {}
    for eng, rows in (("s", srows), ("v", vrows)):
        for row in rows:
            by_rate.setdefault(row["rate"], {})[eng] = row
    metrics = (("output_tok_s", "output tok/s", ".0f"), ("ttft_p50_ms", "TTFT p50 ms", ".1f"),
               ("ttft_p99_ms", "TTFT p99 ms", ".1f"), ("tpot_p50_ms", "TPOT p50 ms", ".2f"),
               ("tpot_p99_ms", "TPOT p99 ms", ".2f"))  # fmt: skip
    for rate, pair in by_rate.items():
        for key, name, fmt in metrics:
            a, b = (pair[e].get(key) if e in pair else None for e in ("s", "v"))
            print_row("serve", f"r={rate} {name}", a, b, fmt)


def print_row(section: str, metric: str, a: float | None, b: float | None, fmt: str) -> None:
    fa = format(a, fmt) if a is not None else "-"
    fb = format(b, fmt) if b is not None else "-"
    ratio = f"{a / b:.2f}" if a is not None and b else "-"
    print(f"{section:<12} {metric:<22} {fa:>10} {fb:>10} {ratio:>12}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        default=",".join(DEFAULT_SECTIONS),
        help=f"comma-separated sections of {','.join(SECTIONS)} (default: all but serve)",
    )
    parser.add_argument("--json", default=None, help="write all numbers here")
    parser.add_argument("--engines", default="strata,vllm")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run of the logic")
    parser.add_argument("--vllm-site", default="/tmp/vllm-site")
    parser.add_argument("--tokenizer-dir", default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--strata-kv-gib", type=float, default=None,
                        help="Strata's KV pool in GiB (default: 0.9 of memory)")  # fmt: skip
    parser.add_argument("--strata-overlap", choices=("auto", "on", "off"), default="auto",
                        help="Strata's overlap_scheduling (default auto: on on CUDA)")  # fmt: skip
    parser.add_argument("--strata-serve-batched-tokens", type=int, default=4096,
                        help="serve: Strata's --max-num-batched-tokens (default 4096)")  # fmt: skip
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=540, help="seconds per subprocess")
    parser.add_argument(
        "--serve-rates",
        default="8,32,64,inf",
        help="serve: comma-separated request rates (req/s, or inf)",
    )
    parser.add_argument("--serve-requests", type=int, default=256, help="serve: requests per rate")
    parser.add_argument("--serve-client-processes", type=int, default=4,
                        help="serve: processes of the load generator (strata bench serve "
                        "--client-processes; default 4, so its own event loop's delays stay "
                        "out of the latencies)")  # fmt: skip
    parser.add_argument("--serve-tokenizer", action="store_true",
                        help="serve: put the SmolLM2 tokenizer beside the model, so that both "
                        "servers detokenize (default: token ids in and out)")  # fmt: skip
    parser.add_argument("--serve-timeout", type=float, default=420,
                        help="serve: seconds per engine for server start, warm-up and all "
                        "rates (the server is stopped when it runs out)")  # fmt: skip
    parser.add_argument("--reuse", default=None,
                        help="a --json of an earlier run on the same machine: take its results "
                        "without errors instead of running those engines again")  # fmt: skip
    parser.add_argument("--worker", choices=("strata", "vllm"), help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
    if args.worker:
        return worker_main(args.worker, json.loads(args.job), args.result)

    only = [s for s in args.only.split(",") if s]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    engines = [e for e in args.engines.split(",") if e]
    tok_dir = find_tokenizer_dir(args.tokenizer_dir)
    results: dict[str, Any] = {"smoke": args.smoke, "tokenizer_dir": tok_dir, "groups": {},
                               "argv": sys.argv[1:]}  # fmt: skip
    if "vllm" in engines:
        err = vllm_importable(args.vllm_site)
        if err is not None:
            print(f"vLLM cannot be imported, skipped: {err}")
            results["vllm_import_error"] = err
            engines.remove("vllm")
    groups = SMOKE_GROUPS if args.smoke else GROUPS
    earlier: dict[str, Any] = {}
    if args.reuse and os.path.isfile(args.reuse):
        with open(args.reuse) as f:
            earlier = json.load(f).get("groups", {})
        results["groups"].update(earlier)  # kept as they were unless run (or reused) below
    try:
        for group, spec in groups.items():
            sections = [s for s in spec["sections"] if s in only]
            if not sections:
                continue
            # serve: token ids in and out unless asked (vLLM's detokenizer on the ids past
            # the SmolLM2 vocabulary that a random 1B model emits is untested on the GPU)
            serve_tok = tok_dir if args.serve_tokenizer else None
            folder = model_folder(group, spec, serve_tok if group == "serve" else tok_dir)
            job = {"group": group, "sections": sections, "folder": str(folder),
                   "max_model_len": spec["max_model_len"],
                   "prefix_caching": spec["prefix_caching"], "smoke": args.smoke,
                   "decode_steps": 4 if args.smoke else args.decode_steps,
                   "gpu_memory_utilization": args.gpu_memory_utilization,
                   "strata_kv_gib": args.strata_kv_gib, "vllm_site": args.vllm_site,
                   "strata_overlap": args.strata_overlap,
                   "strata_serve_batched_tokens": args.strata_serve_batched_tokens,
                   "tokenizer": False}  # fmt: skip
            pair: dict[str, Any] = {"sections": sections, "preset": spec["preset"],
                                    "max_model_len": spec["max_model_len"],
                                    "prefix_caching": spec["prefix_caching"]}  # fmt: skip
            results["groups"][group] = pair
            for engine in ("strata", "vllm"):
                old = earlier.get(group, {}).get(engine, {})
                if not old.get("error") and all(x in old for x in sections):
                    pair[engine] = dict(old, reused=args.reuse)
                    print(f"--- {engine}: {group} taken from {args.reuse}")
                elif engine in engines:
                    if group == "serve":
                        pair[engine] = run_serve(engine, job, serve_plan(args),
                                                 args.serve_timeout)  # fmt: skip
                    else:
                        pair[engine] = run_subprocess(engine, job, args.timeout)
                    save(results, args.json)  # what is done survives a kill of this call
                if engine == "strata":  # vLLM detokenizes only where Strata does
                    strata = pair.get("strata")
                    job["tokenizer"] = strata.get("tokenizer") if strata else tok_dir is not None
    finally:
        save(results, args.json)
    print_table(results)
    return 0


def save(results: dict[str, Any], path: str | None) -> None:
    results["features"] = features(results)
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


def features(results: dict[str, Any]) -> list[str]:
    notes = []
    for group, pair in results["groups"].items():
        v = pair.get("vllm", {}).get("effective", {})
        s = pair.get("strata", {})
        notes.append(
            f"{group}: prefix caching {'on' if pair['prefix_caching'] else 'off'} (both), "
            f"max_model_len {pair['max_model_len']}, "
            f"tokenizer strata={s.get('tokenizer')} vllm={pair.get('vllm', {}).get('tokenizer')}"
            + (f", vLLM mbt={v.get('max_num_batched_tokens')} seqs={v.get('max_num_seqs')} "
               f"cudagraph={v.get('cudagraph_mode')} compile={v.get('compilation_mode')} "
               f"v2_runner={v.get('use_v2_model_runner')}" if v else "")
        )  # fmt: skip
        if "serve" in pair["sections"]:
            notes.append(serve_note(pair))
    return notes


def serve_note(pair: dict[str, Any]) -> str:
    """The serve plan and, per engine, how long the server took to start and stop, and
    the load generator's CPU use."""
    plan = next((pair[e]["plan"] for e in ("strata", "vllm") if "plan" in pair.get(e, {})), None)
    parts = []
    if plan:
        parts.append(f"rates {','.join(plan['rates'])} req/s (Poisson), {plan['requests']} "
                     f"requests each, in {plan['input_len']}, out {plan['output_len']}, "
                     "token-id prompts, streamed")  # fmt: skip
    for eng in ("strata", "vllm"):
        r = pair.get(eng, {})
        if not r:
            continue
        words = [f"startup {r['startup_s']:.0f} s"] if "startup_s" in r else ["no start"]
        rows = r.get("serve") or []
        if rows:  # the load generator's event-loop lag, at the most lagged rate
            lags = [row["client"]["lag_p99_ms"] for row in rows if row.get("client")]
            if lags:
                words.append(f"client loop lag p99 up to {max(lags):.1f} ms "
                             f"({rows[0]['client']['processes']} processes)")  # fmt: skip
        stop = r.get("stop")
        if stop:
            clean = stop.get("port_free") and not stop.get("group_left")
            words.append("stopped cleanly" if clean else "NOT stopped cleanly")
        parts.append(f"{eng} " + ", ".join(words))
    return "serve: " + "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())

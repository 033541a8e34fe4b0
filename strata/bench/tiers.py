"""`strata bench tiers`: the KV tiers' effect on time to first token, shaped like
LMCache's long-document QA and multi-round chat benchmarks.

Long-document QA (strata.bench.tiers_qa) reports TTFT per context length with the
document recomputed, in the GPU pool, or loaded from the cpu, disk or remote tier, and
the fetch bandwidth against pinned host-to-device bandwidth measured in the same run.
Multi-round chat (strata.bench.tiers_chat) runs many growing conversations through a GPU
pool too small for them all, with tiers off, with a cpu tier, and with session pins.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from strata.bench.tiers_chat import ChatResult, count_mismatches, run_chat
from strata.bench.tiers_fit import Fitted, fit_model
from strata.bench.tiers_measure import device_name, pinned_h2d_bytes_per_s
from strata.bench.tiers_qa import DocQA, QAResult
from strata.bench.tiers_report import fetch_rows, format_chat, format_qa, plot
from strata.bench.tiers_workloads import ChatWorkload, chat_workload, documents
from strata.engine.build import resolve_device, resolve_dtype
from strata.engine.llm import LLM
from strata.models.embedded import embedded_model_path
from strata.models.loader import gguf_to_folder
from strata.models.presets import random_config_dict

logger = logging.getLogger("strata.bench.tiers")

GIB = 1 << 30


def model_config_dict(spec: str | None) -> dict[str, Any]:
    """The transformers config of a model spec, without loading weights."""
    if spec is not None and spec.startswith("random:"):
        return random_config_dict(spec[len("random:") :])
    if spec is None:
        folder = gguf_to_folder(embedded_model_path())
    else:
        path = Path(spec).expanduser()
        folder = gguf_to_folder(path) if path.suffix == ".gguf" else path
    return json.loads((folder / "config.json").read_text())


def kv_bytes_per_token(config: dict[str, Any], dtype: torch.dtype) -> int:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    element = dtype.itemsize
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * element


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        device = resolve_device(args.device)
        self.config = model_config_dict(args.model)
        self.dtype = resolve_dtype(args.dtype, device)
        self.bytes_per_token = kv_bytes_per_token(self.config, self.dtype)
        self.vocab = int(self.config["vocab_size"])
        self.cuda = device.type == "cuda"

    def engine_kwargs(self, max_model_len: int, num_seqs: int) -> dict[str, Any]:
        a = self.args
        return {
            "model": a.model,
            "device": a.device,
            "dtype": a.dtype,
            "block_size": a.block_size,
            "max_num_batched_tokens": a.max_num_batched_tokens,
            "max_num_seqs": num_seqs,
            "max_model_len": max_model_len,
            "seed": a.seed,
            "attention_backend": a.attention_backend,
            "enforce_eager": a.enforce_eager,
            "kv_disk_size": a.kv_disk_size,
            "kv_remote_timeout_s": a.kv_remote_timeout_s,
            "kv_tier_io_threads": a.kv_tier_io_threads,
            "kv_disk_direct_io": a.kv_disk_direct_io,
        }

    def free_memory(self) -> None:
        """Release the engine built before (its weights and pool) before building the next."""
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    # ---- long-document QA ---------------------------------------------------------------

    def run_qa(self, disk_dir: str | None) -> QAResult:
        a = self.args
        docs = documents(
            a.lengths, a.docs_per_length, a.questions, a.suffix_len, self.vocab, a.seed
        )
        longest = max(a.lengths) + a.suffix_len + a.max_tokens
        kw = self.engine_kwargs(longest, 2)
        if a.kv_cache_memory is not None:
            kw["kv_cache_memory"] = a.kv_cache_memory
        else:
            kw["num_kv_blocks"] = 2 * _blocks(longest, a.block_size) + 16
        cpu_gib = a.kv_cpu_memory or 3 * longest * self.bytes_per_token / GIB
        logger.info("QA: %d documents, cpu tier %.2f GiB", len(docs), cpu_gib)

        def make_llm(**tiers: Any) -> LLM:
            self.free_memory()
            return LLM(**kw, kv_cpu_memory=cpu_gib, kv_tier_codec=a.kv_tier_codec, **tiers)

        return DocQA(make_llm, docs, a.max_tokens, disk_dir, a.kv_remote).run()

    # ---- multi-round chat ---------------------------------------------------------------

    def chat_workload(self) -> ChatWorkload:
        a = self.args
        return chat_workload(
            a.chat_users,
            a.chat_turns,
            a.chat_first_len,
            a.chat_message_len,
            a.chat_answer_len,
            self.vocab,
            a.seed + 1,
        )

    def run_chat(self, workload: ChatWorkload) -> list[ChatResult]:
        a = self.args
        ctx_blocks = _blocks(workload.max_context(), a.block_size)
        all_blocks = workload.num_users * ctx_blocks
        pool = max(
            a.chat_concurrency * (ctx_blocks + 1), math.ceil(a.chat_gpu_fraction * all_blocks)
        )
        cpu_gib = a.kv_cpu_memory or 1.25 * all_blocks * a.block_size * self.bytes_per_token / GIB
        logger.info(
            "chat: GPU pool %d blocks for %d blocks of conversations; cpu tier %.2f GiB",
            pool,
            all_blocks,
            cpu_gib,
        )
        kw = self.engine_kwargs(workload.max_context(), a.chat_concurrency)
        results = []
        for mode in a.chat_modes:
            tiers = {} if mode == "tiers-off" else {
                "kv_cpu_memory": cpu_gib, "kv_tier_codec": a.kv_tier_codec,
            }  # fmt: skip
            self.free_memory()
            llm = LLM(**kw, num_kv_blocks=pool, **tiers)
            try:
                warm = [1 + i % (self.vocab - 1) for i in range(3 * a.block_size)]
                llm.generate(warm, _greedy(4))
                results.append(run_chat(llm, workload, mode, a.chat_concurrency, a.session_ttl))
                llm.check_integrity()
            finally:
                llm.close()
            logger.info("chat %s: %.2f s", mode, results[-1].total_s)
        return results


def _greedy(n: int) -> Any:
    from strata.engine.sampling_params import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def header(bench: Bench, model: str | None, args: argparse.Namespace, device: str) -> str:
    c = bench.config
    shape = (
        f"{c['num_hidden_layers']} layers, {c.get('num_key_value_heads')} KV heads, hidden "
        f"{c['hidden_size']}, {bench.bytes_per_token / 1024:g} KiB KV/token"
    )
    return (
        f"model {model or 'embedded'} ({shape}, {str(bench.dtype).removeprefix('torch.')}) "
        f"on {device}; block {args.block_size}, {args.max_num_batched_tokens} tokens/step; "
        f"{time.strftime('%Y-%m-%d')}"
    )


def fit_to_context(args: argparse.Namespace) -> Fitted:
    """Raise a random model's position table to the longest workload, or cut the QA
    lengths to the model's context (tiers_fit.py); updates `args`."""
    config = model_config_dict(args.model)
    extra = args.suffix_len + args.max_tokens
    needed = 0 if args.skip_qa else max(args.lengths) + extra
    if not args.skip_chat:
        workload = chat_workload(args.chat_users, args.chat_turns, args.chat_first_len,
                                 args.chat_message_len, args.chat_answer_len, 2, 0)  # fmt: skip
        needed = max(needed, workload.max_context())
    fitted = fit_model(args.model, config, tuple(args.lengths), extra, needed)
    args.model, args.lengths = fitted.model, list(fitted.lengths)
    return fitted


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Entry point of `strata bench tiers`: prints the tables, writes JSON and PNG."""
    shown_model = args.model
    fitted = fit_to_context(args)
    for note in fitted.notes:
        print(f"note: {note}")
    try:
        return _run(args, shown_model, list(fitted.notes))
    finally:
        if fitted.temp_dir is not None:
            shutil.rmtree(fitted.temp_dir, ignore_errors=True)


def _run(args: argparse.Namespace, shown_model: str | None, fit_notes: list[str]) -> dict[str, Any]:
    bench = Bench(args)
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items() if k != "func"}}
    report["fit_notes"] = fit_notes
    pinned = pinned_h2d_bytes_per_s(resolve_device(args.device)) if bench.cuda else None
    report["pinned_h2d_gbps"] = pinned and pinned / 1e9
    device = device_name(resolve_device(args.device))
    title = header(bench, shown_model, args, device)
    print(title)
    qa: QAResult | None = None
    if not args.skip_qa:
        temp = None if args.kv_disk_dir or args.no_disk else tempfile.mkdtemp(prefix="strata-bt-")
        try:
            qa = bench.run_qa(args.kv_disk_dir or temp)
        finally:
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
        fetch = fetch_rows(qa.measures, bench.bytes_per_token, pinned)
        print(format_qa(qa.measures, fetch, pinned))
        for note in qa.notes:
            print(f"note: {note}")
        report["qa"] = {
            "measures": [m.row() for m in qa.measures],
            "fetch": fetch,
            "engine_stats": qa.engine_stats,
            "notes": qa.notes,
        }
    chats: list[ChatResult] = []
    if not args.skip_chat:
        workload = bench.chat_workload()
        chats = bench.run_chat(workload)
        ref = next((r for r in chats if r.mode == "tiers-off"), None)
        mismatches = {r.mode: count_mismatches(r, ref) for r in chats if ref and r is not ref}
        print()
        print(format_chat(chats, mismatches))
        report["chat"] = {
            "results": [r.row() for r in chats],
            "mismatches": mismatches,
            "max_context": workload.max_context(),
        }
    report["header"] = title
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2, default=str))
    if args.plot and qa is not None:
        plot(qa.measures, chats, args.plot, title)
    return report

"""kvpress side by side with Strata on the same RULER samples, model and budgets.

NVIDIA kvpress 0.5.5 pins transformers<5.3, so its part runs in its own virtual
environment and never imports Strata; the samples travel as token ids, so both systems
see exactly the same prompts. Three steps:

  # 1. (Strata's environment) samples as token ids, split for the two protocols
  python benchmarks/kvpress_ruler.py dump --model DIR --length 4096 --samples 10 --out s4k.jsonl
  # 2. (kvpress's environment) every press x budget x protocol on those samples
  /work/kvpress-venv/bin/python benchmarks/kvpress_ruler.py run --model DIR \
      --samples-file s4k.jsonl --budget 0.125 --out kvpress_4k.json
  # 3. (Strata's environment) score kvpress's answers as Strata's are scored (one JSON
  #    per run, like `strata eval ruler`), and print both side by side
  python benchmarks/kvpress_ruler.py score --samples-file s4k.jsonl \
      --predictions kvpress_4k.json --strata-dir results/ --out results/

Protocols, as kvpress runs them with its pipeline's own prefill-then-answer code:
  query-agnostic  the press compresses the context; the question and the chat template's
                  tail are then fed uncompressed (kvpress's default pipeline)
  query-aware     the press compresses context + question; only the template's tail (the
                  assistant header and answer prefix) is fed after
KV memory: `final` is the DynamicCache's bytes after the answer; `peak` adds the one
uncompressed layer a press holds while it compresses during prefill (kvpress compresses
each layer right after that layer's forward).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

# kv_policy name -> kvpress press class (the methods both have)
PRESSES = {
    "streaming": "StreamingLLMPress",
    "snapkv": "SnapKVPress",
    "h2o": "ObservedAttentionPress",
    "pyramidkv": "PyramidKVPress",
    "tova": "TOVAPress",
    "expected_attention": "ExpectedAttentionPress",
    "kvzip": "KVzipPress",
    "chunkkv": "ChunkKVPress",  # around SnapKVPress, chunks of CHUNK tokens (as Strata's)
}
CHUNK = 16  # strata.kv.policies.chunkkv.ChunkKVPolicy.CHUNK
PROTOCOLS = ("query-aware", "query-agnostic")
MIB = 1 << 20


# ---- 1. dump (Strata's environment) ------------------------------------------------------


def cmd_dump(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from transformers import AutoTokenizer

    from strata.eval.prompt import prompt_ids
    from strata.eval.tasks import generate_samples, parse_tasks

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    with open(args.out, "w", encoding="utf-8") as f:
        for task in parse_tasks(args.tasks):
            for s in generate_samples(tokenizer, task, args.length, args.samples, args.seed):
                ids = prompt_ids(tokenizer, s)
                record = {**asdict(s), "length": args.length, "context_ids": ids.context,
                          "question_ids": ids.question, "suffix_ids": ids.suffix}  # fmt: skip
                f.write(json.dumps(record) + "\n")


# ---- 2. run (kvpress's environment: no Strata imports) -----------------------------------


def _cache_bytes(cache: Any) -> int:
    return sum(
        layer.keys.numel() * layer.keys.element_size()
        + layer.values.numel() * layer.values.element_size()
        for layer in cache.layers
    )


def _press(policy: str, budget: float) -> Any:
    import kvpress

    if policy == "chunkkv":
        return kvpress.ChunkKVPress(kvpress.SnapKVPress(compression_ratio=1.0 - budget), CHUNK)
    return getattr(kvpress, PRESSES[policy])(compression_ratio=1.0 - budget)


def _answer_one(pipe: Any, record: dict, press: Any, protocol: str) -> dict:
    """kvpress's pipeline steps on our token ids: compress the prefill, then answer."""
    import torch
    from transformers import DynamicCache

    device = pipe.model.device
    ctx, q, tail = record["context_ids"], record["question_ids"], record["suffix_ids"]
    first, rest = (ctx, q + tail) if protocol == "query-agnostic" else (ctx + q, tail)
    cache = DynamicCache()
    start = time.perf_counter()
    with torch.inference_mode():
        context_ids = torch.tensor([first], device=device)
        if press is not None:
            with press(pipe.model):
                pipe.model.model(input_ids=context_ids, past_key_values=cache)
        else:
            pipe.model.model(input_ids=context_ids, past_key_values=cache)
        compressed = _cache_bytes(cache)
        answer = pipe.generate_answer(
            question_ids=torch.tensor([rest], device=device), cache=cache,
            context_length=len(first), max_new_tokens=record["max_new_tokens"],
        )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    final = _cache_bytes(cache)
    peak = final
    if press is not None:  # its hook holds one layer uncompressed while compressing it
        keys = cache.layers[0].keys  # [batch, kv_heads, tokens, head_dim]
        full_layer = 2 * keys.shape[1] * keys.shape[3] * keys.element_size() * len(first)
        peak = max(final, compressed - compressed // len(cache.layers) + full_layer)
    return {"task": record["task"], "index": record["index"], "prediction": answer,
            "wall_s": wall, "final_kv_bytes": final, "peak_kv_bytes": peak}  # fmt: skip


def _read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def cmd_run(args: argparse.Namespace) -> None:
    import importlib.metadata

    import torch
    import transformers
    from kvpress.pipeline import KVPressTextGenerationPipeline
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    records = _read_jsonl(args.samples_file)
    if args.max_new_tokens is not None:  # a quick check; real runs keep each task's budget
        records = [{**r, "max_new_tokens": args.max_new_tokens} for r in records]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pipes = {}
    for attn in ("sdpa", "eager"):  # ObservedAttention needs eager, KVzip refuses it
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=dtype, attn_implementation=attn
        )
        pipes[attn] = KVPressTextGenerationPipeline(
            model=model.to(device).eval(), tokenizer=tokenizer, device=device
        )
    policies = [p for p in args.policy.split(",") if p]
    budgets = [float(b) for b in args.budget.split(",")]
    protocols = PROTOCOLS if args.protocol == "both" else (args.protocol,)
    runs: list[tuple[str, float, str]] = [("full", 1.0, "query-aware")]
    runs += [(p, b, proto) for p in policies for b in budgets if b < 1 for proto in protocols]
    if args.no_full:
        runs = runs[1:]
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "dtype": str(dtype), "transformers": transformers.__version__,
            "kvpress": importlib.metadata.version("kvpress")}  # fmt: skip
    results: list[dict] = []
    for policy, budget, protocol in runs:
        pipe = pipes["eager" if policy == "h2o" else "sdpa"]
        start = time.perf_counter()
        try:
            answers = [
                _answer_one(pipe, r, None if policy == "full" else _press(policy, budget), protocol)
                for r in records
            ]
        except Exception as exc:  # a press that fails on this model is reported, not fatal
            error = f"{type(exc).__name__}: {exc}"
            results.append({"policy": policy, "budget": budget, "protocol": protocol,
                            "error": error})  # fmt: skip
            print(f"kvpress {policy:>18} b={budget:<6g} {protocol:<14} FAILED {error}", flush=True)
            continue
        wall = time.perf_counter() - start
        results.append({"policy": policy, "budget": budget, "protocol": protocol,
                        "wall_s": wall, "answers": answers})  # fmt: skip
        print(f"kvpress {policy:>18} b={budget:<6g} {protocol:<14} {wall:7.1f} s", flush=True)
        # written after every run: a run cut short by a time limit keeps what it finished
        Path(args.out).write_text(json.dumps({"meta": meta, "runs": results}))
    Path(args.out).write_text(json.dumps({"meta": meta, "runs": results}))


# ---- 3. score (Strata's environment) -----------------------------------------------------


def cmd_score(args: argparse.Namespace) -> None:
    from collections import defaultdict

    from strata.eval.report import plot_sweep, table
    from strata.eval.sample import Sample
    from strata.eval.scoring import score

    records = _read_jsonl(args.samples_file)
    samples = {(r["task"], r["index"]): Sample(**{k: r[k] for k in Sample.__dataclass_fields__})
               for r in records}  # fmt: skip
    length = records[0]["length"]
    runs, meta = [], {}
    for path in args.predictions:
        data = json.loads(Path(path).read_text())
        runs += data["runs"]
        meta = data["meta"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for run in runs:
        if "error" in run:
            print(f"kvpress {run['policy']} b={run['budget']:g} {run['protocol']}: {run['error']}")
            continue
        by_task: dict[str, list[float]] = defaultdict(list)
        scored = []
        for a in run["answers"]:
            s = score(samples[(a["task"], a["index"])], a["prediction"])
            by_task[a["task"]].append(s)
            scored.append({**a, "score": s})
        tasks = {t: 100.0 * sum(v) / len(v) for t, v in by_task.items()}
        n = len(scored)
        summary = {
            "system": "kvpress", "length": length, "policy": run["policy"],
            "budget": run["budget"], "protocol": run["protocol"], "num_samples": n,
            "tasks": tasks, "average": sum(tasks.values()) / len(tasks), "wall_s": run["wall_s"],
            "peak_kv_mib": sum(a["peak_kv_bytes"] for a in scored) / n / MIB,
            "final_kv_mib": sum(a["final_kv_bytes"] for a in scored) / n / MIB,
            **meta, "samples": scored,
        }  # fmt: skip
        name = (f"kvpress_ruler_L{length}_{run['policy']}_b{run['budget']:g}_"
                f"{run['protocol']}.json")  # fmt: skip
        (out / name).write_text(json.dumps(summary, indent=1))
        summaries.append(summary)
    strata = []
    if args.strata_dir:
        for path in sorted(Path(args.strata_dir).glob(f"strata_ruler_L{length}_*.json")):
            strata.append(json.loads(path.read_text()))
    both = sorted(strata + summaries,
                  key=lambda s: (s["policy"] != "full", s["policy"], s["protocol"], -s["budget"],
                                 s["system"]))  # fmt: skip
    text = table(both)
    print(text)
    (out / f"side_by_side_L{length}.md").write_text(text + "\n")
    if len({s["budget"] for s in both}) > 2:
        plot_sweep(both, out / f"side_by_side_L{length}.png", f"RULER at {length} tokens")


def cmd_compact(args: argparse.Namespace) -> None:
    """One line per (length, policy, protocol, KV dtype): Strata's and kvpress's averages."""
    rows: dict[tuple, dict[str, dict]] = {}
    for folder in args.dirs:
        for path in sorted(Path(folder).glob("*_ruler_L*.json")):
            s = json.loads(path.read_text())
            key = (s["length"], s["policy"], s["budget"], s["protocol"] if s["policy"] != "full"
                   else "-", s.get("kv_cache_dtype", "auto"))  # fmt: skip
            rows.setdefault(key, {})[s["system"]] = s
    print(
        "| L | policy | budget | protocol | KV dtype | Strata avg | kvpress avg | Strata wall s "
        "| kvpress wall s | Strata peak/final KV MiB | kvpress peak/final KV MiB |"
    )
    print("|---" * 11 + "|")

    def cell(s: dict | None, fmt: str) -> str:
        return "" if s is None else fmt.format(**s)

    for key in sorted(rows, key=lambda k: (k[0], k[1] != "full", k[1], -k[2], k[3], k[4])):
        st, kp = rows[key].get("strata"), rows[key].get("kvpress")
        print(f"| {key[0]} | {key[1]} | {key[2]:g} | {key[3]} | {key[4]} "
              f"| {cell(st, '{average:.1f}')} | {cell(kp, '{average:.1f}')} "
              f"| {cell(st, '{wall_s:.1f}')} | {cell(kp, '{wall_s:.1f}')} "
              f"| {cell(st, '{peak_kv_mib:.1f}/{final_kv_mib:.1f}')} "
              f"| {cell(kp, '{peak_kv_mib:.1f}/{final_kv_mib:.1f}')} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="samples as token ids (Strata's environment)")
    d.add_argument("--model", required=True, help="model folder (its tokenizer is used)")
    d.add_argument("--length", type=int, default=4096)
    d.add_argument("--samples", type=int, default=10, help="samples per task")
    d.add_argument("--tasks", default="all")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_dump)
    r = sub.add_parser("run", help="kvpress presses on dumped samples (kvpress's environment)")
    r.add_argument("--model", required=True, help="model folder (transformers format)")
    r.add_argument("--samples-file", required=True)
    r.add_argument("--policy", default=",".join(PRESSES), help="comma-separated kv_policy names")
    r.add_argument("--budget", default="0.125", help="comma-separated fractions kept")
    r.add_argument("--protocol", default="both", choices=[*PROTOCOLS, "both"])
    r.add_argument("--no-full", action="store_true", help="skip the uncompressed run")
    r.add_argument("--max-new-tokens", type=int, default=None, help="override (quick checks)")
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("score", help="score kvpress answers, table beside Strata's JSONs")
    s.add_argument("--samples-file", required=True)
    s.add_argument("--predictions", required=True, nargs="+", help="`run` outputs")
    s.add_argument("--strata-dir", default=None, help="folder of `strata eval ruler` JSONs")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_score)
    c = sub.add_parser("compact", help="Strata and kvpress averages, one line per run")
    c.add_argument("--dirs", nargs="+", required=True, help="folders of run JSONs")
    c.set_defaults(func=cmd_compact)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())

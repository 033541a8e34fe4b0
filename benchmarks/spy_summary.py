"""Summarise a py-spy raw profile (collapsed stacks): where each thread's time went.

    py-spy record --idle --threads [--subprocesses] --format raw -o spy.txt -- CMD
    python benchmarks/spy_summary.py spy.txt [--scope NAME] [--thread SUBSTR] [--top N]

Each line of the file is one distinct stack, its frames joined by ';' (the process and
the thread first, with --subprocesses and --threads), then its sample count. `--scope`
keeps the stacks through a frame whose function is NAME (for example the function that
runs one benchmark phase) and times the rest from there. Prints the samples of each
process and thread, then, for each thread that matches `--thread` (default: all), the
functions with the most samples inclusive (in any frame of the stack) and exclusive (the
innermost frame). With `--idle`, time a thread spends waiting (a lock, an event, a
device sync) is sampled too and shows as the waiting function.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")


@dataclass(frozen=True)
class Stack:
    process: str
    thread: str
    frames: tuple[str, ...]  # outermost first, each "function (file)" without its line
    samples: int


def frame_name(frame: str) -> str:
    """'step (strata/engine/engine.py:129)' -> 'step (strata/engine/engine.py)'."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['func']} ({match['file']})"


def parse(text: str) -> list[Stack]:
    stacks = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        parts = match[1].split(";")
        process = parts.pop(0) if parts and parts[0].startswith("process ") else ""
        thread = parts.pop(0) if parts and parts[0].startswith("thread ") else ""
        frames = tuple(frame_name(p) for p in parts)
        stacks.append(Stack(process, thread, frames, int(match[2])))
    return stacks


def scoped(stacks: list[Stack], scope: str) -> list[Stack]:
    """The stacks through a frame of function `scope`, cut to start there."""
    out = []
    for s in stacks:
        for i, frame in enumerate(s.frames):
            if frame.split(" (", 1)[0] == scope:
                out.append(Stack(s.process, s.thread, s.frames[i:], s.samples))
                break
    return out


def summarise(stacks: list[Stack], thread_filter: str, top: int) -> None:
    per_thread: dict[tuple[str, str], list[Stack]] = defaultdict(list)
    for s in stacks:
        per_thread[(s.process, s.thread)].append(s)
    total = sum(s.samples for s in stacks)
    print(f"{total} samples")
    for (process, thread), group in sorted(per_thread.items(), key=lambda kv: kv[0]):
        n = sum(s.samples for s in group)
        print(f"  {n:>8} {n / max(total, 1):6.1%}  {process} {thread}".rstrip())
    for (process, thread), group in per_thread.items():
        if thread_filter not in f"{process} {thread}":
            continue
        n = sum(s.samples for s in group)
        if n < total * 0.01:
            continue
        inclusive: Counter[str] = Counter()
        exclusive: Counter[str] = Counter()
        for s in group:
            for frame in set(s.frames):
                inclusive[frame] += s.samples
            if s.frames:
                exclusive[s.frames[-1]] += s.samples
        print(f"\n== {process} {thread}: {n} samples".rstrip())
        print("  inclusive")
        for frame, count in inclusive.most_common(top):
            print(f"    {count / n:6.1%}  {frame}")
        print("  exclusive (innermost frame)")
        for frame, count in exclusive.most_common(top):
            print(f"    {count / n:6.1%}  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("file", type=Path, help="py-spy's --format raw output")
    parser.add_argument("--scope", default=None, help="keep stacks through this function")
    parser.add_argument("--thread", default="", help="detail threads whose name has this")
    parser.add_argument("--top", type=int, default=25, help="functions listed (default 25)")
    args = parser.parse_args()
    stacks = parse(args.file.read_text())
    if args.scope is not None:
        stacks = scoped(stacks, args.scope)
    summarise(stacks, args.thread, args.top)


if __name__ == "__main__":
    main()

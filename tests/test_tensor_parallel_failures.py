"""Tensor parallelism when things go wrong: a worker killed or hung mid-run fails the engine
with an error naming it, within the timeout, and no process is left; a worker whose rank 0
dies exits by itself; bad layouts and unsupported combinations are refused before any
process starts."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed
from transformers import LlamaConfig

from strata import LLM, SamplingParams
from strata.engine.tp.group import WorkerGroup
from strata.errors import TensorParallelError
from tests.conftest import TINY, make_hf_model

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
ENGINE = {"device": "cpu", "block_size": 4, "num_kv_blocks": 32, "max_model_len": 64}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tp-llama")
    make_hf_model(LlamaConfig(**{**TINY, "num_key_value_heads": 2})).save_pretrained(path)
    return path


def tp_workers() -> list[multiprocessing.process.BaseProcess]:
    return [p for p in multiprocessing.active_children() if p.name.startswith("strata-tp-")]


def assert_gone(pids: list[int]) -> None:
    assert not tp_workers()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.breaks_engine
def test_killed_worker_fails_the_engine_and_leaves_no_process(folder: Path) -> None:
    llm = LLM(str(folder), **ENGINE, tensor_parallel_size=2, tp_timeout=20)
    ref = LLM(str(folder), **ENGINE)
    assert llm.engine.kv.root != ref.engine.kv.root  # block keys name the parallel layout
    want = ref.generate([1, 2, 3], GREEDY)[0].token_ids
    assert llm.generate([1, 2, 3], GREEDY)[0].token_ids == want
    pids = [p.pid for p in llm.engine.parts.parallel.group.procs]  # type: ignore[union-attr]
    os.kill(pids[0], signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=rf"rank 1 \(pid {pids[0]}\) exited with code -9"):
        llm.generate([4, 5, 6], GREEDY)
    assert time.monotonic() - start < 10  # well inside tp_timeout: death is seen at once
    assert_gone(pids)
    with pytest.raises(TensorParallelError, match="failed earlier"):
        llm.generate([4, 5, 6], GREEDY)
    llm.close()


@pytest.mark.breaks_engine
def test_hung_worker_fails_the_engine_within_the_timeout(folder: Path) -> None:
    llm = LLM(str(folder), **ENGINE, tensor_parallel_size=2, tp_timeout=2)
    pids = [p.pid for p in llm.engine.parts.parallel.group.procs]  # type: ignore[union-attr]
    os.kill(pids[0], signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match="did not answer within 2 s"):
        llm.generate([1, 2, 3], GREEDY)
    assert 2 <= time.monotonic() - start < 10
    assert_gone(pids)


@pytest.mark.breaks_engine
def test_worker_hung_in_start_up_fails_the_engine_within_the_timeout(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that stops answering while the engine starts (here: before its KV pool)
    fails the start with an error naming it within tp_timeout, and no process is left."""
    send = WorkerGroup.send_pool_size
    pids: list[int] = []

    def stop_rank1_first(group: WorkerGroup, num_blocks: int, recall: object = None) -> None:
        pids.extend(p.pid for p in group.procs if p.pid is not None)
        os.kill(pids[0], signal.SIGSTOP)
        send(group, num_blocks)

    monkeypatch.setattr(WorkerGroup, "send_pool_size", stop_rank1_first)
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) did not report ready"):
        LLM(str(folder), **ENGINE, tensor_parallel_size=2, tp_timeout=2)
    assert 2 <= time.monotonic() - start < 30
    assert_gone(pids)


RANK0 = """
import os, sys
from strata import LLM
llm = LLM(sys.argv[1], device="cpu", num_kv_blocks=32, max_model_len=64, tensor_parallel_size=2)
print(*[p.pid for p in llm.engine.parts.parallel.group.procs], flush=True)
os.kill(os.getpid(), 9)
"""


def test_worker_exits_when_rank0_dies(folder: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", RANK0, str(folder)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == -9, done.stderr[-2000:]
    pids = [int(p) for p in done.stdout.split()]
    assert len(pids) == 1
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(pids[0], 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pids[0], signal.SIGKILL)
    raise AssertionError("the worker outlived rank 0 by 5 s")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tensor_parallel_size": 3}, "3 does not divide the model's 4 attention heads"),
        ({"tensor_parallel_size": 4}, "4 is more ranks than this host's 2 CPU cores"),
        ({"tensor_parallel_size": 2, "expert_slots": 2}, "does not run with expert offloading"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size must be a whole number >= 1"),
    ],
)
def test_bad_layouts_are_refused_before_any_process_starts(
    folder: Path, options: dict[str, object], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.raises(ValueError, match=message):
        LLM(str(folder), **ENGINE, **options)
    assert not tp_workers()


def test_missing_backend_is_refused(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_gloo_available", lambda: False)
    with pytest.raises(ValueError, match=r"needs the torch\.distributed gloo backend"):
        LLM(str(folder), **ENGINE, tensor_parallel_size=2)
    assert not tp_workers()

"""pinned_zeros: exact-size page-locked host tensors, and how long the pages stay locked."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch

from strata import pinned
from strata.pinned import PAGE, PinnedMemoryError, pinned_zeros


class FakeDriver:
    """cudaHostRegister / cudaHostUnregister that record what they were asked."""

    def __init__(self, error: int = 0) -> None:
        self.error = error
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        if self.error == 0:
            self.registered[ptr] = size
        return self.error

    def cudaHostUnregister(self, ptr: int) -> int:
        self.unregistered.append(ptr)
        return 0


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> FakeDriver:
    fake = FakeDriver()
    monkeypatch.setattr(pinned.torch, "cuda", SimpleNamespace(is_available=lambda: True,
                                                             cudart=lambda: fake))  # fmt: skip
    return fake


def test_without_cuda_plain_zeros() -> None:
    t = pinned_zeros((3, 5), torch.bfloat16)
    assert t.shape == (3, 5) and t.dtype == torch.bfloat16 and not t.any()


def test_registers_exactly_its_pages(driver: FakeDriver) -> None:
    shape = (3, 1000, 7)  # 42,000 bytes of bfloat16: 11 pages, not the 64 KiB above it
    t = pinned_zeros(shape, torch.bfloat16)
    assert t.shape == shape and t.dtype == torch.bfloat16 and not t.any()
    assert list(driver.registered.items()) == [(t.data_ptr(), 11 * PAGE)]
    assert t.data_ptr() % PAGE == 0
    t[2, 999, 6] = 1.5  # writable to its last element
    assert t.view(-1)[-1].item() == 1.5


def test_unregisters_once_after_the_last_view(driver: FakeDriver) -> None:
    t = pinned_zeros((4, PAGE), torch.uint8)
    ptr = t.data_ptr()
    view = t[1:3]
    del t
    gc.collect()
    assert driver.unregistered == []  # a view still holds the memory
    view.fill_(7)
    del view
    gc.collect()
    assert driver.unregistered == [ptr]


def test_a_refused_registration_is_a_clear_error(driver: FakeDriver) -> None:
    driver.error = 2  # cudaErrorMemoryAllocation
    with pytest.raises(PinnedMemoryError, match=r"could not page-lock 0\.00 GiB"):
        pinned_zeros((10,), torch.float32)

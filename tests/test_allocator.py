"""The training process keeps freed memory mapped (training/allocator.py)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHURN = """
import ctypes, resource, sys, torch
from genctr_rec.training import allocator

def step():  # a step's temporaries: ten 2 MB tensors, freed together
    held = [torch.ones(1 << 19) for _ in range(10)]
    del held

if sys.argv[1] == "1":
    assert allocator.keep_freed_memory()
else:  # glibc's thresholds as a process starts, fixed (its adaptive ones depend on history)
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(allocator.M_MMAP_THRESHOLD, 128 * 1024) == 1
    assert libc.mallopt(allocator.M_TRIM_THRESHOLD, 128 * 1024) == 1
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def _faults_per_step(keep: bool) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHURN, "1" if keep else "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_step_memory_is_not_faulted_back_in():
    baseline = _faults_per_step(keep=False)
    kept = _faults_per_step(keep=True)
    assert baseline >= 20, f"glibc's own thresholds faulted only {baseline} times a step"
    assert kept < 2, f"{kept} page faults a step with the thresholds set"


def test_can_be_turned_off(monkeypatch):
    import genctr_rec.training.allocator as allocator

    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setenv(allocator.ENV, "0")
    assert allocator.keep_freed_memory() is False

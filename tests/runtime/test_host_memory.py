"""recurrent_depth.runtime.host_memory: when the entry points re-execute with glibc's huge-page tunable, and that
it takes effect (far fewer page faults for a large block allocated and freed again, as XLA:CPU does every step)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from recurrent_depth.runtime import host_memory

# Allocates, touches and frees a 256 MiB block three times (glibc maps it fresh each time); prints the page faults.
CHILD = """
import ctypes, resource, sys
sys.path.insert(0, {root!r})
from recurrent_depth.runtime.host_memory import use_huge_pages
use_huge_pages()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    block = libc.malloc(256 << 20)
    ctypes.memset(block, 1, 256 << 20)
    libc.free(block)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.fixture
def linux_with_thp(monkeypatch, tmp_path):
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    monkeypatch.setattr(host_memory, "_THP_MODE", mode)
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(host_memory.sys, "platform", "linux")
    return mode


def test_huge_page_env_adds_the_tunable_once(linux_with_thp):
    assert host_memory.huge_page_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    other = host_memory.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "HOME": "/h"})
    assert other == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "HOME": "/h"}
    assert host_memory.huge_page_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's choice


def test_huge_page_env_does_nothing_without_support(linux_with_thp, monkeypatch):
    linux_with_thp.write_text("always madvise [never]\n")
    assert host_memory.huge_page_env({}) is None
    linux_with_thp.write_text("[always] madvise never\n")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("glibc", "2.31"))  # no hugetlb tunable yet
    assert host_memory.huge_page_env({}) is None
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))  # musl
    assert host_memory.huge_page_env({}) is None


@pytest.mark.skipif(host_memory.huge_page_env({}) is None, reason="needs glibc >= 2.35 and transparent huge pages")
def test_use_huge_pages_reexecutes_with_fewer_page_faults():
    root = os.fspath(Path(__file__).resolve().parents[2])  # the repository
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    run = lambda env: int(subprocess.run([sys.executable, "-c", CHILD.format(root=root)], env=env, check=True,  # noqa: E731
                                         capture_output=True, text=True).stdout)
    with_huge_pages = run(env)
    without = run({**env, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert without > 3 * (256 << 20) // 4096 * 0.9  # every 4 KiB page faulted in, each time
    assert with_huge_pages < without / 10, (with_huge_pages, without)

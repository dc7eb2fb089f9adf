"""recurrent_depth.runtime.host_memory: when the entry points re-execute with glibc's huge-page tunable (the plain
command line only: never in IPython, under a debugger or run by another program), and that it takes effect (far
fewer page faults for a large block allocated and freed again, as XLA:CPU does every step)."""

import os
import subprocess
import sys
import types
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


def test_program_reads_the_interpreter_command_line():
    program = host_memory.program
    assert program(["python", "train.py", "--config=x"]) == ("script", "train.py")
    assert program(["python3", "-u", "-X", "dev", "-Wignore", "-OO", "train.py"]) == ("script", "train.py")
    assert program(["python", "-m", "pdb", "train.py"]) == ("module", "pdb")
    assert program(["python", "-um", "bench.train_bench"]) == ("module", "bench.train_bench")
    assert program(["python", "-c", "import runpy", "train.py"]) == ("code", "import runpy")
    assert program(["python", "--check-hash-based-pycs", "never", "eval.py"]) == ("script", "eval.py")
    assert program(["python"]) is None and program(["python", "-i", "-"]) is None


def _main(path=None, module=None):
    """A stand-in `__main__` module: run as a script (no spec) or by `-m` (a spec named `module`)."""
    return types.SimpleNamespace(__file__=str(path), __spec__=module and types.SimpleNamespace(name=module))


def test_why_not_reexecute_allows_only_the_plain_command_line(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    why = lambda main, argv, modules=(), traced=False: host_memory.why_not_reexecute(  # noqa: E731
        main, orig_argv=argv, modules=dict.fromkeys(modules), traced=traced)
    assert why(_main(script), ["python", str(script), "--x=1"]) is None
    assert why(_main(script, "bench.train_bench"), ["python", "-m", "bench.train_bench"]) is None
    assert why(_main(script, "pkg.__main__"), ["python", "-m", "pkg"]) is None
    assert "IPython" in why(_main(script), ["python", str(script)], modules=["IPython"])  # %run in a notebook
    assert "Jupyter" in why(_main(script), ["python", "-m", "ipykernel_launcher", "-f", "k.json"], ["ipykernel"])
    assert "debugger" in why(_main(script), ["python", str(script)], traced=True)  # sys.gettrace() set
    assert "debugger" in why(_main(script), ["python", str(script)], modules=["debugpy"])
    assert "debugger" in why(_main(script), ["python", str(script)], modules=["pydevd"])
    assert why(_main(script), ["python", str(script)], modules=["pdb", "bdb"]) is None  # absl.app imports pdb
    assert "pdb" in why(_main(script), ["python", "-m", "pdb", str(script)])  # pdb clears __main__'s spec
    assert "other.py" in why(_main(script), ["python", str(tmp_path / "other.py")])  # runpy.run_path from it
    assert why(_main(script), ["python", "-c", "import runpy; runpy.run_path('train.py')"]) is not None
    assert why(_main(script, "train"), ["python", "-m", "pdb", "-m", "train"]) is not None
    assert why(_main(script), ["python"]) is not None


# Prints the GLIBC_TUNABLES it ends up with, however it is run.
PRINT_TUNABLES = """
import os, sys
sys.path.insert(0, {root!r})
from recurrent_depth.runtime.host_memory import use_huge_pages
if __name__ == "__main__":
    use_huge_pages()
    print(os.environ.get("GLIBC_TUNABLES"))
"""


@pytest.mark.skipif(host_memory.huge_page_env({}) is None, reason="needs glibc >= 2.35 and transparent huge pages")
def test_only_the_plain_command_line_reexecutes(tmp_path):
    root = os.fspath(Path(__file__).resolve().parents[2])
    (tmp_path / "entry.py").write_text(PRINT_TUNABLES.format(root=root))
    (tmp_path / "other.py").write_text("import runpy\nrunpy.run_path('entry.py', run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PYTHONBREAKPOINT")}
    run = lambda *args, stdin=None: subprocess.run([sys.executable, *args], env=env, cwd=tmp_path, input=stdin,  # noqa: E731
                                                   capture_output=True, text=True, check=True).stdout
    assert run("entry.py").strip() == "glibc.malloc.hugetlb=1"
    assert run("-m", "entry").strip() == "glibc.malloc.hugetlb=1"
    assert run("other.py").strip() == "None"  # runpy from another program
    assert run("-c", "import runpy; runpy.run_path('entry.py', run_name='__main__')").strip() == "None"
    assert "None" in run("-m", "pdb", "entry.py", stdin="continue\nquit\n").split()  # a debugger


@pytest.mark.skipif(host_memory.huge_page_env({}) is None, reason="needs glibc >= 2.35 and transparent huge pages")
def test_use_huge_pages_reexecutes_with_fewer_page_faults(tmp_path):
    root = os.fspath(Path(__file__).resolve().parents[2])  # the repository
    (tmp_path / "child.py").write_text(CHILD.format(root=root))  # a script: `python -c` never re-executes
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    run = lambda env: int(subprocess.run([sys.executable, tmp_path / "child.py"], env=env, check=True,  # noqa: E731
                                         capture_output=True, text=True).stdout)
    with_huge_pages = run(env)
    without = run({**env, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert without > 3 * (256 << 20) // 4096 * 0.9  # every 4 KiB page faulted in, each time
    assert with_huge_pages < without / 10, (with_huge_pages, without)

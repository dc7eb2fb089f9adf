"""Transparent huge pages for the host allocator: CPU train steps 10-20% faster (234-242 against 195-219 tokens/s).

XLA:CPU allocates a step's temporaries (1.1 GiB at bench-small) as one block on every call; glibc maps such a
block fresh and unmaps it on free, so each step faults in every 4 KiB page anew (280k faults, 13% of the
process's CPU time in the kernel).  glibc's `glibc.malloc.hugetlb=1` tunable has it ask for transparent huge
pages instead (2 MiB: 1.2k faults).  Tunables are read only when a process starts, so the entry points
(train.py, eval.py, the benches) re-execute themselves once with it set.  Python-API users set it themselves:
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python ...`; any GLIBC_TUNABLES that already names it (=0 opts out) is
left as it is.  Imports nothing heavy: it runs before jax is loaded.

Re-execution replaces the whole process, so it happens only where the process is the entry point's own: the
command line the interpreter started with (`sys.orig_argv`) names, as its program, the running `__main__` module,
either its file (`python train.py ...`) or its module name (`python -m bench.train_bench ...`).  Never otherwise
(`why_not_reexecute` says why): not in IPython or a Jupyter kernel (`%run train.py` would replace the kernel),
not under a debugger or tracer (`sys.gettrace()`, coverage's too; a `sys.monitoring` debugger; debugpy or pydevd
loaded), not when another program runs the script (`python -m pdb train.py`, `runpy.run_path` from a script,
`python -c ...`).  The script then runs on in-process, without huge pages.  (`pdb` being loaded is no sign:
absl.app imports it.)
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
_INTERACTIVE = ("IPython", "ipykernel")  # a notebook kernel or an IPython shell
_DEBUGGERS = ("debugpy", "pydevd")  # VS Code, PyCharm
_OPTIONS_WITH_VALUE = "WX"  # python -W arg, -X arg (as -Warg too); -c and -m end the interpreter's options


def huge_page_env(environ=None) -> dict[str, str] | None:
    """The environment to re-execute with, or None where there is nothing to do: not glibc >= 2.35, transparent
    huge pages off, or GLIBC_TUNABLES already naming the tunable."""
    environ = dict(os.environ if environ is None else environ)
    libc, version = platform.libc_ver()
    if sys.platform != "linux" or libc != "glibc" or tuple(map(int, version.split(".")[:2])) < (2, 35):
        return None
    if not _THP_MODE.exists() or "[never]" in _THP_MODE.read_text():
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:
        return None
    environ["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"
    return environ


def program(orig_argv: list[str]) -> tuple[str, str] | None:
    """What an interpreter command line runs: ("script", path), ("module", name) or ("code", text); None for
    stdin or an interactive prompt."""
    args = iter(orig_argv[1:])
    for arg in args:
        if arg == "--" or not arg.startswith("-") or arg == "-":
            script = next(args, None) if arg == "--" else arg
            return None if script in (None, "-") else ("script", script)
        if arg.startswith("--"):  # --check-hash-based-pycs MODE; no other long option takes a value
            if arg == "--check-hash-based-pycs":
                next(args, None)
            continue
        for i, letter in enumerate(arg[1:], 1):  # -uB, -Werror, -m mod, -mmod, -c code
            if letter in "cm":
                value = arg[i + 1:] or next(args, "")
                return ("code" if letter == "c" else "module", value)
            if letter in _OPTIONS_WITH_VALUE:
                if i == len(arg) - 1:
                    next(args, None)
                break
    return None


def why_not_reexecute(main=None, *, orig_argv: list[str] | None = None, modules=None,
                      traced: bool | None = None) -> str | None:
    """Why this process must not re-execute itself, or None where it may (the rule in the module docstring).
    `main` is the running `__main__` module (default sys.modules["__main__"]); the other arguments default to
    this process's own, so that tests can pose as IPython, a debugger or another program."""
    main = sys.modules.get("__main__") if main is None else main
    orig_argv = sys.orig_argv if orig_argv is None else orig_argv
    modules = sys.modules if modules is None else modules
    traced = _traced() if traced is None else traced
    if any(name in modules for name in _INTERACTIVE):
        return "running in IPython or a Jupyter kernel"
    if traced:
        return "running under a debugger or tracer"
    if any(name in modules for name in _DEBUGGERS):
        return "running under a debugger"
    ran = program(orig_argv)
    spec = getattr(main, "__spec__", None)
    if ran is not None and ran[0] == "module" and spec is not None and spec.name in (ran[1], f"{ran[1]}.__main__"):
        return None
    main_file = getattr(main, "__file__", None)
    if ran is not None and ran[0] == "script" and spec is None and main_file and _same_file(ran[1], main_file):
        return None
    return f"the command line runs {ran[1] if ran else 'no script'}, not {main_file or 'this program'}"


def use_huge_pages() -> None:
    """Re-executes this process (same interpreter, same command line) with `glibc.malloc.hugetlb=1`, where
    `huge_page_env` says so and `why_not_reexecute` has no objection; call it first thing in a script's
    `__main__`."""
    env = huge_page_env()
    if env is not None and why_not_reexecute() is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)


def _traced() -> bool:
    """A trace function is set, or (Python >= 3.12) a debugger holds sys.monitoring's debugger slot."""
    monitoring = getattr(sys, "monitoring", None)
    return sys.gettrace() is not None or (monitoring is not None and
                                          monitoring.get_tool(monitoring.DEBUGGER_ID) is not None)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False

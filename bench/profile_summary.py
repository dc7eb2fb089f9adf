"""Where a CPU train step spends its time, from a jax.profiler trace: XLA op time per kind, the costliest other ops,
and the matmuls' achieved FLOP/s per shape.

  python bench/profile_summary.py DIR [--top=15]

DIR is what `bench/train_bench.py --profile=DIR` wrote for one setting (DIR/<setting>): the trace of the timed steps
and `step.hlo.txt`, the compiled step, whose instructions name the trace's events.  Times are exclusive (an event's
duration less that of the events nested in it) and summed over XLA's worker threads.  Caveat: XLA:CPU runs a dot
whose operand needs a transpose (the weight gradients) through Eigen asynchronously; its event marks only the
launch, and its work shows up in the ops that run alongside it, so per-shape rates are those of the step, not of
isolated products.
"""

from __future__ import annotations

import collections
import math
import pathlib
import re
import sys

import jax
from absl import flags

from recurrent_depth.cli import app

FLAGS = flags.FlagValues()
flags.DEFINE_integer("top", 15, "rows per table", flag_values=FLAGS)

_SHAPE = r"(?:f32|bf16|f16)\[([\d,]*)\]"
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = " + _SHAPE)
_DOT = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = " + _SHAPE + r".*? dot\(%([\w.\-]+), %([\w.\-]+)\).*?"
                  r"lhs_contracting_dims=\{([\d,]*)\}")
_FUSION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = .*? fusion\(.*calls=%([\w.\-]+)")


def _dims(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",")) if text else ()


def exclusive_op_seconds(trace_dir: pathlib.Path) -> tuple[dict[str, float], dict[str, int]]:
    """Exclusive seconds and event counts per op name on XLA's worker threads, from the newest xplane."""
    files = sorted(trace_dir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no .xplane.pb under {trace_dir}")
    plane = jax.profiler.ProfileData.from_file(str(files[-1])).find_plane_with_name("/host:CPU")
    seconds, counts = collections.Counter(), collections.Counter()
    for line in plane.lines:
        if not line.name.startswith("tf_XLAEigen"):
            continue
        events = sorted((e.start_ns, -e.end_ns, e.name) for e in line.events if not e.name.startswith("end:"))
        stack = []  # [end, name, start, nested time]

        def pop(stack=stack):
            end, name, start, nested = stack.pop()
            seconds[name] += (end - start - nested) * 1e-9
            counts[name] += 1
            if stack:
                stack[-1][3] += end - start

        for start, neg_end, name in events:
            while stack and stack[-1][0] <= start:
                pop()
            stack.append([-neg_end, name, start, 0])
        while stack:
            pop()
    return dict(seconds), dict(counts)


def dot_shapes(hlo_text: str) -> dict[str, tuple[float, tuple, tuple, tuple]]:
    """FLOPs, lhs, rhs and output shape of every dot, by the name of the instruction that runs it (a fusion that
    calls a computation containing the dot, or the dot itself)."""
    shapes, dots, computation, calls = {}, {}, None, {}
    for line in hlo_text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        if m := _INSTRUCTION.match(line):
            shapes[m.group(1)] = _dims(m.group(2))
        if m := _DOT.match(line):
            out, lhs = _dims(m.group(2)), shapes.get(m.group(3), ())
            contracted = math.prod(lhs[d] for d in _dims(m.group(5))) if lhs else 0
            dots[m.group(1)] = (2.0 * math.prod(out) * contracted, lhs, shapes.get(m.group(4), ()), out)
            dots.setdefault(computation, dots[m.group(1)])
        if m := _FUSION.match(line):
            calls[m.group(1)] = m.group(2)
    return {**dots, **{name: dots[called] for name, called in calls.items() if called in dots}}


def kind(name: str, dots: dict) -> str:
    if name in dots or name.startswith(("dot", "ynn_fusion", "xnn_fusion")):
        return "matmul"
    if name.startswith(("ThunkExecutor", "ThreadpoolListener", "SlinkyThreadPool")):
        return "runtime"
    if "copy" in name or "transpose" in name:
        return "copy"
    return "elementwise and other"


def main(argv: list[str] | None = None) -> int:
    return app.run(_summary, FLAGS, argv, doc=__doc__, prog="bench/profile_summary.py")


def _summary(positional: list[str]) -> None:
    directory = pathlib.Path(app.positional(positional, "DIR")[0])
    seconds, counts = exclusive_op_seconds(directory)
    hlo = directory / "step.hlo.txt"
    dots = dot_shapes(hlo.read_text()) if hlo.exists() else {}
    total = sum(seconds.values())
    by_kind = collections.Counter()
    for name, s in seconds.items():
        by_kind[kind(name, dots)] += s
    print(f"XLA op time {total:.2f} s (exclusive, summed over worker threads)")
    for k, s in by_kind.most_common():
        print(f"  {k:22s} {s:7.2f} s  {s / total:6.1%}")
    print("costliest non-matmul ops:")
    others = sorted(((s, n) for n, s in seconds.items() if kind(n, dots) != "matmul"), reverse=True)
    for s, name in others[:FLAGS.top]:
        print(f"  {s:7.3f} s  x{counts[name]:<4d} {name}")
    if dots:
        shapes = collections.defaultdict(lambda: [0.0, 0.0, 0])
        for name, s in seconds.items():
            if name in dots:
                flop, lhs, rhs, out = dots[name]
                entry = shapes[(lhs, rhs, out)]
                entry[0] += s
                entry[1] += flop * counts[name]
                entry[2] += counts[name]
        print("matmuls by shape (lhs x rhs -> out): seconds, achieved GFLOP/s, calls")
        for (lhs, rhs, out), (s, flop, n) in sorted(shapes.items(), key=lambda kv: -kv[1][0])[:FLAGS.top]:
            print(f"  {s:7.3f} s  {flop / max(s, 1e-9) / 1e9:8.1f}  x{n:<4d} {list(lhs)} x {list(rhs)} -> {list(out)}")


if __name__ == "__main__":
    sys.exit(main())

"""One host's data loader against the store's size, and against what a huginn-0125 train step consumes; prints a table.

  python bench/data_bench.py [--sizes=1e6,1e8,1e9] [--kinds=array_record,parquet] [--workdir=/tmp/data_bench]
      [--batch=16] [--batches=100] [--repeats=3] [--processes=3] [--threads=1,8] [--mfu=0.4]

Stores (generated once into --workdir, reused while their parameters match): for each size, rows of 4097 random
token ids in [0, 65536) (seq_len 4096, huginn-0125's vocabulary)
  array_record  a row store as `prepare` writes it (recurrent_depth.data.row_format): ArrayRecord shards of 4096
                rows (64 MiB of int32 before compression; `group_size:1`, the writer's default brotli, as
                `prepare`), three document starts per row, and index.json;
  parquet       the released Huginn dataset's layout: a list<int64> column `input_ids`, one 4097-token row per
                record, documents marked by BOS 65504 (at 0 and twice more per row), row groups of 1000 rows in files
                of 25 row groups, pyarrow's defaults (dictionary, snappy).  The original's tokenizing script writes
                its shards with `datasets.Dataset.to_parquet`: Python-int token lists (int64) in row groups of its
                writer batch (1000 rows in the datasets versions of the time); the released files' footers were not
                checked.
Random ids are the worst case for the compressors (real text's ids compress better), and the files are read from
this machine's page cache (generation leaves them there), so reading costs CPU only: decompression, decoding, the
model batch.

Each store is measured in a fresh process (clean RSS): `make_dataset` of a mixture of that one store and `iter`
(construction), the first batch, then --repeats windows of --batches batches of --batch rows (rows/s and tokens/s
of the fastest window, 4096 model tokens a row; the process's CPU seconds per wall second in it as `cpu`), at
data.read_threads' default; RSS (VmRSS) before construction, after it, and after reading; growth = after reading -
before construction.  --processes such processes per store: the table shows the fastest start-up and rate (the
machine's other tenants only slow a process down) and the median RSS.  Then rows/s at --threads (a process each).

Consumption: huginn-0125 (configs/huginn_3p5b.py: the model, seq_len 4096, mean recurrence 32, backprop depth 8 with
the poisson-lognormal depth draw, whose mean n and k are estimated from 10^6 draws) trained on v5p-128: 64 chips
(v5p slices are named by TensorCores, two per chip), 4 per host, so 16 hosts, at the v5p's dense bf16 peak of
459 TFLOP/s (recurrent_depth.model.flops) and --mfu.  The README states no MFU for huginn-0125 on v5p; the default
0.4 is configs/huginn_3p5b.py's planning figure ("~17 s on 1024 v5p chips at 40% MFU").  A host consumes
mfu x peak x 4 / (model FLOPs per token) tokens/s.  Targets (issue #25): start-up (construction + first batch) and
RSS growth flat in the store size (the largest within 2x of the smallest over --sizes), the loader >= 10x the
consumption.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import multiprocessing
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import flags

from recurrent_depth.cli import app

ROOT = pathlib.Path(__file__).resolve().parent.parent

SEQ_LEN, VOCAB, BOS = 4096, 65536, 65504
ROW_LEN = SEQ_LEN + 1
AR_SHARD_ROWS = 4096  # 64 MiB of int32 per shard before compression
AR_DOCS = 3  # document starts per row (prepare's rows hold a few documents each)
PQ_GROUP_ROWS = 1000  # rows per row group (datasets' writer batch)
PQ_FILE_GROUPS = 25  # row groups per file: ~1e8 tokens a file
WRITE_CHUNK = 512  # rows generated at once
V5P_CHIPS, CHIPS_PER_HOST = 64, 4  # v5p-128
GLOBAL_BATCH = 4096  # rows per step of huginn's recipe
KINDS = ("array_record", "parquet")

FLAGS = flags.FlagValues()
flags.DEFINE_list("sizes", ["1e6", "1e8", "1e9"], "store sizes in tokens", flag_values=FLAGS)
flags.DEFINE_list("kinds", list(KINDS), "store kinds: array_record, parquet", flag_values=FLAGS)
flags.DEFINE_string("workdir", "/tmp/data_bench", "where the generated stores are kept", flag_values=FLAGS)
flags.DEFINE_integer("batch", 16, "rows per batch (one host's share of a step)", flag_values=FLAGS)
flags.DEFINE_integer("batches", 100, "batches per timed window, after the first batch", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "timed windows per process (the fastest counts)", flag_values=FLAGS)
flags.DEFINE_integer("processes", 3, "fresh processes per store at the default read_threads (best times and rates, "
                     "median memory)", flag_values=FLAGS)
flags.DEFINE_list("threads", ["1", "8"], "other data.read_threads measured for rows/s ('' for none)",
                  flag_values=FLAGS)
flags.DEFINE_float("mfu", 0.4, "MFU of huginn-0125's train step on v5p (the README states none)", flag_values=FLAGS)
flags.DEFINE_integer("workers", os.cpu_count() or 1, "processes generating the stores", flag_values=FLAGS)
flags.DEFINE_string("child", None, "internal: measure one store in this process (JSON)", flag_values=FLAGS)


# ---- generation ----------------------------------------------------------------------------------------------------

def _rows(tokens: int) -> int:
    return math.ceil(tokens / ROW_LEN)


def _label(tokens: int) -> str:
    exponent = int(round(math.log10(tokens)))
    return f"1e{exponent}" if 10**exponent == tokens else str(tokens)


def _write_array_record_shard(path: str, rows: int, seed: tuple) -> int:
    from array_record.python.array_record_module import ArrayRecordWriter

    from recurrent_depth.data.row_format import encode_row

    rng = np.random.default_rng(seed)
    tmp = f"{path}.tmp"
    writer = ArrayRecordWriter(tmp, "group_size:1")  # as prepare: a record per chunk, random access by row
    for start in range(0, rows, WRITE_CHUNK):
        n = min(WRITE_CHUNK, rows - start)
        tokens = rng.integers(0, VOCAB, (n, ROW_LEN), dtype=np.int32)
        starts = np.sort(rng.choice(np.arange(1, ROW_LEN), (n, AR_DOCS), replace=True), axis=1)
        for t, s in zip(tokens, starts):
            writer.write(encode_row(t, np.unique(s), ROW_LEN))
    writer.close()
    os.replace(tmp, path)
    return rows


def _write_parquet_file(path: str, rows: int, seed: tuple) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    schema = pa.schema([("input_ids", pa.list_(pa.int64()))])
    tmp = f"{path}.tmp"
    with pq.ParquetWriter(tmp, schema) as writer:  # pyarrow's defaults: dictionary encoding, snappy
        for start in range(0, rows, PQ_GROUP_ROWS):
            n = min(PQ_GROUP_ROWS, rows - start)
            tokens = rng.integers(0, VOCAB, (n, ROW_LEN), dtype=np.int64)
            tokens[:, 0] = BOS
            tokens[np.arange(n)[:, None], rng.integers(1, ROW_LEN, (n, 2))] = BOS
            offsets = pa.array(np.arange(0, n * ROW_LEN + 1, ROW_LEN, dtype=np.int32))
            column = pa.ListArray.from_arrays(offsets, pa.array(tokens.reshape(-1)))
            writer.write_table(pa.table({"input_ids": column}, schema=schema), row_group_size=PQ_GROUP_ROWS)
    os.replace(tmp, path)
    return rows


def _store_plan(kind: str, tokens: int, directory: pathlib.Path) -> tuple[dict, list[tuple]]:
    """(the store's parameters, its files' writer tasks)."""
    rows = _rows(tokens)
    per_file = AR_SHARD_ROWS if kind == "array_record" else PQ_GROUP_ROWS * PQ_FILE_GROUPS
    files = math.ceil(rows / per_file)
    params = {"kind": kind, "tokens": tokens, "rows": rows, "files": files, "per_file": per_file,
              "row_len": ROW_LEN, "layout": 1}
    writer = _write_array_record_shard if kind == "array_record" else _write_parquet_file
    suffix = "arrayrecord" if kind == "array_record" else "parquet"
    tasks = [(writer, str(directory / f"rows-{i:05d}-of-{files:05d}.{suffix}"), min(per_file, rows - i * per_file),
              (KINDS.index(kind), tokens, i)) for i in range(files)]
    return params, tasks


def _finish_store(kind: str, directory: pathlib.Path, params: dict, tasks: list[tuple]) -> None:
    if kind == "array_record":
        from recurrent_depth.data.row_format import StoreIndex

        tokenizer = {"fingerprint": "data-bench", "vocab_size": VOCAB, "bos_id": BOS, "eos_id": BOS + 1, "pad_id": 0}
        shards = [{"file": pathlib.Path(path).name, "rows": rows, "documents": rows * (AR_DOCS + 1),
                   "tokens": rows * ROW_LEN} for _, path, rows, _ in tasks]
        StoreIndex(SEQ_LEN, tokenizer, shards).write(directory)
    (directory / "bench.json").write_text(json.dumps(params))  # last: the store is complete


def ensure_stores(stores: list[tuple[str, int]], workdir: pathlib.Path, workers: int) -> dict:
    """Generates the stores not yet in `workdir` (in parallel); {(kind, tokens): generation seconds or None}."""
    todo, seconds = [], {}
    for kind, tokens in stores:
        directory = workdir / f"{kind}-{_label(tokens)}"
        params, tasks = _store_plan(kind, tokens, directory)
        marker = directory / "bench.json"
        if marker.exists() and json.loads(marker.read_text()) == params:
            seconds[kind, tokens] = None
            continue
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        todo.append((kind, tokens, directory, params, tasks))
    if not todo:
        return seconds
    start = time.perf_counter()
    # Largest files first; spawn, not fork: the workers need no state of this process.
    jobs = sorted(((i, t) for i, (*_, tasks) in enumerate(todo) for t in tasks), key=lambda j: -j[1][2])
    left = [len(tasks) for *_, tasks in todo]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(task[0], *task[1:]): i for i, task in jobs}
        for future in concurrent.futures.as_completed(futures):
            future.result()
            i = futures[future]
            left[i] -= 1
            if not left[i]:
                kind, tokens, directory, params, tasks = todo[i]
                _finish_store(kind, directory, params, tasks)
                seconds[kind, tokens] = time.perf_counter() - start
                size = sum(f.stat().st_size for f in directory.iterdir())
                print(f"generated {directory} ({params['rows']} rows, {params['files']} files, {size / 2**30:.2f} "
                      f"GiB), {seconds[kind, tokens]:.0f} s after generation began", flush=True)
    return seconds


# ---- measurement (in a fresh process) ------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: the peak instead


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(spec: dict) -> dict:
    """Start-up, memory and rate of make_dataset over one store, in this process."""
    from recurrent_depth.data.config import data_config
    from recurrent_depth.data.pipeline import make_dataset

    config = data_config()
    config.kind = "mixture"
    config.sources = ({"kind": spec["kind"], "paths": spec["path"], "weight": 1.0},)
    config.read_threads = spec["threads"]
    rss0 = _status_kib("VmRSS")
    start = time.perf_counter()
    iterator = iter(make_dataset(config, batch_size=spec["batch"], seq_len=SEQ_LEN, vocab_size=VOCAB, seed=0))
    built = time.perf_counter()
    rss1 = _status_kib("VmRSS")
    batch = next(iterator)
    first = time.perf_counter()
    assert batch["inputs"].shape == (spec["batch"], SEQ_LEN), batch["inputs"].shape
    windows = []  # (seconds, CPU seconds) of each window of `batches` batches: the fastest counts
    for _ in range(spec["repeats"]):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        for _ in range(spec["batches"]):
            batch = next(iterator)
        windows.append((time.perf_counter() - wall, _cpu_seconds() - cpu))
    rss2 = _status_kib("VmRSS")
    seconds, cpu = min(windows)
    rows = spec["batches"] * spec["batch"]
    return {"construct_s": built - start, "first_batch_s": first - built, "rss_before_mib": rss0 / 1024,
            "rss_built_mib": rss1 / 1024, "rss_after_mib": rss2 / 1024, "rss_growth_mib": (rss2 - rss0) / 1024,
            "rss_peak_mib": _status_kib("VmHWM") / 1024,
            "rows_per_s": rows / seconds, "tokens_per_s": rows * SEQ_LEN / seconds, "cpu": cpu / seconds,
            "rows_per_s_windows": [round(rows / s, 1) for s, _ in windows]}


def best(runs: list[dict]) -> dict:
    """Several processes' figures of one store: the fastest times and rates (the machine's other tenants only slow a
    process down), the median memory."""
    fastest = max(runs, key=lambda r: r["rows_per_s"])
    return {**{k: min(r[k] for r in runs) for k in ("construct_s", "first_batch_s")},
            **{k: float(np.median([r[k] for r in runs])) for k in runs[0] if k.startswith("rss")},
            **{k: fastest[k] for k in ("rows_per_s", "tokens_per_s", "cpu")},
            "rows_per_s_windows": [r["rows_per_s_windows"] for r in runs]}


def run_child(spec: dict) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, __file__, f"--child={json.dumps(spec)}"], capture_output=True, text=True,
                         env=env, cwd=ROOT, check=False)
    if out.returncode:
        raise RuntimeError(f"measuring {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- consumption ---------------------------------------------------------------------------------------------------

def consumption(mfu: float) -> dict:
    """What one v5p-128 host's train step of huginn-0125 consumes, and where each number comes from."""
    from recurrent_depth.model import flops
    from recurrent_depth.model.config import ModelConfig
    from recurrent_depth.runtime.config_file import load_config_file

    config = load_config_file(str(ROOT / "configs" / "huginn_3p5b.py"))
    model = ModelConfig.from_dict(config.model)
    seq, r, k = config.train.seq_len, model.mean_recurrence, model.mean_backprop_depth
    sigma = config.train.depth.sigma
    # recurrent_depth.training.depth's draw in numpy: r ~ Poisson(exp(N(ln(r̄) - sigma^2/2, sigma))) + 1
    rng = np.random.default_rng(0)
    total = rng.poisson(np.exp(math.log(r) - sigma**2 / 2 + sigma * rng.standard_normal(10**6))) + 1
    mean_n, mean_k = float(np.maximum(total - k, 0).mean()), float(np.minimum(total, k).mean())
    per_token = flops.train_flops_per_token(model, seq, mean_n, mean_k)  # linear in n and k: the mean's FLOPs
    peak = flops.chip_peak_flops("TPU v5p")
    tokens_per_s = mfu * peak * CHIPS_PER_HOST / per_token
    hosts = V5P_CHIPS // CHIPS_PER_HOST
    return {"mfu": mfu, "peak": peak, "flops_per_token": per_token, "mean_n": mean_n, "mean_k": mean_k,
            "tokens_per_s": tokens_per_s, "rows_per_s": tokens_per_s / seq, "hosts": hosts,
            "step_s": GLOBAL_BATCH * seq / (tokens_per_s * hosts), "rows_per_host_step": GLOBAL_BATCH // hosts,
            "seq_len": seq, "mean_recurrence": r, "backprop": k, "sigma": sigma}


# ---- report --------------------------------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def _ratio(values: list[float]) -> float:
    return max(values) / max(min(values), 1e-9)


def main(argv: list[str] | None = None) -> int:
    return app.run(_bench, FLAGS, argv, doc=__doc__, prog="bench/data_bench.py")


def _bench(positional: list[str]) -> None:
    app.positional(positional)
    if FLAGS.child:
        print(json.dumps(measure(json.loads(FLAGS.child))))
        return
    from recurrent_depth.data.config import data_config

    default_threads = data_config().read_threads
    sizes = sorted({int(float(s)) for s in FLAGS.sizes})
    kinds = [k for k in KINDS if k in FLAGS.kinds]
    if not sizes or not kinds or set(FLAGS.kinds) - set(KINDS):
        raise app.UsageError(f"--sizes needs a size and --kinds some of {KINDS}")
    other_threads = [int(t) for t in FLAGS.threads if t and int(t) != default_threads]
    workdir = pathlib.Path(FLAGS.workdir)
    start = time.perf_counter()
    generated = ensure_stores([(k, s) for k in kinds for s in sizes], workdir, FLAGS.workers)
    bench_start, load = time.perf_counter(), os.getloadavg()
    results = {}
    for kind in kinds:
        for size in sizes:
            spec = {"kind": kind, "path": str(workdir / f"{kind}-{_label(size)}"), "batch": FLAGS.batch,
                    "batches": FLAGS.batches, "repeats": FLAGS.repeats, "threads": default_threads}
            result = best([run_child(spec) for _ in range(FLAGS.processes)])
            result["threads"] = {t: run_child({**spec, "threads": t})["rows_per_s"] for t in other_threads}
            results[kind, size] = result
            print(f"measured {kind} {_label(size)}: {json.dumps(result)}", file=sys.stderr, flush=True)
    use = consumption(FLAGS.mfu)

    header = ["store", "tokens", "construct s", "first batch s", "RSS MiB before > after", "RSS growth MiB",
              "rows/s", "tokens/s", "cpu", "x consumption",
              *(f"rows/s {t} thr" for t in other_threads)]
    rows = []
    for (kind, size), r in results.items():
        rows.append([kind, _label(size), f"{r['construct_s']:.3f}", f"{r['first_batch_s']:.3f}",
                     f"{r['rss_before_mib']:.0f} > {r['rss_after_mib']:.0f}",
                     f"{r['rss_growth_mib']:.1f}", f"{r['rows_per_s']:.0f}",
                     f"{r['tokens_per_s']:.3g}", f"{r['cpu']:.2f}", f"{r['tokens_per_s'] / use['tokens_per_s']:.0f}x",
                     *(f"{r['threads'][t]:.0f}" for t in other_threads)])
    rows.append(["consumption", "", "", "", "", "", f"{use['rows_per_s']:.2f}", f"{use['tokens_per_s']:.3g}", "",
                 "1x", *("" for _ in other_threads)])
    print(f"\ndata loader, one host ({os.cpu_count()} CPUs), batches of {FLAGS.batch} x {SEQ_LEN} tokens, "
          f"data.read_threads={default_threads}; rows/s: the best of {FLAGS.repeats} windows of {FLAGS.batches} "
          f"batches after the first; load average {load[0]:.1f} before and {os.getloadavg()[0]:.1f} after measuring\n")
    print(_table(header, rows))
    print(f"\nconsumption: huginn-0125 (configs/huginn_3p5b.py) at seq_len {use['seq_len']}, mean recurrence "
          f"{use['mean_recurrence']}, backprop {use['backprop']} (poisson-lognormal, sigma {use['sigma']}: mean n "
          f"{use['mean_n']:.2f}, k {use['mean_k']:.2f}): {use['flops_per_token'] / 1e9:.1f} GFLOP per token "
          f"(flops.train_flops_per_token); v5p bf16 peak {use['peak'] / 1e12:.0f} TFLOP/s x {CHIPS_PER_HOST} chips "
          f"per host x MFU {use['mfu']} (--mfu; the README states none, configs/huginn_3p5b.py plans at 0.4) = "
          f"{use['tokens_per_s']:.0f} tokens/s ({use['rows_per_s']:.2f} rows/s) per host; v5p-128 = {V5P_CHIPS} "
          f"chips, {use['hosts']} hosts: a step of {GLOBAL_BATCH} rows takes {use['step_s']:.0f} s, "
          f"{use['rows_per_host_step']} rows per host")
    verdict = lambda ok: "holds" if ok else "MISSED"  # noqa: E731
    span = " / ".join(_label(s) for s in sizes)
    for kind in kinds:  # flat: the largest value within 2x of the smallest, over the sizes measured
        measured = [results[kind, s] for s in sizes]
        startup = [r["construct_s"] + r["first_batch_s"] for r in measured]
        growth = [r["rss_growth_mib"] for r in measured]
        total = [r["rss_after_mib"] for r in measured]
        speed = min(r["tokens_per_s"] for r in measured) / use["tokens_per_s"]
        print(f"{kind} at {span} tokens: start-up {' / '.join(f'{x:.2f}' for x in startup)} s "
              f"({_ratio(startup):.2f}x, {verdict(_ratio(startup) <= 2)}); RSS growth "
              f"{' / '.join(f'{x:.0f}' for x in growth)} MiB ({_ratio(growth):.2f}x, {verdict(_ratio(growth) <= 2)}; "
              f"RSS after reading {' / '.join(f'{x:.0f}' for x in total)} MiB, {_ratio(total):.2f}x); slowest "
              f"loader {speed:.0f}x the consumption ({verdict(speed >= 10)})")
    made = {f"{k} {_label(s)}": round(v) for (k, s), v in generated.items() if v is not None}
    print(f"\ngeneration {bench_start - start:.0f} s ({made or 'all stores cached'}), measurement "
          f"{time.perf_counter() - bench_start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())

"""Huginn-0125 at its real size: load, a forward and a short generation in bfloat16; one JSON line per implementation.

  python bench/fullsize.py --dir=DIR [--shape=huginn-0125] [--devices=1,8] [--measure=load,forward,generate]
      [--prompt_len=16] [--new_tokens=4] [--num_steps=4] [--batch=1] [--cache=full] [--repeats=1]
      [--original=PATH/TO/recurrent-pretraining --original_python=PATH/TO/torch-venv/bin/python] [--noours]

The checkpoint.  If --dir holds no checkpoint, the bench first writes one there with random weights in the released
huginn-0125's exact layout (it prints the size and path first, and refuses a --dir that holds anything else):
`config.json` (the release's: torch_dtype bfloat16), `generation_config.json`, four float32 safetensors shards
`model-0000{1..4}-of-00004.safetensors` and `model.safetensors.index.json`, the tensors placed as the release
places them (Hugging Face's 5 GB split of the original's state dict: the RoPE table `freqs_cis`, the embedding, the
prelude and the adapter; core blocks 0-2; core block 3, the coda and ln_f; the separate `lm_head.weight` copy of
the embedding alone), 15.65 GB at --shape=huginn-0125 (shards of 4.77, 4.74, 4.74 and 1.38 GB, as the release).
Tokenizer files and the original's .py files are not written.  The shards are written one at a time, tensor by
tensor in 64 MiB chunks (never a whole shard in memory), each through a temporary file renamed into place; an
interrupted write is resumed by the next run.  Random weights: uniform with the std of the original's init
(embedding and input projections sqrt(2 / 5h), output projections that over sqrt(2 x effective depth)), norm
weights 1 +- 0.1, the real RoPE table; `lm_head.weight` holds the same values as the embedding, as in the release.
--shape=mid (hidden 1024, 8 heads, MLP 3584, 1.0 GB) and --shape=tiny (hidden 64, 4 heads, MLP 96, vocab 512)
write the same layout at smaller sizes.  A --dir that already holds a checkpoint (the real release too) is used as
it is, whatever --shape says.

The measurements.  Each runs in a fresh process, so that its peak memory is its own: `load` (the checkpoint loaded
in bfloat16), `forward` (load, then a forward of --batch random prompts of --prompt_len tokens at --num_steps
iterations from a zero initial state, all logits) and `generate` (load, then greedy generation of --new_tokens
tokens at --num_steps iterations per token from a zero state with the --cache KV cache, no stop tokens).  This
project's side (`recurrent_depth`) measures once per --devices count d: the parameters loaded by
`from_huggingface(dir, dtype="bfloat16", shardings=param_shardings(mesh))` onto an FSDP mesh (1, d, 1) of the
first d devices (on CPU, d host devices: XLA_FLAGS=--xla_force_host_platform_device_count=d), the forward and
generate jitted under that mesh and the default logical rules.  The original's side (with --original: the
original PyTorch code, `recpre/raven_modeling_minimal.py` of a checkout of github.com/seal-rg/recurrent-pretraining,
run by bench/fullsize_original.py under --original_python, an interpreter with torch and transformers 4.x) loads
the same files with its own `RavenForCausalLM.from_pretrained(dir, dtype=torch.bfloat16)`, runs its forward
(`num_steps`, `init_scale=0`) and its `generate` (Hugging Face's greedy loop with its HuginnDynamicCache,
`cache_lookup_strategy` the same cache: full, compress-sK, latest-m4, latest-m4-compress-sK), on the CPU; it runs
once, with `devices` 1.  No process turns on huge pages (runtime/host_memory.py): both sides run under the
allocator settings of the environment.

Per measurement: `load_s`, the load's seconds; `rss_after_load_gb`; `peak_rss_gb`, the process's peak resident
memory (ru_maxrss from wait4: anonymous memory and the resident pages of memory-mapped files, such as the
checkpoint's); `peak_anon_gb`, the peak of its anonymous memory alone (RssAnon, sampled every 20 ms: what it needs
beyond the page cache); `params_gb` and `per_device_gb`, the bytes of the loaded parameters and of each device's
shards (the original: its parameters and buffers); `device_peak_gb` where the runtime reports device memory
(accelerators).  `forward`: `prefill_tokens_per_s` = batch x prompt_len over the best of --repeats forwards after
a first (compiling) call, whose time is `first_call_s`.  `generate`: the fastest of --repeats calls after a first
(compiling) one, timed by when each token reaches the host (this project: generate's `stream` callback; the
original: a streamer given to its generate): `tokens_per_s` over the whole call, `first_token_s` (the prefill and
the first token), `decode_tokens_per_s` = batch x (new_tokens - 1) / (the last token's time - the first's);
`tokens`, the greedy tokens.  With both sides, the original's line adds `vs_recurrent_depth` for each d: ours over
the original's peak_rss_gb and peak_anon_gb per measurement (issue #27's target: at most 1.3), the relative error
of our forward's logits against the original's (Frobenius norm of the difference over the original's; both
bfloat16), the fraction of positions where their argmax agrees, and of the greedy tokens that agree (bf16 noise
may flip a near-tie; the tokens after a flip differ).

The files are read from the page cache where earlier runs left them there (the first load after writing usually
is), so `load_s` measures the conversion more than the disk.  Memory is the machine's: run it alone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

import flax.linen as nn
import jax
import numpy as np
from absl import flags

from recurrent_depth import from_huggingface, generate
from recurrent_depth.checkpoint import param_shardings
from recurrent_depth.checkpoint.huggingface import config_to_hf, freqs_cis, load_hf_config
from recurrent_depth.cli import app
from recurrent_depth.model.config import ModelConfig
from recurrent_depth.runtime import sharding

ROOT = pathlib.Path(__file__).resolve().parent.parent
ORIGINAL_CHILD = ROOT / "bench" / "fullsize_original.py"
# Both sides compute the generation figures with the original side's function (that file is stdlib-only at import).
_spec = importlib.util.spec_from_file_location("fullsize_original", ORIGINAL_CHILD)
_original = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_original)
generate_figures, sig = _original.generate_figures, _original.sig
SHAPES = {  # name -> (hidden, heads, MLP inner size, vocab, context); (2, 4, 2) layers each, as huginn-0125
    "huginn-0125": (5280, 55, 17920, 65536, 4096),
    "mid": (1024, 8, 3584, 65536, 4096),
    "tiny": (64, 4, 96, 512, 128),
}
LAYERS = (2, 4, 2)  # prelude, core block, coda
MEASURES = ("load", "forward", "generate")
SHARDS = 4
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
INCOMPLETE = ".fullsize_incomplete"  # marks a directory this bench is writing (its shape inside)
CHUNK = 1 << 24  # values per generated chunk (64 MiB of float32)
RELEASE_TRANSFORMERS_VERSION = "4.47.1"  # what the release's config.json names (RavenConfig's default)
GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": 65504, "eos_token_id": [65505, 65508],
                     "pad_token_id": 65509, "transformers_version": RELEASE_TRANSFORMERS_VERSION}
BLOCK_TENSORS = ("attn.Wqkv.weight", "attn.proj.weight", "attn.qk_bias", "mlp.fc.weight", "mlp.proj.weight",
                 "norm_1.weight", "norm_2.weight", "norm_3.weight", "norm_4.weight")
ORIGINAL_CACHE = {"full": "full", "latest": "latest-m4"}  # + compress-K -> compress-sK, latest-compress-K

FLAGS = flags.FlagValues()
flags.DEFINE_string("dir", None, "the checkpoint directory: used if it holds a checkpoint, else written there "
                    "(it must be empty or new)", flag_values=FLAGS)
flags.DEFINE_enum("shape", "huginn-0125", list(SHAPES), "the shape of the checkpoint to write if --dir holds none",
                  flag_values=FLAGS)
flags.DEFINE_list("devices", ["1", "8"], "this project's device counts: one set of measurements each",
                  flag_values=FLAGS)
flags.DEFINE_list("measure", list(MEASURES), "measurements, each in its own process: load, forward, generate",
                  flag_values=FLAGS)
flags.DEFINE_integer("prompt_len", 16, "tokens per prompt", flag_values=FLAGS)
flags.DEFINE_integer("new_tokens", 4, "tokens generated per prompt", flag_values=FLAGS)
flags.DEFINE_integer("num_steps", 4, "iterations of the core block per token (r)", flag_values=FLAGS)
flags.DEFINE_integer("batch", 1, "prompts per call", flag_values=FLAGS)
flags.DEFINE_string("cache", "full", "KV cache: full, compress-K, latest, latest-compress-K", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 1, "timed calls after the first one (the best counts)", flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "seed of the random weights (when writing) and of the prompts", flag_values=FLAGS)
flags.DEFINE_string("original", None, "a checkout of github.com/seal-rg/recurrent-pretraining (or its recpre/): "
                    "measure the original PyTorch code too", flag_values=FLAGS)
flags.DEFINE_string("original_python", sys.executable, "the interpreter for the original (torch, transformers "
                    "4.x)", flag_values=FLAGS)
flags.DEFINE_bool("ours", True, "measure this project's side (--noours: only the original's)", flag_values=FLAGS)
flags.DEFINE_string("child", None, "internal: run one measurement of this project's side in this process (a JSON "
                    "spec file)", flag_values=FLAGS)


# ---- the checkpoint -----------------------------------------------------------------------------------------------

def hf_config(shape: str) -> dict:
    """The release's config.json for a shape: what RavenConfig.save_pretrained writes for it (the release names
    torch_dtype bfloat16, padding_multiple 4096 and transformers 4.47.1)."""
    config = config_to_hf(_model_config(shape))
    config.update(padding_multiple=4096, transformers_version=RELEASE_TRANSFORMERS_VERSION)
    return dict(sorted(config.items()))


def _model_config(shape: str) -> ModelConfig:
    hidden, heads, mlp, vocab, context = SHAPES[shape]
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, num_heads=heads, intermediate_size=mlp,
                       num_prelude_layers=LAYERS[0], num_core_layers=LAYERS[1], num_coda_layers=LAYERS[2],
                       max_seq_len=context, param_dtype="bfloat16", dtype="bfloat16")


def tensor_layout(shape: str) -> list[list[tuple[str, tuple[int, ...]]]]:
    """[shard][(name, shape)] in the release's placement (the order of the original's state dict, cut where
    Hugging Face's 5 GB split cuts huginn-0125)."""
    hidden, heads, mlp, vocab, context = SHAPES[shape]
    head_dim = hidden // heads

    def block(prefix):
        shapes = {"attn.Wqkv.weight": (3 * hidden, hidden), "attn.proj.weight": (hidden, hidden),
                  "attn.qk_bias": (2, 1, heads, head_dim), "mlp.fc.weight": (2 * mlp, hidden),
                  "mlp.proj.weight": (hidden, mlp)}
        shapes.update({f"norm_{k}.weight": (hidden,) for k in range(1, 5)})
        return [(f"{prefix}.{name}", shapes[name]) for name in BLOCK_TENSORS]

    prelude = [t for i in range(LAYERS[0]) for t in block(f"transformer.prelude.{i}")]
    core = [block(f"transformer.core_block.{i}") for i in range(LAYERS[1])]
    coda = [t for i in range(LAYERS[2]) for t in block(f"transformer.coda.{i}")]
    return [[("freqs_cis", (1, context, 1, head_dim // 2, 2)), ("transformer.wte.weight", (vocab, hidden)), *prelude,
             ("transformer.adapter.weight", (hidden, 2 * hidden))],
            [t for b in core[:3] for t in b],
            [*core[3], *coda, ("transformer.ln_f.weight", (hidden,))],
            [("lm_head.weight", (vocab, hidden))]]


def checkpoint_bytes(shape: str) -> int:
    return sum(4 * math.prod(s) for shard in tensor_layout(shape) for _, s in shard)


def _header(tensors: list[tuple[str, tuple[int, ...]]]) -> tuple[bytes, list[tuple[str, tuple[int, ...]]]]:
    """The safetensors header as the safetensors library writes it (tensors sorted by name, all float32; compact
    JSON padded with spaces to 8 bytes) and the tensors in data order."""
    ordered = sorted(tensors)
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in ordered:
        size = 4 * math.prod(shape)
        entries[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, ordered


def _values(shape_name: str, name: str, shape: tuple[int, ...], seed: int):
    """The tensor's float32 values, chunk by chunk (at most CHUNK values each): deterministic in (seed, name), and
    lm_head's are the embedding's."""
    hidden = SHAPES[shape_name][0]
    if name == "freqs_cis":
        yield freqs_cis(_model_config(shape_name)).astype(np.float32)
        return
    config = _model_config(shape_name)
    std = math.sqrt(2 / (5 * hidden))
    out_std = std / math.sqrt(2 * config.effective_depth)
    center, scale = 0.0, std
    if name.endswith(("proj.weight",)):
        scale = out_std
    elif "norm" in name or "ln_f" in name:
        center, scale = 1.0, 0.1 / math.sqrt(3)
    key = zlib.crc32(b"transformer.wte.weight" if name == "lm_head.weight" else name.encode())
    total = math.prod(shape)
    for i, start in enumerate(range(0, total, CHUNK)):
        chunk = np.random.default_rng([seed, key, i]).random(min(CHUNK, total - start), dtype=np.float32)
        chunk -= np.float32(0.5)
        chunk *= np.float32(2 * math.sqrt(3) * scale)  # uniform with std `scale`
        if center:
            chunk += np.float32(center)
        yield chunk


def write_shard(path: pathlib.Path, tensors, shape_name: str, seed: int) -> None:
    header, ordered = _header(tensors)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        for name, shape in ordered:
            for chunk in _values(shape_name, name, shape, seed):
                f.write(chunk.tobytes())
    os.replace(tmp, path)


def holds_checkpoint(directory: pathlib.Path) -> bool:
    """Whether `directory` holds a complete checkpoint in the released format (config.json and weights)."""
    if not (directory / CONFIG_FILE).is_file() or (directory / INCOMPLETE).exists():
        return False
    if (directory / INDEX_FILE).is_file():
        files = set(json.loads((directory / INDEX_FILE).read_text())["weight_map"].values())
        return all((directory / f).is_file() for f in files)
    return (directory / "model.safetensors").is_file()


def ensure_checkpoint(directory: pathlib.Path, shape: str, seed: int) -> float | None:
    """Writes a random checkpoint of `shape` into `directory` unless it holds one; returns the seconds it took
    (None: reused).  A directory that holds anything else is refused (ValueError)."""
    if holds_checkpoint(directory):
        return None
    marker = directory / INCOMPLETE
    if marker.exists():
        previous = marker.read_text().strip()
        if previous != shape:
            raise ValueError(f"--dir {directory} holds an interrupted write of a --shape={previous} checkpoint: "
                             f"run again with --shape={previous}, or delete the directory")
    elif directory.exists() and any(directory.iterdir()):
        found = sorted(p.name for p in directory.iterdir())
        raise ValueError(f"--dir {directory} holds no checkpoint (config.json and safetensors) but other files "
                         f"({', '.join(found[:5])}{', ...' if len(found) > 5 else ''}): give a new or empty directory")
    layout, total = tensor_layout(shape), checkpoint_bytes(shape)
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    names = [SHARD_NAME.format(i + 1, SHARDS) for i in range(SHARDS)]
    done = sum((directory / n).stat().st_size for n in names if (directory / n).exists())
    if free + done < total * 1.01:
        raise ValueError(f"--dir {directory}: a {shape} checkpoint needs {total / 1e9:.2f} GB, the disk has "
                         f"{free / 1e9:.2f} GB free")
    print(f"writing a {shape}-shaped checkpoint with random weights (float32, {SHARDS} safetensors shards, "
          f"{total / 1e9:.2f} GB) to {directory}", file=sys.stderr, flush=True)
    marker.write_text(shape)
    start = time.perf_counter()
    for name, tensors in zip(names, layout):
        expected = len(_header(tensors)[0]) + sum(4 * math.prod(s) for _, s in tensors)
        path = directory / name
        if path.exists() and path.stat().st_size == expected:
            continue  # written before an interruption
        write_shard(path, tensors, shape, seed)
        print(f"  {name}: {expected / 1e9:.2f} GB", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total},
             "weight_map": {t: n for n, tensors in zip(names, layout) for t, _ in tensors}}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2, sort_keys=True) + "\n")
    (directory / CONFIG_FILE).write_text(json.dumps(hf_config(shape), indent=2, sort_keys=True) + "\n")
    marker.unlink()
    return time.perf_counter() - start


def stored_shape(directory: pathlib.Path) -> dict:
    c = load_hf_config(directory)
    return {"hidden": c.hidden_size, "heads": c.num_heads, "mlp": c.intermediate_size, "vocab": c.vocab_size,
            "layers": [c.num_prelude_layers, c.num_core_layers, c.num_coda_layers], "context": c.max_seq_len}


def stored_bytes(directory: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


# ---- running a measurement in its own process ---------------------------------------------------------------------

def _status_kib(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    values = {}
    with contextlib.suppress(OSError):
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in fields:
                values[key] = int(rest.split()[0])
    return values


def run_measurement(command: list[str], env: dict | None = None) -> dict:
    """Runs `command` (a child that writes its results as JSON to the file named by its last argument) and returns
    them with its peak memory: ru_maxrss of the child (wait4) and the peak of its RssAnon (sampled)."""
    with tempfile.TemporaryDirectory(prefix="fullsize_") as tmp:
        out = pathlib.Path(tmp) / "result.json"
        proc = subprocess.Popen([*command, str(out)], env=env, stdout=2, cwd=ROOT)  # stdout: the JSON lines only
        peak_anon = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_anon = max(peak_anon, _status_kib(proc.pid, ("RssAnon",)).get("RssAnon", 0))
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        result = json.loads(out.read_text()) if out.exists() else {}
    if proc.returncode != 0 or "error" in result:
        how = (f"killed by signal {-proc.returncode}{' (out of memory?)' if proc.returncode == -9 else ''}"
               if proc.returncode < 0 else f"exit {proc.returncode}")
        raise ValueError(f"{' '.join(command[:2])} failed ({how}): {result.get('error', 'see its output above')}")
    result["peak_rss_gb"] = _gb(usage.ru_maxrss * 1024)
    result["peak_anon_gb"] = _gb(peak_anon * 1024)
    return result


def _child_env(devices: int | None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if devices is not None:
        xla = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
        env["XLA_FLAGS"] = " ".join([*xla, f"--xla_force_host_platform_device_count={devices}"])
    return env


def measure_side(implementation: str, spec: dict, devices: list[int]) -> list[dict]:
    """The rows of one implementation: per device count, each measurement in its own process."""
    rows = []
    for d in devices:
        row = {"devices": d}
        for measure in spec["measure"]:
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump({**spec, "measure": measure, "devices": d}, f)
            try:
                if implementation == "recurrent_depth":
                    command = [sys.executable, str(pathlib.Path(__file__).resolve()), f"--child={f.name}"]
                    env = _child_env(d)
                else:
                    command = [spec["original_python"], str(ORIGINAL_CHILD), f.name]
                    env = _child_env(None)
                print(f"{implementation}: {measure} on {d} device(s)", file=sys.stderr, flush=True)
                row[measure] = run_measurement(command, env)
            finally:
                os.unlink(f.name)
        rows.append(row)
    return rows


def compare(ours: list[dict], original: dict, logits_dir: pathlib.Path) -> list[dict]:
    """Per device count: our peak memory over the original's, and how far our outputs are from the original's."""
    out = []
    for row in ours:
        entry = {"devices": row["devices"]}
        for measure in MEASURES:
            if measure in row and measure in original:
                for key in ("peak_rss_gb", "peak_anon_gb"):
                    if original[measure][key] > 0:
                        ratio = row[measure][key] / original[measure][key]
                        entry[f"{measure}_{key.removesuffix('_gb')}_ratio"] = round(ratio, 2)
        ours_logits = logits_dir / f"recurrent_depth_{row['devices']}.npy"
        theirs_logits = logits_dir / "original_1.npy"
        if ours_logits.exists() and theirs_logits.exists():
            a, b = np.load(ours_logits), np.load(theirs_logits)
            entry["forward_logits_rel_err"] = float(f"{np.linalg.norm(a - b) / np.linalg.norm(b):.3g}")
            entry["forward_argmax_agreement"] = round(float(np.mean(a.argmax(-1) == b.argmax(-1))), 3)
        if "generate" in row and "generate" in original:
            a, b = np.asarray(row["generate"]["tokens"]), np.asarray(original["generate"]["tokens"])
            entry["generate_token_agreement"] = round(float(np.mean(a == b)), 3)
        out.append(entry)
    return out


def original_code_dir(path: str) -> pathlib.Path:
    """The folder holding the original's raven_modeling_minimal.py and raven_config_minimal.py under `path`."""
    for candidate in (pathlib.Path(path), pathlib.Path(path) / "recpre"):
        if all((candidate / f).is_file() for f in ("raven_modeling_minimal.py", "raven_config_minimal.py")):
            return candidate.resolve()
    raise FileNotFoundError(f"--original {path}: no recpre/raven_modeling_minimal.py and raven_config_minimal.py "
                            "(give a checkout of github.com/seal-rg/recurrent-pretraining)")


def _check_original_python(python: str) -> None:
    probe = subprocess.run([python, "-c", "import torch, transformers, numpy; print(transformers.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        raise ImportError(f"--original_python {python} cannot import torch, transformers and numpy "
                          f"({probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else probe.returncode}): "
                          "give an interpreter with torch and 'transformers<5'")
    if not probe.stdout.strip().startswith("4."):
        raise ImportError(f"--original_python {python} has transformers {probe.stdout.strip()}; the original's code "
                          "needs transformers 4.x")


def original_cache(strategy: str) -> str:
    """This project's cache strategy named as the original's cache_lookup_strategy."""
    if strategy in ORIGINAL_CACHE:
        return ORIGINAL_CACHE[strategy]
    for prefix, theirs in (("latest-compress-", "latest-m4-compress-s"), ("compress-", "compress-s")):
        if strategy.startswith(prefix) and strategy[len(prefix):].isdigit():
            return theirs + strategy[len(prefix):]
    raise ValueError(f"--cache={strategy}: expected full, compress-K, latest or latest-compress-K")


# ---- this project's side, in a child process ----------------------------------------------------------------------

def _child(spec: dict) -> dict:
    d = spec["devices"]
    devices = jax.devices()[:d]
    if len(devices) < d:
        raise ValueError(f"--devices: {d} devices asked, {len(jax.devices())} available")
    mesh = sharding.make_mesh((1, d, 1), devices)
    start = time.perf_counter()
    model, params = from_huggingface(spec["dir"], dtype="bfloat16", shardings=param_shardings(mesh))
    params = jax.block_until_ready(params)
    leaves = jax.tree.leaves(params)
    result = {"load_s": round(time.perf_counter() - start, 2), "params_gb": _gb(sum(x.nbytes for x in leaves)),
              "per_device_gb": [_gb(sum(s.data.nbytes for x in leaves for s in x.addressable_shards
                                        if s.device == device)) for device in devices],
              "rss_after_load_gb": _gb(_status_kib(os.getpid(), ("VmRSS",))["VmRSS"] * 1024)}
    ids = np.asarray(spec["prompts"], np.int32)
    batch, prompt_len = ids.shape
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        if spec["measure"] == "forward":
            forward = jax.jit(lambda p, x: model.apply({"params": p}, x, num_steps=spec["num_steps"],
                                                       init_scale=0.0).logits)
            first, best, logits = _timed(lambda: jax.block_until_ready(forward(params, ids)), spec["repeats"])
            np.save(spec["logits_out"], np.asarray(logits, np.float32))
            result.update(first_call_s=round(first, 2), forward_s=round(best, 3),
                          prefill_tokens_per_s=sig(batch * prompt_len / best))
        elif spec["measure"] == "generate":
            stamps = []

            def stream(tokens, num_tokens, steps):  # called on the host after every token
                stamps.append(time.perf_counter())

            def call():
                stamps.clear()
                start = time.perf_counter()
                out = jax.block_until_ready(generate(
                    model, params, ids, max_new_tokens=spec["new_tokens"], num_steps=spec["num_steps"],
                    init_scale=0.0, cache_strategy=spec["cache"], stream=stream))
                return start, time.perf_counter(), list(stamps), np.asarray(out.tokens).tolist()

            result.update(generate_figures(call, spec["repeats"], batch, spec["new_tokens"]))
    stats = [device.memory_stats() or {} for device in devices]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    if peaks:
        result["device_peak_gb"] = _gb(max(peaks))
    return result


def _timed(call, repeats: int):
    """(first call's seconds, best of `repeats` further calls, the last output)."""
    start = time.perf_counter()
    out = call()
    first, times = time.perf_counter() - start, []
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return first, min(times), out


def _gb(nbytes: float) -> float:
    return sig(nbytes / 1e9)


# ---- the command line ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    return app.run(_main, FLAGS, argv, doc=__doc__, prog="bench/fullsize.py")


def _main(positional: list[str]) -> None:
    if FLAGS.child:
        app.positional(positional, "RESULT_FILE")
        spec = json.loads(pathlib.Path(FLAGS.child).read_text())
        try:
            result = _child(spec)
        except Exception as error:  # reported to the parent, which names it
            pathlib.Path(positional[0]).write_text(json.dumps({"error": f"{type(error).__name__}: {error}"}))
            raise
        pathlib.Path(positional[0]).write_text(json.dumps(result))
        return
    app.positional(positional)
    if not FLAGS.dir:
        raise app.UsageError("--dir is required (the checkpoint directory, written if it holds none)")
    for name in ("prompt_len", "new_tokens", "num_steps", "batch", "repeats"):
        if FLAGS[name].value < 1:
            raise app.UsageError(f"--{name} must be positive, got {FLAGS[name].value}")
    try:
        devices = [int(d) for d in FLAGS.devices]
    except ValueError:
        raise app.UsageError(f"--devices must be positive integers, got {FLAGS.devices}") from None
    if not devices or min(devices) < 1:
        raise app.UsageError(f"--devices must be positive integers, got {FLAGS.devices}")
    unknown = sorted(set(FLAGS.measure) - set(MEASURES))
    if unknown or not FLAGS.measure:
        raise app.UsageError(f"--measure takes {', '.join(MEASURES)}, got {FLAGS.measure}")
    measure = [m for m in MEASURES if m in FLAGS.measure]
    try:
        their_cache = original_cache(FLAGS.cache)
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    if not FLAGS.ours and not FLAGS.original:
        raise app.UsageError("--noours measures only the original: give --original")
    code = original_code_dir(FLAGS.original) if FLAGS.original else None
    if code is not None:
        _check_original_python(FLAGS.original_python)
    directory = pathlib.Path(FLAGS.dir).resolve()
    written = ensure_checkpoint(directory, FLAGS.shape, FLAGS.seed)
    shape = stored_shape(directory)
    if FLAGS.prompt_len + FLAGS.new_tokens > shape["context"]:
        raise ValueError(f"--prompt_len + --new_tokens = {FLAGS.prompt_len + FLAGS.new_tokens} exceeds the "
                         f"model's context ({shape['context']})")
    prompts = np.random.default_rng(FLAGS.seed).integers(0, shape["vocab"], (FLAGS.batch, FLAGS.prompt_len))
    header = {"bench": "fullsize", "checkpoint": str(directory),
              "checkpoint_gb": _gb(stored_bytes(directory)),
              "written_s": None if written is None else round(written, 1), "shape": shape, "dtype": "bfloat16",
              "batch": FLAGS.batch, "prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens,
              "num_steps": FLAGS.num_steps, "cache": FLAGS.cache, "init_scale": 0.0, "repeats": FLAGS.repeats,
              "host": {"cpus": os.cpu_count(),
                       "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)}}
    with tempfile.TemporaryDirectory(prefix="fullsize_logits_") as logits_dir:
        spec = {"dir": str(directory), "prompts": prompts.tolist(), "num_steps": FLAGS.num_steps,
                "new_tokens": FLAGS.new_tokens, "repeats": FLAGS.repeats, "measure": measure}
        ours = None
        if FLAGS.ours:
            ours = []
            for d in devices:
                rows = measure_side("recurrent_depth", {**spec, "cache": FLAGS.cache,
                                                        "logits_out": f"{logits_dir}/recurrent_depth_{d}.npy"}, [d])
                ours += rows
            print(json.dumps({**header, "implementation": "recurrent_depth", "rows": ours}), flush=True)
        if code is not None:
            theirs = measure_side("original", {**spec, "cache": their_cache, "original": str(code),
                                               "original_python": FLAGS.original_python,
                                               "logits_out": f"{logits_dir}/original_1.npy"}, [1])
            versions = {}
            for result in theirs[0].values():
                if isinstance(result, dict):
                    versions.update({k: result.pop(k) for k in ("torch", "transformers", "torch_threads")})
            line = {**header, "implementation": "original", "original_code": str(code),
                    "original_python": FLAGS.original_python, **versions, "cache_lookup_strategy": their_cache,
                    "rows": theirs}
            if ours:
                line["vs_recurrent_depth"] = compare(ours, theirs[0], pathlib.Path(logits_dir))
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""bench/serve_bench.py at the tiny shape: three adaptive requests (one setting, so one compilation of `generate`)
through the in-process server at two concurrencies: one JSON line each with the figures, the streamed tokens equal
to sequential `generate`'s.  The bench runs in a subprocess (with XLA's cheapest optimisation, which a running
backend would ignore; and uvicorn configures logging onto the streams it finds, which pytest's capture closes);
bad flags are refused in this process, before any model is built."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import single_cpu_env

ROOT = Path(__file__).parents[2]
BENCH = ROOT / "bench" / "serve_bench.py"


@pytest.fixture(scope="module")
def serve_bench():
    spec = importlib.util.spec_from_file_location("serve_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_lines(tmp_path):
    env = single_cpu_env()  # (with conftest's cheapest XLA optimisation: the figures do not matter here)
    argv = ["--shape=tiny", "--concurrency=1,3", "--min_requests=3", "--requests_per_client=1", "--max_len=16",
            "--prompt_lens=3,8", "--output_lens=4", "--criteria=kl", "--max_steps=3"]
    run = subprocess.run([sys.executable, str(BENCH), *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.strip().splitlines()]
    assert [(line["shape"], line["concurrency"], line["requests"]) for line in lines] == [("tiny", 1, 3),
                                                                                          ("tiny", 3, 3)]
    for line in lines:
        assert line["weights"] == "random" and line["slots"] == 3 and line["output_tokens"] == 12
        for key in ("output_tokens_per_s", "requests_per_s", "generate_tokens_per_s", "speedup", "wall_s"):
            assert line[key] > 0, key
        for kind in ("ttft", "itl"):
            p50, p90, p99 = (line[f"{kind}_p{q}_ms"] for q in (50, 90, 99))
            assert 0 <= p50 <= p90 <= p99, (kind, p50, p90, p99)
        assert 1 <= line["iterations_per_token"] <= 3
        assert line["iterations_per_token"] == line["generate_iterations_per_token"]
        assert line["identical_to_generate"] == 1.0  # greedy: the server's tokens are generate's
        assert line["compiles_after_warm_up"] == 0 and 0 <= line["exited_waiting"] < 1
        assert 0 <= line["mean_busy_slots"] <= line["concurrency"]
    assert "warm_up_s" in lines[0] and "warm_up_s" not in lines[1]


@pytest.mark.parametrize("argv, error", [
    (["--shape=huge"], "unknown ['huge']"),
    (["--criteria=none,bogus"], "unknown ['bogus']"),
    (["--concurrency=0"], "positive"),
    (["--prompt_lens=8,32", "--output_lens=48", "--max_len=64"], "must fit --max_len=64"),
])
def test_bad_flags(serve_bench, capsys, argv, error):
    assert serve_bench.main(argv) == 1
    assert error in capsys.readouterr().err

"""The command-line convention (recurrent_depth.cli.app) and every entry point following it: absl flags in the
tool's own FlagValues, --help, one-line errors, status 0 / 1 (bad input) / 2 (usage), each call from the defaults."""

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from recurrent_depth.cli import app

from helpers import CONFIGS, single_cpu_env

ROOT = Path(__file__).parents[2]
TOOLS = ["aot", "chat", "convert", "corpus", "data", "inspect", "shell_game", "tokenizer"]  # lm_eval: lm-eval's
SCRIPTS = ["train.py", "eval.py", "bench/aot_tpu.py", "bench/generate_bench.py", "bench/parallel_bench.py",
           "bench/profile_summary.py", "bench/train_bench.py"]


def _tool(name):
    return importlib.import_module(f"recurrent_depth.cli.{name}")


def _script(path):
    """A repository script imported as a module (its __main__ block does not run)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem + "_script", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A tool of the test's own, to see the convention in isolation.
FLAGS = flags.FlagValues()
flags.DEFINE_string("name", None, "required name", flag_values=FLAGS)
flags.DEFINE_integer("count", 3, "a count", flag_values=FLAGS)
flags.DEFINE_list("items", ["a"], "a list", flag_values=FLAGS)
flags.DEFINE_bool("loud", False, "a switch", flag_values=FLAGS)
flags.mark_flag_as_required("name", flag_values=FLAGS)
calls = []


def _toy(args):
    """python -m toy --name=NAME [--count=3] [--items=a,b] [--loud] COMMAND"""
    app.positional(args, commands=("go", "fail", "crash"))
    calls.append((FLAGS.name, FLAGS.count, list(FLAGS.items), FLAGS.loud))
    if args[0] == "fail":
        raise FileNotFoundError(f"no such thing as {FLAGS.name}\n(a second line)")
    if args[0] == "crash":
        raise RuntimeError("a bug, not bad input")
    return None


def toy(argv):
    return app.run(_toy, FLAGS, argv, doc=_toy.__doc__, prog="python -m toy")


def test_help_prints_the_docstring_and_the_flags(capsys):
    assert toy(["--help"]) == 0 and toy(["go", "-h"]) == 0 and toy(["--helpfull", "--no_such_flag"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("python -m toy --name=NAME") and "--count: a count" in out and "--[no]loud" in out
    assert not calls  # nothing ran


def test_usage_errors_are_one_line_and_status_2(capsys):
    for argv, message in [(["go", "--name=x", "--colour=red"], "Unknown command line flag 'colour'"),
                          (["go"], "flag --name=None: Flag --name must have a value other than None."),
                          (["go", "--name=x", "--count=many"], "flag --count=many: invalid literal for int()"),
                          (["--name=x"], "missing command (commands: go, fail, crash)"),
                          (["stop", "--name=x"], "unknown command 'stop' (commands: go, fail, crash)"),
                          (["go", "now", "--name=x"], "go takes no positional arguments, got ['now']")]:
        assert toy(argv) == 2, argv
        err = capsys.readouterr().err
        assert err == f"python -m toy: error: {message}\n" or (err.startswith(f"python -m toy: error: {message}")
                                                                and err.count("\n") == 1), (argv, err)
    assert not calls


def test_bad_input_is_one_line_and_status_1_and_bugs_keep_their_traceback(capsys):
    assert toy(["fail", "--name=unicorn"]) == 1
    assert capsys.readouterr().err == "python -m toy: error: no such thing as unicorn (a second line)\n"
    with pytest.raises(RuntimeError, match="a bug"):
        toy(["crash", "--name=x"])
    calls.clear()


def test_each_call_starts_from_the_defaults():
    assert toy(["go", "--name=a", "--count=5", "--items=x,y", "--loud"]) == 0
    assert toy(["--name", "b", "go"]) == 0  # flags after or before the command, `--flag value` too
    assert calls == [("a", 5, ["x", "y"], True), ("b", 3, ["a"], False)]
    calls.clear()


def test_config_flags_take_overrides_and_each_call_loads_anew(capsys):
    values = flags.FlagValues()
    config = config_flags.DEFINE_config_file("config", str(CONFIGS / "tiny.py"), "config file", flag_values=values,
                                             sys_argv=app.ARGV)
    seen = []
    run = lambda argv: app.run(lambda args: seen.append(  # noqa: E731
        (config.value.train.steps, config.value.train.batch_size)), values, argv, doc="d", prog="p")
    tiny = f"--config={CONFIGS / 'tiny.py'}"
    for argv in ([], ["--config.train.steps=7"], [tiny, "--config.train.steps=9", "--config.train.batch_size=3"],
                 [tiny], ["--config.train.batch_size=5"], []):
        assert run(argv) == 0, argv
    default = seen[0]
    assert seen == [default, (7, default[1]), (9, 3), default, (default[0], 5), default]
    assert run(["--config.train.stepz=1"]) == 2 and run([tiny, "--config.train.steps=x"]) == 2
    assert run(["--config=no/such/config.py"]) == 1 and run([]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == """p: error: no such config field: 'stepz' Did you mean "steps" instead of "stepz"?"""
    assert err[1].startswith("p: error: flag --config.train.steps=x: invalid literal for int()")
    assert err[2] == "p: error: --config: [Errno 2] No such file or directory: 'no/such/config.py'" and len(err) == 3


def test_every_entry_point_has_its_own_flags_a_main_and_a_usage_docstring(capsys):
    """All tools import together (no DuplicateFlagError), each with a public FLAGS; --help works for each."""
    modules = {f"recurrent_depth.cli.{name}": _tool(name) for name in TOOLS}
    modules.update({path: _script(path) for path in SCRIPTS})
    assert len({id(m.FLAGS) for m in modules.values()}) == len(modules)
    for where, module in modules.items():
        command = f"python -m {where}" if where.startswith("recurrent_depth") else f"python {where}"
        assert isinstance(module.FLAGS, flags.FlagValues) and command in "\n".join(module.__doc__.splitlines()[:4])
        assert module.main(["--help"]) == 0, where
        out = capsys.readouterr().out
        assert out.startswith(module.__doc__.strip()), where
        assert all(f"--{name}:" in out or f"--[no]{name}:" in out for name in module.FLAGS), where
        assert all("-" not in name for name in module.FLAGS), where  # absl style: underscores
    assert modules["recurrent_depth.cli.shell_game"].FLAGS["size"].default == 20000  # untouched by the others


def test_two_tools_parse_in_one_process(tmp_path, capsys):
    shell_game, convert = _tool("shell_game"), _tool("convert")
    assert shell_game.main(["chat-data", f"--output={tmp_path / 'a.jsonl'}", "--size=3", "--seed=1"]) == 0
    assert convert.main(["to-params", str(tmp_path / "missing"), str(tmp_path / "x"), "--dtype=bfloat16"]) == 1
    assert shell_game.FLAGS.seed == 1 and convert.FLAGS.dtype == "bfloat16"  # each tool its own values
    assert shell_game.main(["chat-data", f"--output={tmp_path / 'b.jsonl'}", "--size=3"]) == 0
    assert shell_game.FLAGS.seed == 0  # the default again
    rows = [(tmp_path / f"{n}.jsonl").read_text().splitlines() for n in "ab"]
    assert len(rows[0]) == len(rows[1]) == 3 and rows[0] != rows[1]
    assert capsys.readouterr().err == (f"python -m recurrent_depth.cli.convert: error: checkpoint "
                                       f"{tmp_path / 'missing'} does not exist\n")


def test_train_py_and_eval_py_usage_errors_in_process(tmp_path, capsys):
    train, evaluate = _script("train.py"), _script("eval.py")
    assert train.main([f"--workdir={tmp_path}", "--config.train.stepz=3"]) == 2
    assert train.main([f"--workdir={tmp_path}", "extra"]) == 2
    assert evaluate.main([f"--output={tmp_path}", "--num_steps=1", "--exit_criterion=fast"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("train.py: error: no such config field: 'stepz'")
    assert err[1] == "train.py: error: takes no positional arguments, got ['extra']"
    assert err[2].startswith("eval.py: error: flag --exit_criterion=fast: value should be one of") and len(err) == 3
    assert not any(tmp_path.iterdir())


def test_exit_status_of_a_tool_run_as_a_program(tmp_path):
    out = tmp_path / "x.jsonl"
    run = lambda *argv: subprocess.run([sys.executable, "-m", "recurrent_depth.cli.shell_game", *argv],  # noqa
                                       capture_output=True, text=True, env=single_cpu_env(), timeout=300)
    usage = run("chat-data", f"--output={out}", "--lengths=5-2")
    assert usage.returncode == 2 and not out.exists()
    assert usage.stderr == ("python -m recurrent_depth.cli.shell_game: error: need 1 <= MIN <= MAX and --size >= 1, "
                            "got '5-2' and 20000\n")
    bad = run("chat-data", f"--output={tmp_path / 'no' / 'dir' / 'x.jsonl'}", "--size=2")
    assert bad.returncode == 1 and "error: [Errno 2] No such file or directory" in bad.stderr
    assert "Traceback" not in bad.stderr
    good = run("chat-data", f"--output={out}", "--size=2", "--lengths=3")
    assert good.returncode == 0 and [len(json.loads(r)["messages"][0]["content"].split())
                                     for r in out.read_text().splitlines()] == [3, 3]

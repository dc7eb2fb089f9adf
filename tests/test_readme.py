"""The README runs as written.

Every fenced ```bash block of README.md is split into commands, and each is checked against the code: a
`python train.py|eval.py|bench/X.py ...` or `python -m recurrent_depth.cli.<tool> ...` names a file or module that
exists, whose `FLAGS` has every flag given, whose subcommand is one it accepts, and whose whole command line parses
(the tool's own parser, without running it); `--config=FILE[:ARG]` names a config file that loads and every
`--config.a.b=...` override a field of it; `pip install -e ".[extras]"` names extras of pyproject.toml.  Other
programs are skipped by name, with the reason; an unknown one fails, so that a new kind of command gets a check.
The cheap commands then run with small overrides in subprocesses (CPU, a temporary working directory), and
`--help` of every tool and script the README names returns 0.  The module paths, file paths, the layout map and the
configuration reference of the README are checked against the tree too.
"""

import ast
import concurrent.futures
import contextlib
import functools
import importlib
import importlib.util
import io
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import ml_collections
import pytest
from absl import flags

from recurrent_depth.cli import app
from recurrent_depth.runtime.config_file import load_config_file
from recurrent_depth.training.config import base_config

from helpers import single_cpu_env

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
TOOLS = "recurrent_depth.cli."
# Programs the check does not look into, and why (anything else unknown fails).
SKIPPED_PROGRAMS = {
    ".": "shell built-in: activates the virtual environment",
    "source": "shell built-in: activates the virtual environment",
    "tensorboard": "TensorBoard's own command line (pip install tensorboard)",
    "git": "git's own command line",
    "cd": "shell built-in",
    "curl": "an HTTP client: the Serving section's requests to a running server",
}
SKIPPED_MODULES = {
    "venv": "the standard library's virtual environments",
    "pytest": "the test runner",
}
# Tools whose flags are another program's, passed through untouched.
PASSTHROUGH_TOOLS = {TOOLS + "lm_eval": "its flags are lm-eval's own argparse flags, passed through untouched"}
RUN_TIMEOUT = 180  # seconds per subprocess; the whole file takes well under a minute on a quiet 2-core machine


class ReadmeCommandError(AssertionError):
    """A README command that does not match the code; the message names the command and what is wrong."""


# ---- reading the README --------------------------------------------------------------------------------------


def fenced_blocks(text: str, language: str) -> list[str]:
    """The contents of every ```<language> block of a markdown text."""
    return re.findall(rf"^```{language}[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.M | re.S)


def split_commands(block: str) -> list[list[str]]:
    """The simple commands of a shell block as argument lists: `\\` continuations joined, comments dropped, split
    on `&&` and `;`, leading VAR=value assignments dropped.  Pipes, redirections and subshells are refused."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in lexer:
            if token in ("&&", ";"):
                commands.append(command)
                command = []
            elif token and set(token) <= set("();<>|&"):
                raise ReadmeCommandError(f"unsupported shell syntax {token!r} in: {line.strip()}")
            else:
                command.append(token)
        commands.append(command)
    for command in commands:
        while command and re.fullmatch(r"[A-Za-z_]\w*=.*", command[0]):  # an environment assignment
            del command[0]
    return [c for c in commands if c]


def readme_commands(text: str | None = None) -> list[list[str]]:
    text = README.read_text() if text is None else text
    return [command for block in fenced_blocks(text, "bash") for command in split_commands(block)]


def section(text: str, title: str) -> str:
    """The body of the `## title` section (up to the next `## `)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


# ---- checking one command ------------------------------------------------------------------------------------


def check_command(argv: list[str]) -> str:
    """What was checked, or `skipped: why`; ReadmeCommandError if the command does not match the code."""
    program = argv[0]
    if Path(program).name in ("python", "python3"):
        return _check_python(argv[1:])
    if program == "pip":
        return _check_pip(argv[1:])
    scripts = _pyproject()["project"].get("scripts", {})
    if program in scripts:
        module = scripts[program].split(":")[0]
        return _check_tool(module, argv[1:])
    if program in SKIPPED_PROGRAMS:
        return f"skipped: {SKIPPED_PROGRAMS[program]}"
    raise ReadmeCommandError(f"unknown program {program!r}: check it in tests/test_readme.py or skip it by name")


def _check_python(args: list[str]) -> str:
    if not args:
        raise ReadmeCommandError("python without a script or module")
    if args[0] == "-m":
        if len(args) < 2:
            raise ReadmeCommandError("python -m without a module")
        module, rest = args[1], args[2:]
        if module in SKIPPED_MODULES:
            return f"skipped: {SKIPPED_MODULES[module]}"
        if module.startswith(TOOLS):
            return _check_tool(module, rest)
        raise ReadmeCommandError(f"python -m {module}: the project's tools are {TOOLS}<tool>")
    if args[0].startswith("-"):
        raise ReadmeCommandError(f"python {args[0]}: not a script or -m module")
    return _check_script(args[0], args[1:])


def _check_tool(module: str, args: list[str]) -> str:
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ReadmeCommandError(f"python -m {module}: no such module")
    if module in PASSTHROUGH_TOOLS:
        return f"module exists; flags skipped: {PASSTHROUGH_TOOLS[module]}"
    return _check_flags(importlib.import_module(module), args, f"python -m {module}")


def _check_script(script: str, args: list[str]) -> str:
    path = ROOT / script
    if not path.is_file():
        raise ReadmeCommandError(f"python {script}: no such file")
    source = path.read_text()
    if re.search(r"^FLAGS = flags\.FlagValues\(\)", source, flags=re.M):
        return _check_flags(_import_script(path), args, f"python {script}")
    if "argparse" in source:
        return _check_argparse(source, args, f"python {script}")
    raise ReadmeCommandError(f"python {script}: neither absl FLAGS nor argparse; its flags cannot be checked")


@functools.cache
def _import_script(path: Path):
    """The script as a module, imported from its file under a name of its own (its __main__ block does not run)."""
    spec = importlib.util.spec_from_file_location(f"readme_{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split_args(flag_values: flags.FlagValues, args: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """([(flag name, value)], positional arguments) of a command line for absl flags (`--name=value`, `--name value`
    for flags that take one, `--name` / `--noname` for booleans, `--` ends the flags)."""
    given, positional, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            positional += args[i + 1:]
            break
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
        else:
            name, eq, value = arg.lstrip("-").partition("=")
            flag = flag_values[name] if name in flag_values else None
            if not eq and flag is not None and not flag.boolean and i + 1 < len(args):
                i += 1
                value, eq = args[i], "="
            given.append((name, value if eq else None))
        i += 1
    return given, positional


def _config_flag(flag_values: flags.FlagValues) -> str | None:
    names = [name for name in flag_values if flag_values[name].flag_type() == "config object"]
    return names[0] if names else None


def _check_flags(module, args: list[str], where: str) -> str:
    flag_values = getattr(module, "FLAGS", None)
    if not isinstance(flag_values, flags.FlagValues):
        raise ReadmeCommandError(f"{where}: the module has no absl FLAGS (flags.FlagValues)")
    given, positional = _split_args(flag_values, args)
    config_name = _config_flag(flag_values)
    overrides, config_spec = [], None
    for name, value in given:
        root = name.split(".")[0]
        if "." in name and root != name and root in flag_values:
            if root != config_name:
                raise ReadmeCommandError(f"{where}: config overrides --{name}, but --{root} is not a config flag")
            overrides.append(name.split(".", 1)[1])
        elif name in flag_values:
            if name == config_name:
                config_spec = value
        elif name.startswith("no") and name[2:] in flag_values and flag_values[name[2:]].boolean:
            pass
        else:
            raise ReadmeCommandError(f"{where}: no flag --{name}")
    checked = [f"{len(given)} flag(s)"]
    if config_name is not None:
        checked.append(_check_config(config_spec or flag_values[config_name].default_unparsed or
                                     flag_values[config_name].default, overrides, where))
    _check_positional(module, positional, where)
    # The tool's own parser on the whole command line (values too), without running the tool.
    stderr = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stderr(stderr):
        status = app.run(lambda positional: 0, flag_values, args, doc="", prog=where)
    if status != 0:
        raise ReadmeCommandError(f"{where}: its parser rejects the command line (status {status}): "
                                 f"{stderr.getvalue().strip()}")
    return ", ".join(checked)


def _check_config(spec: str, overrides: list[str], where: str) -> str:
    """The config file exists and loads (else, if loading needs files the README cannot have, the fields are
    checked against base_config()), and every override names one of its fields."""
    file, _, arg = str(spec).partition(":")
    path = Path(file) if Path(file).is_absolute() else ROOT / file
    if not path.is_file():
        raise ReadmeCommandError(f"{where}: --config={spec}: no config file {file}")
    try:
        config, what = load_config_file(path, arg or None), path.name
    except (OSError, ValueError) as err:  # a spec that needs files (a checkpoint): its fields are base_config()'s
        config, what = base_config(), f"base_config() (loading {path.name} needs files: {err})"
    for override in overrides:
        if not _has_field(config, override):
            raise ReadmeCommandError(f"{where}: --config.{override}: {what} has no field {override}")
    return f"config {what} with {len(overrides)} override(s)"


def _has_field(config, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def _positional_rules(module) -> tuple[list[str], tuple[str, ...]]:
    """(argument names, subcommands) of the module's `app.positional(args, *names, commands=...)` call (none
    allowed if it makes no such call)."""
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "positional"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "app"):
            names = [ast.literal_eval(a) for a in node.args[1:]]
            commands = ()
            for keyword in node.keywords:
                if keyword.arg == "commands":
                    value = keyword.value
                    commands = (getattr(module, value.id) if isinstance(value, ast.Name)
                                else ast.literal_eval(value))
            return names, tuple(commands)
    return [], ()


def _check_positional(module, positional: list[str], where: str) -> None:
    names, commands = _positional_rules(module)
    try:
        app.positional(positional, *names, commands=commands)
    except app.UsageError as err:
        raise ReadmeCommandError(f"{where}: {err}") from None


def _check_argparse(source: str, args: list[str], where: str) -> str:
    """Flags of a script that keeps argparse, read from its add_argument calls (it may need another interpreter,
    so it is not imported)."""
    options, switches = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("-")]
            options.update(names)
            action = next((k.value for k in node.keywords if k.arg == "action"), None)
            if isinstance(action, ast.Constant) and action.value in ("store_true", "store_false"):
                switches.update(names)
    options.update(("-h", "--help"))
    i = 0
    while i < len(args):
        name, eq, _ = args[i].partition("=")
        if name.startswith("-"):
            if name not in options:
                raise ReadmeCommandError(f"{where}: no option {name} (argparse options: {sorted(options)})")
            if not eq and name not in switches:
                i += 1  # its value
        i += 1
    return f"argparse options of the source ({len(options)})"


def _check_pip(args: list[str]) -> str:
    if not args or args[0] != "install":
        raise ReadmeCommandError(f"pip {' '.join(args)}: only `pip install` is checked")
    extras = _pyproject()["project"].get("optional-dependencies", {})
    targets = [a for a in args[1:] if not a.startswith("-")]
    checked = []
    for target in targets:
        match = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", target)
        if match is None:
            checked.append(f"{target} skipped (a third-party package)")
            continue
        for extra in filter(None, (match.group(1) or "").split(",")):
            if extra not in extras:
                raise ReadmeCommandError(f"pip install {target}: pyproject.toml has no extra {extra!r} "
                                         f"(extras: {sorted(extras)})")
        checked.append(f"{target}: the project" + (f" with extras {match.group(1)}" if match.group(1) else ""))
    return "; ".join(checked) or "nothing to install"


@functools.cache
def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---- the tests -------------------------------------------------------------------------------------------------

COMMANDS = readme_commands()


def test_readme_has_commands():
    assert len(COMMANDS) >= 20, COMMANDS
    for expected in ("python train.py", "python eval.py", "python -m recurrent_depth.cli."):
        assert any(" ".join(c).startswith(expected) for c in COMMANDS), expected


def inline_commands(text: str) -> list[list[str]]:
    """The commands written inline, `python ...` in backticks (possibly across a line break), with the brackets of
    optional parts dropped; templates such as `python -m recurrent_depth.cli.<tool>` left out."""
    spans = re.findall(r"`(python3? [^`]+)`", text)
    return [shlex.split(span.replace("[", " ").replace("]", " ")) for span in spans if "<tool>" not in span]


INLINE_COMMANDS = inline_commands(README.read_text())


def test_shell_commands_are_in_bash_blocks():
    """Shell commands are fenced as ```bash (the other fences: python and a diagram), so that none escapes the check."""
    languages = set(re.findall(r"^```(\w*)[ \t]*\n.*?^```[ \t]*$", README.read_text(), flags=re.M | re.S))
    assert languages <= {"bash", "python", ""}, languages
    assert len(INLINE_COMMANDS) >= 10


@pytest.mark.parametrize("command", INLINE_COMMANDS, ids=[" ".join(c)[:80] for c in INLINE_COMMANDS])
def test_inline_command_matches_the_code(command):
    print(" ".join(command), "->", check_command(command))


def test_ci_command_is_unchanged():
    """The README's test line is what CI runs."""
    assert ('python3 -m venv .venv && . .venv/bin/activate && pip install -q -e ".[dev,tpu,eval]" && '
            "python -m pytest -x -q") in README.read_text()


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c)[:80] for c in COMMANDS])
def test_readme_command_matches_the_code(command):
    print(" ".join(command), "->", check_command(command))


@pytest.mark.parametrize("command, error", [
    ("python train.py --config=configs/tiny.py --no_such_flag=1", "no flag --no_such_flag"),
    ("python train.py --config=configs/tiny.py --config.train.no_such_field=3", "has no field train.no_such_field"),
    ("python train.py --config=configs/no_such_config.py", "no config file"),
    ("python train.py --config=configs/sft_huginn.py:ckpt,data.jsonl --config.train.stepz=1", "has no field"),
    ("python eval.py --checkpoint=runs/x --config.eval.tasks=a", "not a config flag"),
    ("python eval.py --checkpoint=runs/x --num_steps", "rejects the command line"),
    ("python -m recurrent_depth.cli.no_such_tool --help", "no such module"),
    ("python -m recurrent_depth.no_such_module", "tools are"),
    ("python -m recurrent_depth.cli.convert to-safetensors a b", "unknown command"),
    ("python -m recurrent_depth.cli.convert to-hf a", "SRC OUT"),
    ("python -m recurrent_depth.cli.corpus stdlib --output=x --max-files=3", "no flag --max-files"),
    ("python -m recurrent_depth.cli.inspect --checkpoint=x --nobos --nonsense", "no flag --nonsense"),
    ("python bench/no_such_bench.py", "no such file"),
    ("python bench/parallel_bench.py --work_dir=runs/text_small", "no flag --work_dir"),
    ("python bench/original_train_bench.py --original_dir=x", "no option --original_dir"),
    ('pip install -e ".[dev,no_such_extra]"', "no extra 'no_such_extra'"),
    ("wget https://example.com/huginn-0125", "unknown program"),
    ("python train.py | tee log", "unsupported shell syntax"),
])
def test_checker_rejects_bad_commands(command, error):
    """The check fails on a command with a nonexistent flag, module, file, config field, subcommand or extra."""
    with pytest.raises(ReadmeCommandError, match=re.escape(error)):
        for argv in readme_commands(f"```bash\n{command}\n```\n"):
            check_command(argv)


def test_checker_reads_shell_syntax():
    block = ('# a comment\nFOO=1 python train.py \\\n    --config=configs/tiny.py   # trailing\n'
             'python -m recurrent_depth.cli.chat --system="a b; c" && pip install -e . ; git status\n')
    assert split_commands(block) == [["python", "train.py", "--config=configs/tiny.py"],
                                     ["python", "-m", "recurrent_depth.cli.chat", "--system=a b; c"],
                                     ["pip", "install", "-e", "."], ["git", "status"]]


def _resolve(dotted: str) -> bool:
    """Whether `a.b.c` is an importable module or an attribute of one."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_module_paths_and_files_exist():
    """Every `recurrent_depth.x.y` the README names resolves, every name its Python examples import exists, and
    every file or folder of the repository it names is there."""
    text = README.read_text()
    dotted = set(re.findall(r"`(recurrent_depth(?:\.\w+)+)", text))
    for block in fenced_blocks(text, "python"):
        for module, names in re.findall(r"^from (recurrent_depth[\w.]*) import (.+)$", block, flags=re.M):
            dotted.update(f"{module}.{name.strip()}" for name in names.split(","))
    missing = sorted(name for name in dotted if not _resolve(name))
    assert not missing, f"README names modules or attributes that do not exist: {missing}"
    paths = set(re.findall(r"(?<![\w/.<-])((?:recurrent_depth|tests|configs|bench|examples|docs)/[\w./-]*\w/?)", text))
    absent = sorted(p for p in paths if not (ROOT / p).exists())
    assert not absent, f"README names files that do not exist: {absent}"
    assert len(dotted) > 10 and len(paths) > 20


def test_layout_map_matches_the_tree():
    """One row per subpackage (and top-level module) of the Layout table, and every module it names in brackets
    exists in its package."""
    rows = re.findall(r"^\| `([\w./]+)` \| (.*) \|$", section(README.read_text(), "Layout"), flags=re.M)
    package = ROOT / "recurrent_depth"
    listed = {name for name, _ in rows}
    tree = ({f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").exists()} |
            {p.name for p in package.glob("*.py") if p.name != "__init__.py"} | {"recurrent_depth"})
    assert listed == tree, f"Layout table {sorted(listed)} != tree {sorted(tree)}"
    for name, text in rows:
        if not name.endswith("/"):
            continue
        for group in re.findall(r"\(([^()]*)\)", text):
            modules = re.findall(r"`(\w+)`", group)
            if modules and not re.sub(r"`\w+`|,|and| ", "", group):
                absent = [m for m in modules if not (package / name / f"{m}.py").exists()]
                assert not absent, f"Layout: {name} has no module(s) {absent}"


def _leaves(config: ml_collections.ConfigDict, prefix: str = ""):
    for key in config:
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict) and key != "model":
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_configuration_reference_lists_every_field():
    """Every field of base_config() appears in the configuration reference (`section.field`; the model's by name),
    and every config file in configs/ is listed."""
    reference = section(README.read_text(), "Configuration reference")
    named = set(re.findall(r"`([\w./]+)`", reference))
    config = base_config()
    missing = [f for f in _leaves(config) if f != "model" and f not in named]
    missing += [f"model.{f}" for f in config.model if f not in named]
    missing += [f"configs/{p.name}" for p in (ROOT / "configs").glob("*.py") if f"configs/{p.name}" not in named]
    assert not missing, f"the configuration reference omits {missing}"


# ---- running the cheap commands --------------------------------------------------------------------------------


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=single_cpu_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT)


def _python_argv(command: list[str]) -> list[str]:
    """The README command with this interpreter; scripts by their path in the repository."""
    args = command[1:]
    return [sys.executable, *(args if args[0] == "-m" else [str(ROOT / args[0]), *args[1:]])]


# Runs each entry point's __main__ with --help in one process (jax imports once, not once per tool: a minute less
# on two cores) and prints {entry: [exit status, characters printed]}.  GLIBC_TUNABLES names the huge-pages tunable,
# so that no entry point re-executes the process (runtime.host_memory).
HELP_RUNNER = """
import contextlib, io, json, runpy, sys
status = {}
for entry in sys.argv[1:]:
    sys.argv = [entry, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            if entry.endswith(".py"):
                runpy.run_path(entry, run_name="__main__")
            else:
                runpy.run_module(entry, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    status[entry] = [code, len(out.getvalue().strip())]
print(json.dumps(status))
"""


def test_every_tool_and_script_helps(tmp_path):
    """`--help` of every tool and script the README names exits with status 0 and prints the help."""
    entry_points = set()
    for command in COMMANDS:
        if Path(command[0]).name in ("python", "python3") and len(command) > 1:
            if command[1].endswith(".py"):
                entry_points.add(str(ROOT / command[1]))
            elif command[1] == "-m" and len(command) > 2 and command[2].startswith(TOOLS):
                entry_points.add(command[2])
    assert {str(ROOT / "train.py"), str(ROOT / "eval.py"), TOOLS + "chat", TOOLS + "aot"} <= entry_points
    env = dict(single_cpu_env(), GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    run = subprocess.run([sys.executable, "-c", HELP_RUNNER, *sorted(entry_points)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert run.returncode == 0, run.stderr[-3000:]
    status = json.loads(run.stdout.strip().splitlines()[-1])
    failed = {entry: code for entry, (code, printed) in status.items() if code != 0 or not printed}
    assert set(status) == entry_points and not failed, f"--help failed (status, characters printed): {failed}"


def _readme_command(prefix: str) -> list[str]:
    found = [c for c in COMMANDS if " ".join(c).startswith(prefix)]
    assert found, f"README has no command starting with {prefix!r}"
    return found[0]


def _with(command: list[str], **values) -> list[str]:
    """The command with these flags set (replaced where it gives them, else added)."""
    names = {f"--{name}" for name in values}
    kept = [a for a in command if a.split("=")[0] not in names]
    return kept + [f"--{name}={value}" for name, value in values.items()]


def test_cheap_commands_run(tmp_path):
    """The README's data commands, as written but smaller, in a fresh working directory: the shell game's chat
    data, the standard-library corpus, a tokenizer of two text files and a row store."""
    shell = _with(_readme_command("python -m recurrent_depth.cli.shell_game chat-data"), size=20)
    corpus = _with(_readme_command("python -m recurrent_depth.cli.corpus stdlib"), max_files=12)
    for name in ("a.txt", "b.txt"):  # what `--input=a.txt,b.txt` reads
        (tmp_path / name).write_text("".join(Path(m.__file__).read_text() for m in (json, shlex if name == "a.txt"
                                                                                   else ast)))
    tokenizer = _with(_readme_command("python -m recurrent_depth.cli.tokenizer train"), vocab_size=600)
    prepare = _with(_readme_command("python -m recurrent_depth.cli.data prepare"), input="corpus/*/*.jsonl",
                    shards=2)

    def chain():  # the corpus, then a tokenizer, then shards written with that tokenizer
        return [_run(_python_argv(c), tmp_path) for c in (corpus, tokenizer, prepare)]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        shell_run = pool.submit(_run, _python_argv(shell), tmp_path)
        runs = [shell_run.result(), *pool.submit(chain).result()]
    for command, run in zip((shell, corpus, tokenizer, prepare), runs):
        assert run.returncode == 0, f"{' '.join(command)}: status {run.returncode}\n{run.stderr[-2000:]}"
    output = dict(a.split("=", 1) for a in shell if "=" in a)["--output"]
    rows = [json.loads(line) for line in (tmp_path / output).read_text().splitlines()]
    assert len(rows) == 20 and all("messages" in r or "question" in r for r in rows)
    corpus_dir = tmp_path / dict(a.split("=", 1) for a in corpus if "=" in a)["--output"]
    assert {"train.jsonl", "valid.jsonl", "tokenizer.model"} <= {p.name for p in corpus_dir.iterdir()}
    assert (tmp_path / "tok.model").exists()
    store = tmp_path / dict(a.split("=", 1) for a in prepare if "=" in a)["--output"]
    assert len(list(store.glob("*.arrayrecord"))) == 2 and (store / "index.json").exists()

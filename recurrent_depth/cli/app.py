"""The command-line convention of every entry point (the tools here, train.py, eval.py, bench/*.py):

  python -m recurrent_depth.cli.<tool> [SUBCOMMAND ARGS...] --name=value ... | --help

absl flags declared in the tool's own `FLAGS = flags.FlagValues()` (so that tools import together), names with
underscores, lists comma-separated, booleans `--name`/`--noname`; subcommands and paths positional.  Exit status:
0 success, 1 bad input (FileNotFoundError, ValueError, ImportError: one line `PROG: error: MESSAGE`, no
traceback), 2 usage errors (unknown flag, bad or missing flag value, bad positional arguments).  An ml_collections
config flag is defined with `config_flags.DEFINE_config_file(..., flag_values=FLAGS, sys_argv=app.ARGV)`.  Stdlib
and absl only: train.py imports it before it turns on huge pages, ahead of jax.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import app as absl_app
from absl import flags

UsageError = absl_app.UsageError  # from a tool's main: bad positional arguments (status 2)
BAD_INPUT = (FileNotFoundError, ValueError, ImportError)  # status 1; ConfigError, CheckpointError... are ValueErrors
HELP = ("-h", "--help", "--helpfull", "--helpshort")
ARGV: list[str] = []  # the command line being parsed, program name first: where config flags find overrides


def run(main: Callable[[list[str]], int | None], flag_values: flags.FlagValues, argv: Sequence[str] | None = None,
        *, doc: str, prog: str) -> int:
    """Parses `argv` (default: sys.argv[1:]) into `flag_values` from their defaults, then returns main(the
    positional arguments), None counting as 0.  --help prints `doc` and the flags; errors are one line on stderr,
    named by `prog` (`python -m recurrent_depth.cli.<tool>`, or the script)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(arg in HELP for arg in argv[:argv.index("--") if "--" in argv else None]):
        lines = flag_values.get_help(include_special_flags=False).splitlines()  # by module: drop their names
        print(doc.strip(), "", "flags:", *(line for line in lines if line.startswith(" ")), sep="\n")
        return 0
    try:
        args = _parse(flag_values, [prog, *argv])[1:]
    except flags.Error as err:  # unknown flag, bad value, a required or mutually-exclusive validator
        return _error(prog, err, 2)
    except FileNotFoundError as err:  # a config file
        return _error(prog, err, 1)
    try:
        status = main(args)
    except UsageError as err:
        return _error(prog, err, 2)
    except BAD_INPUT as err:
        return _error(prog, err, 1)
    return 0 if status is None else status


def _parse(flag_values: flags.FlagValues, argv: list[str]) -> list[str]:
    """flag_values(argv) from the defaults, so that in-process calls (tests) do not see earlier ones.
    ml_collections' config flags (`--config=FILE --config.field=value`), defined with `sys_argv=app.ARGV`, find
    their overrides in ARGV (else in sys.argv: already at import, and the same in every in-process call), and
    define a flag per override when they load a file, changing that config in place: so the override flags of an
    earlier call go and the default file loads anew."""
    ARGV[:] = argv
    try:
        return _parse_from_defaults(flag_values, argv)
    finally:
        ARGV.clear()  # config flags defined later (imports) see no command line


def _parse_from_defaults(flag_values: flags.FlagValues, argv: list[str]) -> list[str]:
    flag_values.unparse_flags()
    for name in [name for name in flag_values if "." in name]:  # only config overrides have dotted names
        delattr(flag_values, name)
    configs = [name for name in flag_values if flag_values[name].flag_type() == "config object"]
    try:
        for name in configs:  # the default file's name: as given, or kept aside when the flag loaded it
            flag = flag_values[name]
            flag_values.set_default(name, flag.default if isinstance(flag.default, str) else flag.default_unparsed)
        args = flag_values(argv)
    except (AttributeError, KeyError) as err:  # ml_collections: an override of a field the config does not have
        if not configs:
            raise
        while err.args and isinstance(err.args[0], Exception):  # its KeyError, wrapped
            err = err.args[0]
        raise flags.IllegalFlagValueError(f"no such config field: {err.args[0] if err.args else err}") from None
    for name in configs:
        try:
            hasattr(flag_values[name].value, "keys")  # a config file that failed to load raises on first use
        except OSError as err:
            raise FileNotFoundError(f"--{name}: {str(err).strip().splitlines()[-1].strip()}") from None
    return args


def _error(prog: str, err: Exception, status: int) -> int:
    text = str(err) or type(err).__name__
    if "Traceback (most recent call last)" in text:  # ml_collections wraps config-file errors with one
        lines = text.strip().splitlines()
        text = f"{lines[0]} {lines[-1]}"
    print(f"{prog}: error: {' '.join(text.split())}", file=sys.stderr)
    return status


def positional(args: Sequence[str], *names: str, commands: Sequence[str] = ()) -> list[str]:
    """`args` if they are a subcommand (one of `commands`, where given) followed by one argument per name;
    UsageError otherwise."""
    if commands and (not args or args[0] not in commands):
        what = f"unknown command {args[0]!r}" if args else "missing command"
        raise UsageError(f"{what} (commands: {', '.join(commands)})")
    rest = args[1:] if commands else args
    if len(rest) != len(names):
        where = f"{args[0]} takes" if commands else "takes"
        raise UsageError(f"{where} {' '.join(names) or 'no positional arguments'}, got {list(rest)}")
    return list(args)

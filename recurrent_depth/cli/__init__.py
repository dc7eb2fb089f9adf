"""The command-line tools, one module each: `python -m recurrent_depth.cli.<tool> --help`."""

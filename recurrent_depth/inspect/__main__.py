"""`python -m recurrent_depth.inspect --help` (see recurrent_depth/inspect/cli.py)."""

from recurrent_depth.inspect.cli import main

if __name__ == "__main__":
    main()

"""Evaluation entry point: `python eval.py --checkpoint=DIR`.

Only checkpoint loading is wired so far; recurrence sweeps arrive with the evaluation issue.
"""

import sys

from absl import app, flags

from recurrent_depth.checkpoint import load_model

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Parameter checkpoint or Hugging Face checkpoint directory.",
                                  required=True)


def main(argv):
    del argv
    model, _ = load_model(_CHECKPOINT.value)
    print(model.config)
    sys.exit("eval.py: evaluation is not implemented yet (see the evaluation issue).")


if __name__ == "__main__":
    app.run(main)

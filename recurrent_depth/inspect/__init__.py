"""Looking inside the recurrence: per-iteration decoding, convergence and latent trajectories (see README).

  python -m recurrent_depth.inspect --checkpoint=DIR --prompt="..." --num_steps=32 --output=DIR
"""

from recurrent_depth.inspect.decode import IterationDecoding, decode_iterations, pca, relative_change

__all__ = ["IterationDecoding", "decode_iterations", "pca", "relative_change"]

"""Looking inside the recurrence: per-iteration decoding, convergence and latent trajectories (see README);
`python -m recurrent_depth.cli.inspect` draws them for a checkpoint and a prompt."""

from etils import epy

with epy.lazy_api_imports(globals()):
    from recurrent_depth.inspect.decode import IterationDecoding, decode_iterations, pca, relative_change
    from recurrent_depth.inspect.report import inspect_tokens

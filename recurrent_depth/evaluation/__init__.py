"""Evaluation across test-time iteration counts (the paper's central figure): `evaluate_checkpoint` is what
eval.py runs, `EvalModel` scores and generates on a mesh, tasks are parsed from `KIND:TARGET[:KEY=VALUE...]`."""

from etils import epy

with epy.lazy_api_imports(globals()):
    from recurrent_depth.evaluation.engine import Depth, EvalModel
    from recurrent_depth.evaluation.runner import evaluate_checkpoint, load_eval_model, sweep
    from recurrent_depth.evaluation.tasks import Task, parse_task, parse_tasks

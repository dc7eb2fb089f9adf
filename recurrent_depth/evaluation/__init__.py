"""Evaluation of recurrent-depth models across test-time iteration counts (the paper's central figure).

`evaluate_checkpoint` is what eval.py runs; `EvalModel` scores and generates on a mesh; tasks live in `tasks`.
"""

from recurrent_depth.evaluation.answers import exact_match, extract_flexible, extract_strict
from recurrent_depth.evaluation.engine import Depth, EvalModel, Generations, Scores
from recurrent_depth.evaluation.records import TaskFileError
from recurrent_depth.evaluation.runner import evaluate_checkpoint, load_eval_model, sweep
from recurrent_depth.evaluation.tasks import (GenerativeTask, MultipleChoiceTask, PerplexityTask, ReasoningGymTask,
                                              ShellGameTask, Task, TaskResult, parse_task, parse_tasks)

__all__ = ["Depth", "EvalModel", "GenerativeTask", "Generations", "MultipleChoiceTask", "PerplexityTask",
           "ReasoningGymTask", "Scores", "ShellGameTask", "Task", "TaskFileError", "TaskResult", "evaluate_checkpoint",
           "exact_match", "extract_flexible", "extract_strict", "load_eval_model", "parse_task", "parse_tasks",
           "sweep"]

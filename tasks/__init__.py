"""GLUE tasks: data and metrics. Knows nothing of gates, Ray or MLflow."""
from tasks._errors import TaskError
from tasks.data import (DATA_DIR_ENV, EVAL_PARTS, TaskData, check_split_size, check_task_data, eval_labels, load_split,
                        load_task_data, resolve_data_dir, split_eval)
from tasks.glue import GLUE, TASKS, TaskSpec, get_task, parse_tasks
from tasks.metrics import compute_metrics, trivial_predictions, trivial_score

__all__ = ["DATA_DIR_ENV", "EVAL_PARTS", "GLUE", "TASKS", "TaskData", "TaskError", "TaskSpec", "check_split_size",
           "check_task_data", "compute_metrics", "eval_labels", "get_task", "load_split", "load_task_data", "parse_tasks",
           "resolve_data_dir", "split_eval", "trivial_predictions", "trivial_score"]

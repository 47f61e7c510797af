"""GLUE tasks: data and metrics. Knows nothing of gates, Ray or MLflow."""
from tasks._errors import TaskError
from tasks.data import DATA_DIR_ENV, TaskData, check_task_data, load_split, load_task_data, resolve_data_dir
from tasks.glue import GLUE, TASKS, TaskSpec, get_task, parse_tasks
from tasks.metrics import compute_metrics, trivial_predictions, trivial_score

__all__ = ["DATA_DIR_ENV", "GLUE", "TASKS", "TaskData", "TaskError", "TaskSpec", "check_task_data", "compute_metrics",
           "get_task", "load_split", "load_task_data", "parse_tasks", "resolve_data_dir", "trivial_predictions",
           "trivial_score"]

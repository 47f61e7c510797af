class TaskError(ValueError):
    """A user-facing problem with a task name, a data directory or a split. The message is one line."""

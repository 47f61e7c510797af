"""Errors shared by the package (no imports: every module may use them)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration value. The message is one line naming the value and what is accepted."""

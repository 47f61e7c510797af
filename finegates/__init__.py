"""FineGates: finetune a frozen transformer with stochastic row/column gates and export it smaller.

The method as a library; knows nothing of Ray or MLflow.
"""
from finegates.config import ConfigError, TrainConfig
from finegates.export import CheckpointError, build_compressed, export_gated_model, load_compressed, save_compressed
from finegates.gated_model import (apply_gates, count_parameters, expected_sparsity, gate_sparsity, penalty_code,
                                   penalty_paper)
from finegates.gates import Gate, GatedLinear
from finegates.methods import METHOD_NAMES, Method, get_method

__all__ = ["CheckpointError", "ConfigError", "Gate", "GatedLinear", "METHOD_NAMES", "Method", "TrainConfig",
           "apply_gates", "build_compressed", "count_parameters", "expected_sparsity", "export_gated_model",
           "gate_sparsity", "get_method", "load_compressed", "penalty_code", "penalty_paper", "save_compressed"]

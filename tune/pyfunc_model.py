"""MLflow pyfunc wrapper of an exported FineGates checkpoint ("models from code": no pickle).

Logged by :func:`tune.tracking.log_exported_model`; loaded by ``mlflow.pyfunc.load_model(uri)``.
``predict`` takes a DataFrame with a ``text`` column (and ``text_pair`` for sentence-pair tasks) and
returns ``label`` and ``score`` columns (for regression: the predicted value). It tokenises exactly as
the trial trained and was scored: truncation to the trial's ``max_length``, read from the checkpoint's
``finegates.json`` (written by ``finegates.train.run``; 128, the training default, when absent).
"""
from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


DEFAULT_MAX_LENGTH = 128  # finegates.config.TrainConfig.max_length (this file imports only mlflow + pandas)


def trained_max_length(path: str) -> int:
    """The max_length the checkpoint's run tokenised with (``finegates.json`` -> config.max_length)."""
    import json
    import os

    try:
        with open(os.path.join(path, "finegates.json")) as f:
            return int(json.load(f)["config"]["max_length"])
    except (OSError, KeyError, TypeError, ValueError):
        return DEFAULT_MAX_LENGTH


class FineGatesClassifier(PythonModel):
    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = context.artifacts["checkpoint"]
        self.max_length = trained_max_length(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True).eval()
        self.torch = torch

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        df = pd.DataFrame(model_input)
        texts = df["text"].astype(str).tolist()
        pairs = df["text_pair"].astype(str).tolist() if "text_pair" in df.columns else None
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        with self.torch.no_grad():
            logits = self.model(**enc).logits.float()
        if logits.shape[-1] == 1:
            return pd.DataFrame({"label": ["score"] * len(texts), "score": logits[:, 0].tolist()})
        probs = logits.softmax(-1)
        conf, idx = probs.max(-1)
        id2label = self.model.config.id2label
        return pd.DataFrame({"label": [id2label[int(i)] for i in idx], "score": conf.tolist()})


mlflow.models.set_model(FineGatesClassifier())

"""Task metrics from predictions and labels (scikit-learn and scipy do the arithmetic)."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "matthews": True, "pearson": True, "spearman": True,
                    "loss": False, "perplexity": False}


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, F1 (binary for two classes, else macro) and Matthews correlation."""
    preds = logits.argmax(axis=-1)
    average = "binary" if logits.shape[-1] == 2 else "macro"
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "f1": float(f1_score(labels, preds, average=average, zero_division=0)),
        "matthews": float(matthews_corrcoef(labels, preds)),
    }


def regression_metrics(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation; 0 when predictions are constant (undefined correlation)."""
    predictions = predictions.reshape(-1)
    if np.allclose(predictions, predictions[0]):
        return {"pearson": 0.0, "spearman": 0.0}
    return {
        "pearson": float(stats.pearsonr(predictions, labels)[0]),
        "spearman": float(stats.spearmanr(predictions, labels)[0]),
    }


def language_model_metrics(mean_token_loss: float) -> dict[str, float]:
    """Validation loss (mean negative log-likelihood per response token) and perplexity = exp(loss)."""
    if math.isnan(mean_token_loss):
        return {"loss": math.nan, "perplexity": math.nan}
    perplexity = math.exp(mean_token_loss) if mean_token_loss < 700 else math.inf
    return {"loss": mean_token_loss, "perplexity": perplexity}


def compute(task_type: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if task_type == "regression":
        return regression_metrics(outputs, labels)
    return classification_metrics(outputs, labels)

"""rankopt: adaptive-rank LoRA fine-tuning, tuned by Optuna, tracked in MLflow, exported for PEFT.

Public names are imported on first use, so ``rankopt --help`` does not pay for torch.
"""

from importlib import import_module

__all__ = ["Callback", "Config", "MemoryPlan", "RankControllerCallback", "RankEvent", "RankoptError", "TrainResult",
           "adapt", "export", "load_config", "plan", "report", "save_adapter", "train", "tune"]
__version__ = "0.1.0"

_HOME = {
    "train": "rankopt.api",
    "plan": "rankopt.api",
    "MemoryPlan": "rankopt.training.memory_plan",
    "tune": "rankopt.search.tuner",
    "export": "rankopt.outputs.export",
    "report": "rankopt.outputs.report",
    "adapt": "rankopt.adapters.model",
    "save_adapter": "rankopt.adapters.peft_format",
    "RankControllerCallback": "rankopt.training.hf_callback",
    "Config": "rankopt.config",
    "load_config": "rankopt.config",
    "RankoptError": "rankopt.errors",
    "Callback": "rankopt.training.events",
    "RankEvent": "rankopt.training.events",
    "TrainResult": "rankopt.training.events",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(_HOME[name]), name)
    raise AttributeError(f"module 'rankopt' has no attribute {name!r}")

"""The variable-rank SVD adapter and everything that is about its tensors.

:mod:`.layer` is one adapted ``nn.Linear`` (forward, prune, grow, merge), :mod:`.model` injects
layers into a transformers model and freezes the rest, :mod:`.peft_format` reads and writes an
adapted model in PEFT's on-disk format. This package is the bottom of the house: it imports torch,
safetensors and :mod:`rankopt.errors`, nothing else of rankopt.
"""

from rankopt.adapters.layer import Resize, SVDLinear
from rankopt.adapters.model import AdaptedModel, adapt

__all__ = ["AdaptedModel", "Resize", "SVDLinear", "adapt"]

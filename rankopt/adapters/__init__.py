"""SVD-form adapters: one layer (:mod:`.layer`) and their injection into a model (:mod:`.model`)."""

from rankopt.adapters.layer import Resize, SVDLinear
from rankopt.adapters.model import AdaptedModel, adapt

__all__ = ["AdaptedModel", "Resize", "SVDLinear", "adapt"]

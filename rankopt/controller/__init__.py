"""Deciding ranks: the budget schedule, importance scores and the allocation, model-free.

:mod:`.schedule` gives the global budget at each step, :mod:`.importance` smooths AdaLoRA's
sensitivity, :mod:`.allocation` splits the budget across layers on plain tensors of scores (so
its rules are unit-tested without a model), :mod:`.rank_controller` applies the decisions to a
model's adapter layers. It imports :mod:`rankopt.adapters` and torch, nothing above them.
The names below are the controller's surface, imported from here.
"""

from rankopt.controller.allocation import Allocation, allocate, component_costs, counted_in
from rankopt.controller.importance import SensitivityTracker
from rankopt.controller.rank_controller import Reallocation, RankController
from rankopt.controller.schedule import BudgetSchedule

__all__ = ["Allocation", "BudgetSchedule", "RankController", "Reallocation", "SensitivityTracker", "allocate",
           "component_costs", "counted_in"]

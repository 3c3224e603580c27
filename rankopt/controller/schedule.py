"""The global rank budget over training steps.

Budget (total rank over all adapted layers) at step t, with T steps, warm-up t_i and final
phase from t_f: b(t) = b0 for t <= t_i; b_T + (b0 - b_T) (1 - (t - t_i) / (t_f - t_i))^3
between; b_T from t_f on. Reallocation happens every ``interval`` steps in (t_i, t_f].
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BudgetSchedule:
    """Warm-up at the initial budget, cubic decay to the target, then fixed."""

    initial: int
    target: int
    total_steps: int
    warmup_steps: int
    final_steps: int
    interval: int

    @classmethod
    def from_fractions(cls, initial: int, target: int, total_steps: int, warmup: float, final: float,
                       interval: int) -> BudgetSchedule:
        return cls(initial, target, total_steps, round(warmup * total_steps), round(final * total_steps), interval)

    @property
    def decay_end(self) -> int:
        return max(self.warmup_steps, self.total_steps - self.final_steps)

    def budget_at(self, step: int) -> int:
        t_i, t_f = self.warmup_steps, self.decay_end
        if step >= t_f:  # first: when rounding makes t_i == t_f, that one reallocation reaches the target
            return self.target
        if step <= t_i:
            return self.initial
        progress = (step - t_i) / (t_f - t_i)
        return self.target + round((self.initial - self.target) * (1 - progress) ** 3)

    def is_reallocation_step(self, step: int) -> bool:
        t_i, t_f = self.warmup_steps, self.decay_end
        if step == t_f and self.initial != self.target:
            return True
        return t_i < step <= t_f and (step - t_i) % self.interval == 0

    def is_tracking_step(self, step: int) -> bool:
        """Steps whose gradients feed the sensitivity EMA: from warm-up to the last reallocation."""
        return step < self.decay_end

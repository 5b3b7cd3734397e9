"""`BatchSchedule`: b (the samples back-propagated of each meta-batch of B) as a function of
training progress: selection annealed away over the run, or its reverse."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ._check import integer


@dataclass(frozen=True)
class BatchSchedule:
    """b per step as a function of training progress (ours): selection annealed away, or its
    reverse. The meta-batch size B stays fixed; b moves linearly between ``b`` and ``B`` over a
    ``ramp`` fraction of training (rounded to the nearest integer):

    * ``"to_uniform"``: ``b`` at the start, ``B`` from progress ``ramp`` on (select early,
      train every sample of the meta-batch late: B/b anneals to 1);
    * ``"from_uniform"``: the time-reverse, ``B`` until progress ``1 - ramp``, then down to
      ``b`` at the end (uniform early, selective late).

    At ``b == B`` there is nothing to select, so a loop should skip the scoring forward (and may
    score the samples from their training losses, :meth:`ESSelector.record`).

    Args:
        kind: ``"to_uniform"`` or ``"from_uniform"``.
        b: the selective end's b (``1 <= b <= B``).
        B: the meta-batch size.
        ramp: fraction of training over which b moves, in (0, 1] (default 0.75).
    """

    kind: str
    b: int
    B: int
    ramp: float = 0.75

    KINDS = ("to_uniform", "from_uniform")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise ValueError(f"kind must be one of {', '.join(self.KINDS)}, got {self.kind!r}")
        b, B = integer(self.b, "b"), integer(self.B, "B")
        if not 1 <= b <= B:
            raise ValueError(f"need 1 <= b <= B, got b={b}, B={B}")
        if not 0.0 < self.ramp <= 1.0:
            raise ValueError(f"ramp must be a fraction in (0, 1], got {self.ramp}")

    def __call__(self, progress: float) -> int:
        """b at ``progress`` (fraction of training done, clamped to [0, 1])."""
        progress = min(max(float(progress), 0.0), 1.0)
        if self.kind == "from_uniform":
            progress = 1.0 - progress
        f = min(1.0, progress / self.ramp)
        return int(math.floor(self.b + (self.B - self.b) * f + 0.5))

"""``tools/bench_train.py`` in four parts: :mod:`.cli` (the flags and their checks), :mod:`.plan`
(experiments, configurations, run keys, budget cuts, the estimate), :mod:`.run` (data, one run
through the shared training loop, the resumable ``runs.jsonl`` store) and :mod:`.report`
(statistics, tables, summary, plots). The command line and what it measures are described in
``tools/bench_train.py``; the methods come from :mod:`pipelines.methods`."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `pipelines` is not an installed package
    sys.path.insert(0, str(ROOT))

"""tools/bench_prune.py's manifest part on a small corpus: both policies write, read back the
fraction they promise, and the row says whether the goal held."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_prune  # noqa: E402

ROW = re.compile(r"^(?P<policy>es|infobatch)\s+(?P<ratio>[\d.]+)\s+(?P<write>[\d.]+)\s+[\d.]+\s+"
                 r"[\d,]+\s+(?P<bps>[\d.]+)\s+(?P<ok>yes|NO)\s+\(kept (?P<kept>[\d.]+); "
                 r"peak RSS so far (?P<rss>[\d.]+) GiB\)$")


def test_manifest_costs_rows(capsys: pytest.CaptureFixture):
    bench_prune.main(["--skip-epochs", "--manifest-samples", "200000", "--manifest-shards", "20"])
    out = capsys.readouterr().out
    rows = {m["policy"]: m for m in map(ROW.match, out.splitlines()) if m}
    assert set(rows) == {"es", "infobatch"}, out
    assert float(rows["es"]["kept"]) == pytest.approx(0.7, abs=1e-3)  # ESWP keeps 1 - ratio
    # InfoBatch drops half of the below-mean scores: of uniform random scores about half are
    # below the mean, so it keeps about 3/4
    assert float(rows["infobatch"]["kept"]) == pytest.approx(0.75, abs=0.01)
    for r in rows.values():
        assert r["ok"] == ("yes" if float(r["write"]) <= 10 and float(r["bps"]) <= 5 else "NO")
        assert float(r["rss"]) > 0

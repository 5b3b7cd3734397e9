"""tools/bench_stream.py end to end on a tiny corpus: every reader row, the exactly-once check,
and the CPU columns that tell a worker count's scaling apart from a lack of cores."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_stream  # noqa: E402

ROW = re.compile(r"^(?P<reader>\S.*?)\s+(?P<workers>\d+)\s+(?P<seconds>[\d.]+)\s+(?P<rate>[\d,]+)\s+"
                 r"(?:[\d.]+|nan)x\s+(?:[\d.]+|nan)x\s+(?P<main>[\d.]+)\s+(?P<children>[\d.]+)\s+(?P<cores>[\d.]+)$")


def test_small_run_reports_every_reader_with_its_cpu(tmp_path: Path, capsys: pytest.CaptureFixture):
    bench_stream.main(["--samples", "400", "--payload", "64", "--meta-batch", "32",
                       "--workers", "0,1", "--repeats", "1", "--es-shuffle",
                       "--dir", str(tmp_path / "data")])
    out = capsys.readouterr().out
    rows = [m.groupdict() for m in map(ROW.match, out.splitlines()) if m]
    readers = {(r["reader"], int(r["workers"])) for r in rows}
    for nw in (0, 1):
        for name in ("webdataset .batched", "streaming", "es-stream/wds", "es-stream/mds shuffle"):
            assert (name, nw) in readers, (name, nw, out)
    assert (bench_stream.LIMIT, 0) in readers
    for r in rows:
        main, children = float(r["main"]), float(r["children"])
        assert main >= 0, r  # os.times counts clock ticks: a tiny run may show 0.00
        if r["workers"] == "0":
            assert children == 0, r  # no child process read anything
        else:
            assert children > 0, r  # the joined worker's CPU is counted
    assert "exactly once in every run" in out


def test_only_es_leaves_out_the_raw_readers(tmp_path: Path, capsys: pytest.CaptureFixture):
    bench_stream.main(["--samples", "300", "--payload", "32", "--meta-batch", "32",
                       "--workers", "0", "--repeats", "1", "--only-es", "--dir", str(tmp_path / "d")])
    out = capsys.readouterr().out
    readers = {m["reader"] for m in map(ROW.match, out.splitlines()) if m}
    assert readers == {bench_stream.LIMIT, "es-stream/wds", "es-stream/mds"}, out

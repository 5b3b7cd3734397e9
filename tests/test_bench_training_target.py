"""`make bench-training` names the bench_train commands behind every committed training table:
each must still parse, and each must find all of its runs in the committed evidence (so the
tables in BENCHMARKS.md and docs/choosing.md are exactly what those commands wrote)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT))

import bench_train  # noqa: E402


def target_commands() -> list[list[str]]:
    """The bench_train arguments of each `$(TRAIN)` line of the bench-training target."""
    text = (ROOT / "Makefile").read_text()
    body = text.split("\nbench-training:", 1)[1].split("\n\n", 1)[0]
    lines = [line.strip() for line in body.splitlines()[1:] if line.startswith("\t")]
    assert lines and all(line.startswith("$(TRAIN) ") for line in lines), lines
    return [shlex.split(line[len("$(TRAIN) "):].replace("$(EVIDENCE)", "docs/evidence"))
            for line in lines]


COMMANDS = target_commands()


def _name(argv: list[str]) -> str:
    """The command's --out under docs/evidence, and its noise levels when several share it."""
    out = argv[argv.index("--out") + 1].removeprefix("docs/evidence").strip("/") or "evidence"
    return out + (f"-noise{argv[argv.index('--noise') + 1]}" if "--noise" in argv else "")


@pytest.mark.parametrize("argv", COMMANDS, ids=[_name(a) for a in COMMANDS])
def test_each_command_finds_all_its_runs_in_the_committed_evidence(argv: list[str], tmp_path: Path,
                                                                    monkeypatch, capsys) -> None:
    out_dir = Path(argv[argv.index("--out") + 1])
    monkeypatch.chdir(ROOT)
    assert (ROOT / out_dir / "runs.jsonl").is_file(), f"{out_dir}: no committed runs"
    result = bench_train.main([*argv, "--data-dir", str(tmp_path / "data"), "--no-progress",
                               "--dry-run"])
    assert result["estimate"]["runs"] == 0, (argv, capsys.readouterr().out)

"""rank_and_world_size: torchrun's RANK / WORLD_SIZE, checked and named when they are wrong."""

from __future__ import annotations

import pytest

from es_stream.distributed import rank_and_world_size


@pytest.mark.parametrize("env,match", [
    ({"WORLD_SIZE": "abc"}, r"environment variable WORLD_SIZE='abc' must be an integer >= 1"),
    ({"WORLD_SIZE": "0"}, r"WORLD_SIZE='0' must be an integer >= 1"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, r"environment variable RANK='-1' must be an integer >= 0"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"environment variable RANK=2 is not below WORLD_SIZE=2"),
    ({"RANK": "1"}, r"RANK=1 is not below WORLD_SIZE=1"),
])
def test_bad_values_name_the_variable(monkeypatch, env, match):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert rank_and_world_size() == (0, 1)  # unset: a single process
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert rank_and_world_size() == (2, 4)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        rank_and_world_size()

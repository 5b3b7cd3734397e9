"""The README's plain-loop example runs as written, on a small real corpus."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from es_stream import Corpus

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(name: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- readme-test: {name} .*?-->\n```python\n(.*?)```", text, re.S)
    assert match, f"README block {name!r} not found"
    return match.group(1)


def test_plain_loop_example_trains(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 40)).astype(np.float32)
    with wds.ShardWriter(str(tmp_path / "train-%06d.tar"), maxcount=300, verbose=0) as w:
        for i in range(1024):
            label = i % 10
            buf = io.BytesIO()
            np.save(buf, centers[label] + 0.3 * rng.normal(size=40).astype(np.float32))
            w.write({"__key__": f"{i:06d}", "npy": buf.getvalue(), "cls": label})
    Corpus.from_webdataset(str(tmp_path)).save(tmp_path / "corpus.parquet")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_block("plain-loop"), "README.md", "exec"), scope)
    selector, model = scope["selector"], scope["model"]
    assert selector.step == 3 * (1024 // 128)  # drop_last: every meta-batch is full
    assert not torch.allclose(selector.store.gather(torch.arange(1024)), torch.full((1024,), 1 / 1024))
    x = torch.from_numpy(centers)
    assert (model(x).argmax(1) == torch.arange(10)).float().mean() >= 0.8  # it learned

"""A web-like pre-training stream built offline and deterministically from real material on this
machine: mostly clean text mixed with the junk a crawl holds, every sample labelled with its kind
in a side table that training methods never read.

**Material.** Text: the Python standard library's ``.py``/``.rst``/``.txt`` files, collected and
split into train and held-out files exactly as :mod:`pipelines.textlm.data` does (by file, so no
held-out byte is trained on). Binary: the compiled extension modules (``*.so``) of the stdlib's
``lib-dynload``, split by file the same way.

**Kinds** (every sample is ``seq_len`` bytes, the :mod:`pipelines.textlm` format):

- ``clean``: consecutive windows of the train files' text.
- ``html``: real text (from the train text after the clean windows), HTML-escaped, inside a
  rendered page (doctype, title, a navigation menu, a footer with links and a copyright line),
  cut to the window around the text: the end of the navigation, the text (half the window) and
  the start of the footer.
- ``binary``: windows of the ``.so`` files' bytes.
- ``base64``: the base64 encoding of such windows.
- ``exact_dup``: byte-identical copies of clean samples (each copied document has 1 to
  ``max_copies`` copies).
- ``near_dup``: copies of clean samples with ``round(edit_rate * seq_len)`` (at least 1) one-byte
  edits (substitute, insert or delete a printable byte at a random place), cut or extended with
  the text that follows to ``seq_len``: edit distance at most twice the edits. At the default 1%
  (3 edits of 256 bytes) the 5-byte-shingle Jaccard similarity to the original is about 0.9.
- ``template``: generated text: a spam template filled with identifiers drawn from the real
  text, or one real line repeated, looped to ``seq_len``.
- ``random``: uniformly random bytes.

**Order and labels.** The samples are shuffled with the seed; within each duplicate group the
original takes the smallest id, so "keep the first occurrence" keeps the labelled original.
``labels.parquet`` holds ``id``, ``kind`` and ``group`` (for a copy, the id of its original; -1
otherwise). Real text repeats itself too (licence headers, zero-filled regions of binaries): such
natural duplicates keep their kind; ``meta.json`` counts them (``natural_exact_dups``).

**Held-out** (``heldout.npz``, uint8 ``[n, seq_len]`` per key): ``clean`` is every window of the
held-out files (evaluation on clean text never trained on); one set per other kind, up to
``heldout_per_kind`` samples, made the same way from held-out material (held-out text and
binaries; ``exact_dup`` is the exception: copies of the training originals that were duplicated,
the loss a model reaches on what it saw repeatedly).

The samples are :mod:`pipelines.textlm`'s (``{"__key__", "bin": seq_len bytes}``), so its
``workload(data.corpus, data.heldout)`` (``Decode``/``Collate``) trains on them unchanged.

Layout of one build ``<root>/webtext-<fingerprint>/``: ``meta.json``, ``files.json``,
``labels.parquet``, ``heldout.npz``, ``train/train-*.tar`` and ``train-k<K>.parquet`` indexes
(the first K shards, for a training budget). Written to a temporary directory, renamed when
complete.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from es_stream.dedup import content_digests, exact_groups

from ..textlm.data import TextLM, _index, _shards, collect, split_files, stdlib_dir

KINDS = ("clean", "html", "binary", "base64", "exact_dup", "near_dup", "template", "random")
MB = 1 << 20
_PRINTABLE = np.arange(32, 127, dtype=np.uint8)
_NAV = ("Home", "News", "About", "Contact", "Blog", "Products", "Docs", "Login", "Search",
        "Careers", "Support", "Pricing")
_TEMPLATES = ("Best {0} deals! Buy {1} online now. Free shipping on {0} and {2}. ",
              "Click here to download {0} {1} for free!!! Top {2} of 2024. ",
              "{0} | {1} | {2} | Sign up | Log in | Share | Tweet | ",
              "Hot {0} near you. Meet {1} singles tonight. {2} reviews 5/5 stars. ")


@dataclass(frozen=True)
class Mixture:
    """The share of each kind (adding up to 1), how many copies a duplicated document gets, and
    the near copies' edit rate. Defaults: 40% clean, 15% HTML, 10% each exact duplicates, near
    duplicates and templated text, 5% each binary, base64 and random bytes."""

    clean: float = 0.40
    html: float = 0.15
    binary: float = 0.05
    base64: float = 0.05
    exact_dup: float = 0.10
    near_dup: float = 0.10
    template: float = 0.10
    random: float = 0.05
    max_copies: int = 4
    edit_rate: float = 0.01

    def __post_init__(self) -> None:
        shares = self.shares()
        if any(v < 0 for v in shares.values()) or not math.isclose(sum(shares.values()), 1.0,
                                                                    abs_tol=1e-9):
            raise ValueError(f"mixture shares must be >= 0 and add up to 1, got {shares}")
        if shares["clean"] <= 0 and (shares["exact_dup"] > 0 or shares["near_dup"] > 0):
            raise ValueError("duplicates copy clean samples: the mixture needs clean > 0")
        if self.max_copies < 1:
            raise ValueError(f"max_copies must be >= 1, got {self.max_copies}")
        if not 0.0 <= self.edit_rate < 0.5:
            raise ValueError(f"edit_rate must be in [0, 0.5), got {self.edit_rate}")

    def shares(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in KINDS}

    def counts(self, n: int) -> dict[str, int]:
        """Samples of each kind out of ``n`` (largest remainders: they add up to ``n``)."""
        raw = {k: s * n for k, s in self.shares().items()}
        out = {k: int(math.floor(v)) for k, v in raw.items()}
        for k in sorted(raw, key=lambda k: (out[k] - raw[k], KINDS.index(k)))[:n - sum(out.values())]:
            out[k] += 1
        return out


@dataclass
class WebText(TextLM):
    """A built web-like corpus.

    Attributes:
        corpus: the training corpus (the first ``train_shards`` shards), ids 0..n-1.
        heldout: uint8 tensor [n, seq_len]: clean held-out text.
        heldout_kinds: per kind, uint8 tensor [m, seq_len] of held-out samples of that kind.
        seq_len, train_shards, total_train_shards, meta, directory: as in ``textlm``.
    """

    heldout_kinds: dict[str, torch.Tensor]

    def labels(self) -> dict[str, np.ndarray]:
        """The side table of the training corpus: ``id``, ``kind`` (str) and ``group``."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.directory / "labels.parquet")
        n = self.corpus.num_samples
        return {"id": table.column("id").to_numpy()[:n],
                "kind": np.asarray(table.column("kind").to_pylist()[:n], dtype=object),
                "group": table.column("group").to_numpy()[:n]}


def _concat(source: Path, files: list[tuple[str, int]]) -> bytes:
    return b"".join((source / rel).read_bytes() for rel, _ in files)


def _windows(data: bytes, L: int, count: int, start: int = 0) -> list[bytes]:
    return [data[start + i * L:start + (i + 1) * L] for i in range(count)]


def _html_page(text: bytes, L: int, rng: np.random.Generator, words: list[str]) -> bytes:
    nav = [_NAV[i] for i in rng.choice(len(_NAV), size=int(rng.integers(3, 6)), replace=False)]
    site = words[int(rng.integers(len(words)))].lower()
    head = ('<!DOCTYPE html><html><head><title>' + site.title() + '</title></head><body>'
            '<nav class="menu"><ul>' + "".join(f'<li><a href="/{w.lower()}">{w}</a></li>' for w in nav)
            + '</ul></nav><div class="content"><p>').encode()
    foot = ('</p></div><footer><a href="/privacy">Privacy</a> | <a href="/terms">Terms</a>'
            f' | &copy; 2024 {site}.com</footer></body></html>').encode()
    body = text.replace(b"&", b"&amp;").replace(b"<", b"&lt;").replace(b">", b"&gt;")[:L // 2]
    # the window a page is cut to: the end of the head (navigation), the text, the start of
    # the footer, so each sample holds both boilerplate and real text
    rest = L - len(body)
    tail = min(len(foot), rest * 2 // 5)
    page = head[-(rest - tail):] + body + foot[:tail]
    return page + b" " * (L - len(page))


def _template(rng: np.random.Generator, words: list[str], lines: list[bytes], L: int) -> bytes:
    if rng.random() < 0.5:
        t = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        unit = t.format(*(words[int(i)] for i in rng.integers(len(words), size=3))).encode()
    else:
        unit = lines[int(rng.integers(len(lines)))] + b"\n"
    return (unit * (L // len(unit) + 1))[:L]


def near_copy(original: bytes, following: bytes, edits: int, rng: np.random.Generator) -> bytes:
    """``original`` with ``edits`` one-byte edits (substitute, insert or delete a printable byte
    at a random place), cut to its length or extended with ``following``; never equal to it."""
    L = len(original)
    while True:
        b = bytearray(original)
        for _ in range(edits):
            op, pos = int(rng.integers(3)), int(rng.integers(len(b)))
            new = int(_PRINTABLE[rng.integers(len(_PRINTABLE))])
            if op == 0:
                b[pos] = new if new != b[pos] else (new + 1 - 32) % 95 + 32
            elif op == 1:
                b.insert(pos, new)
            else:
                del b[pos]
        out = bytes(b[:L]) if len(b) >= L else bytes(b) + following[:L - len(b)]
        if out != original and len(out) == L:
            return out


def _words_and_lines(text: bytes) -> tuple[list[str], list[bytes]]:
    sample = text[:1 << 20]
    words = sorted(set(re.findall(rb"[A-Za-z]{4,12}", sample)))
    lines = sorted({ln.strip() for ln in sample.split(b"\n") if 20 <= len(ln.strip()) <= 60})
    if not words or not lines:
        raise ValueError("the text source has no words or lines to build templated text from")
    return [w.decode() for w in words], lines


def _copies(rng: np.random.Generator, sources: np.ndarray, total: int,
            max_copies: int) -> tuple[np.ndarray, int]:
    """``(source of each copy, sources used)``: each source gets 1..max_copies copies until
    ``total`` copies are made."""
    per = rng.integers(1, max_copies + 1, size=max(total, 1))
    used = int(np.searchsorted(np.cumsum(per), total)) + 1 if total else 0
    if used > len(sources):
        raise ValueError(f"{total} copies need {used} distinct clean sources, only {len(sources)}")
    reps = per[:used].copy()
    if used:
        reps[-1] -= int(reps.sum()) - total
    return np.repeat(sources[:used], reps), used


def _make(kinds_n: dict[str, int], mixture: Mixture, L: int, text: bytes, binary: bytes,
          rng: np.random.Generator) -> tuple[list[bytes], list[str], list[int]]:
    """Every sample of one split in kind order: ``(samples, kinds, group)`` where group is the
    index of a copy's original (-1 for none)."""
    words, lines = _words_and_lines(text)
    n_clean = kinds_n["clean"]
    samples = _windows(text, L, n_clean)
    kinds, group = ["clean"] * n_clean, [-1] * n_clean
    pool = rng.permutation(n_clean)  # distinct originals: exact copies first, then near
    exact_src, used = _copies(rng, pool, kinds_n["exact_dup"], mixture.max_copies)
    near_src, _ = _copies(rng, pool[used:], kinds_n["near_dup"], mixture.max_copies)
    samples += [samples[s] for s in exact_src]
    kinds += ["exact_dup"] * len(exact_src)
    group += exact_src.tolist()
    edits = max(1, round(mixture.edit_rate * L))
    follow = n_clean * L  # text after the clean windows: continuations, then HTML bodies
    for s in near_src:
        after = text[(s + 1) * L:(s + 1) * L + edits] if s + 1 < n_clean else text[follow:follow + edits]
        samples.append(near_copy(samples[s], after, edits, rng))
    kinds += ["near_dup"] * len(near_src)
    group += near_src.tolist()
    body = L // 2
    html_at = follow + edits
    for i in range(kinds_n["html"]):
        samples.append(_html_page(text[html_at + i * body:html_at + (i + 1) * body], L, rng, words))
    samples += _windows(binary, L, kinds_n["binary"])
    raw = (L * 3 + 3) // 4
    at = kinds_n["binary"] * L
    samples += [base64.b64encode(binary[at + i * raw:at + (i + 1) * raw])[:L]
                for i in range(kinds_n["base64"])]
    samples += [_template(rng, words, lines, L) for _ in range(kinds_n["template"])]
    samples += [rng.bytes(L) for _ in range(kinds_n["random"])]
    for k in ("html", "binary", "base64", "template", "random"):
        kinds += [k] * kinds_n[k]
        group += [-1] * kinds_n[k]
    return samples, kinds, group


def _needs(counts: dict[str, int], L: int, edits: int) -> tuple[int, int]:
    """Bytes of text and of binary a split with these counts uses."""
    text = counts["clean"] * L + edits + counts["html"] * (L // 2)
    return text, counts["binary"] * L + counts["base64"] * ((L * 3 + 3) // 4)


def _largest(mixture: Mixture, L: int, text: int, binary: int) -> int:
    """The most samples whose text and binary needs fit the material (bisection)."""
    lo, hi = 0, 1 << 40
    edits = max(1, round(mixture.edit_rate * L))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        t, b = _needs(mixture.counts(mid), L, edits)
        lo, hi = (mid, hi) if t <= text and b <= binary else (lo, mid - 1)
    return lo


def _shuffle(kinds: list[str], group: list[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(position of each sample, group as positions)``: a seeded permutation in which each
    original precedes its copies."""
    pos = rng.permutation(len(kinds))
    g = np.asarray(group, np.int64)
    copies = np.flatnonzero(g >= 0)
    members: dict[int, list[int]] = {}
    for c in copies:
        members.setdefault(int(g[c]), []).append(int(c))
    for orig, cs in members.items():
        idx = [orig] + cs
        pos[idx] = np.sort(pos[idx])  # the original first, copies after
    out_group = np.full(len(kinds), -1, np.int64)
    out_group[pos[copies]] = pos[g[copies]]
    return pos, out_group


def _key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def build(root: str | os.PathLike, *, mixture: Mixture | None = None, samples: int | None = None,
          seq_len: int = 256, heldout_fraction: float = 0.05, heldout_per_kind: int = 256,
          seed: int = 0, shard_sequences: int = 2048, source: str | os.PathLike | None = None,
          binary_source: str | os.PathLike | None = None, max_bytes: int | None = None,
          min_bytes: int = 20 * MB, train_bytes: int | None = None, log: Any = print) -> WebText:
    """Build (or reuse) the web-like corpus under ``root`` and return it.

    Args:
        mixture: the kinds' shares, copies and edit rate (default :class:`Mixture`()).
        samples: training samples in all (default: as many as the material allows; a larger
            number is refused, naming what it needs).
        seq_len: bytes per sample.
        heldout_fraction: share of the text and binary bytes held out, whole files.
        heldout_per_kind: held-out samples of each kind other than clean (at most).
        seed: every random choice (same seed, same bytes).
        shard_sequences: samples per tar shard.
        source / binary_source: text directory (default the stdlib) and binary directory
            (default the stdlib's ``lib-dynload``).
        max_bytes / min_bytes: as in :func:`pipelines.textlm.data.build`, for the text.
        train_bytes: index only the first shards holding this many bytes (None: all).
    """
    mixture = mixture or Mixture()
    if seq_len < 16:
        raise ValueError(f"seq_len must be >= 16, got {seq_len}")
    src = Path(source).resolve() if source is not None else stdlib_dir()
    bsrc = Path(binary_source).resolve() if binary_source is not None else stdlib_dir() / "lib-dynload"
    files = collect(src, max_bytes)
    total = sum(s for _, s in files)
    if total < min_bytes:
        raise ValueError(f"{src}: collected {total / MB:.1f} MB of text in {len(files)} files, "
                         f"less than the required {min_bytes / MB:.1f} MB")
    bfiles = collect(bsrc, suffixes=(".so",))
    key = _key(src=str(src), files=files, bsrc=str(bsrc), bfiles=bfiles, mixture=asdict(mixture),
               samples=samples, seq_len=seq_len, heldout_fraction=heldout_fraction,
               heldout_per_kind=heldout_per_kind, seed=seed, shard_sequences=shard_sequences)
    directory = Path(root) / f"webtext-{key}"
    if not (directory / "meta.json").exists():
        _write(directory, mixture, samples, seq_len, heldout_fraction, heldout_per_kind, seed,
               shard_sequences, src, files, bsrc, bfiles, log)
    meta = json.loads((directory / "meta.json").read_text())
    shards = _shards(directory / "train")
    k = len(shards) if train_bytes is None else max(1, min(len(shards), math.ceil(
        train_bytes / (seq_len * shard_sequences))))
    corpus = _index(directory / f"train-k{k}.parquet", shards[:k])
    held = np.load(directory / "heldout.npz")
    kinds = {name: torch.from_numpy(held[name]) for name in held.files if name != "clean"}
    return WebText(corpus=corpus, heldout=torch.from_numpy(held["clean"]), heldout_kinds=kinds,
                   seq_len=seq_len, train_shards=k, total_train_shards=len(shards), meta=meta,
                   directory=directory)


def _write(directory: Path, mixture: Mixture, samples: int | None, L: int,
           heldout_fraction: float, heldout_per_kind: int, seed: int, shard_sequences: int,
           src: Path, files: list, bsrc: Path, bfiles: list, log: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    train_files, held_files = split_files(files, heldout_fraction, seed)
    btrain, bheld = split_files(bfiles, heldout_fraction, seed)
    text, binary = _concat(src, train_files), _concat(bsrc, btrain)
    most = _largest(mixture, L, len(text), len(binary))
    n = most if samples is None else samples
    if n > most or n < 1:
        raise ValueError(f"{n} samples of {L} bytes in this mixture need more material than "
                         f"{len(text) / MB:.1f} MB of train text in {src} and "
                         f"{len(binary) / MB:.1f} MB of binaries in {bsrc} (at most {most})")
    counts = mixture.counts(n)
    rng = np.random.default_rng([seed, 0x3EB])
    items, kinds, group = _make(counts, mixture, L, text, binary, rng)
    pos, group_pos = _shuffle(kinds, group, rng)
    order = np.argsort(pos)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".webtext-", dir=directory.parent))
    try:
        (tmp / "train").mkdir()
        with wds.ShardWriter(str(tmp / "train" / "train-%06d.tar"), maxcount=shard_sequences,
                             verbose=0, mtime=0) as writer:
            for i, j in enumerate(order):
                writer.write({"__key__": f"{i:09d}", "bin": items[j]})
        kind_col = np.asarray(kinds, dtype=object)[order]
        pq.write_table(pa.table({"id": np.arange(n, dtype=np.int64),
                                 "kind": pa.array(kind_col.tolist()).dictionary_encode(),
                                 "group": group_pos}), tmp / "labels.parquet")
        held = _heldout(mixture, L, heldout_per_kind, src, held_files, bsrc, bheld,
                        [items[j] for j in np.flatnonzero(np.asarray(group) >= 0)
                         if kinds[j] == "exact_dup"], seed)
        np.savez(tmp / "heldout.npz", **held)
        digests = content_digests([items[j] for j in order])
        first = exact_groups(digests)
        natural = {k: int(((first != np.arange(n)) & (kind_col == k)).sum()) for k in KINDS
                   if k != "exact_dup"}
        (tmp / "files.json").write_text(json.dumps({"train": train_files, "heldout": held_files,
                                                    "binary_train": btrain,
                                                    "binary_heldout": bheld}, indent=0))
        meta = {"source": str(src), "binary_source": str(bsrc), "seq_len": L, "seed": seed,
                "mixture": asdict(mixture), "samples": n, "counts": counts,
                "edits_per_near_dup": max(1, round(mixture.edit_rate * L)),
                "shard_sequences": shard_sequences, "heldout_fraction": heldout_fraction,
                "heldout": {k: int(v.shape[0]) for k, v in held.items()},
                "natural_exact_dups": natural, "text_bytes_available": len(text),
                "binary_bytes_available": len(binary)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if directory.exists():  # an interrupted earlier build (no meta.json): replace it
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"webtext: wrote {n} samples of {L} B ({', '.join(f'{k} {v}' for k, v in counts.items())})"
        f" to {directory}")


def _heldout(mixture: Mixture, L: int, per_kind: int, src: Path, held_files: list, bsrc: Path,
             bheld: list, exact_copies: list[bytes], seed: int) -> dict[str, np.ndarray]:
    """The held-out sets: every clean window of the held-out files, and up to ``per_kind``
    samples of each other kind made from held-out material."""
    text, binary = _concat(src, held_files), _concat(bsrc, bheld)
    rng = np.random.default_rng([seed, 0x4E1D])
    n_clean = len(text) // L
    if n_clean < 1:
        raise ValueError(f"the held-out files hold {len(text)} bytes, less than one {L}-byte "
                         "sample; raise heldout_fraction")
    edits = max(1, round(mixture.edit_rate * L))
    # each kind from the held-out material, as many as it allows (the text is reused across kinds)
    room = {"html": (len(text)) // (L // 2), "binary": len(binary) // L,
            "base64": len(binary) // ((L * 3 + 3) // 4), "near_dup": n_clean - 1,
            "template": per_kind, "random": per_kind}
    want = {k: min(per_kind, max(0, v)) for k, v in room.items()}
    words, lines = _words_and_lines(text)
    out = {"clean": _windows(text, L, n_clean)}
    out["html"] = [_html_page(text[i * (L // 2):(i + 1) * (L // 2)], L, rng, words)
                   for i in range(want["html"])]
    out["binary"] = _windows(binary, L, want["binary"])
    raw = (L * 3 + 3) // 4
    out["base64"] = [base64.b64encode(binary[i * raw:(i + 1) * raw])[:L] for i in range(want["base64"])]
    out["near_dup"] = [near_copy(out["clean"][i], out["clean"][i + 1][:edits], edits, rng)
                       for i in range(want["near_dup"])]
    out["template"] = [_template(rng, words, lines, L) for _ in range(want["template"])]
    out["random"] = [rng.bytes(L) for _ in range(want["random"])]
    out["exact_dup"] = list(dict.fromkeys(exact_copies))[:per_kind]
    return {k: np.frombuffer(b"".join(v), np.uint8).reshape(len(v), L) for k, v in out.items() if v}

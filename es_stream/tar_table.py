"""`TarTable`: where each sample of a WebDataset corpus and each of its files lie in the tar
shards, as flat numpy/Arrow arrays indexed by sample id, and its columns in an index file."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa

from .tarscan import ShardLayout


class TarColumnsProblem(ValueError):
    """What is wrong with an index file's tar columns, without the file name: the caller names
    the file and says what to do."""


@dataclass
class TarTable:
    """Byte layout of every sample of a WebDataset corpus, as flat arrays indexed by sample id.

    ``member_ptr[i]:member_ptr[i+1]`` are sample i's files; member offsets are relative to the
    sample's offset, so one read of ``lengths[i]`` bytes at ``offsets[i]`` holds all of them.

    Keys and suffixes are the strings webdataset gives (member names decoded by tarfile with
    ``surrogateescape``). When one is not valid UTF-8, ``keys`` is a ``binary`` array of the raw
    name bytes instead of ``string``, as Arrow and Parquet strings must be UTF-8; read a key
    with :meth:`key`, which decodes either.
    """

    keys: pa.Array
    offsets: np.ndarray
    lengths: np.ndarray
    member_ptr: np.ndarray
    member_suffix: np.ndarray
    member_offset: np.ndarray
    member_size: np.ndarray
    suffixes: list[str]

    def key(self, sample_id: int) -> str:
        """Sample ``sample_id``'s key, as webdataset's ``__key__``."""
        return py_text(self.keys[sample_id].as_py())



def build_tar_table(layouts: Iterable[ShardLayout]) -> TarTable:
    """The table of the shards scanned into ``layouts``, in order."""
    keys: list[str] = []
    offsets: list[int] = []
    lengths: list[int] = []
    counts: list[int] = []
    suffix_codes: dict[str, int] = {}
    m_suffix: list[int] = []
    m_offset: list[int] = []
    m_size: list[int] = []
    for layout in layouts:
        keys += layout.keys
        offsets += layout.offsets
        lengths += layout.lengths
        for members in layout.members:
            counts.append(len(members))
            for suffix, off, size in members:
                m_suffix.append(suffix_codes.setdefault(suffix, len(suffix_codes)))
                m_offset.append(off)
                m_size.append(size)
    return TarTable(
        keys=text_array(keys),
        offsets=np.array(offsets, dtype=np.int64),
        lengths=np.array(lengths, dtype=np.int64),
        member_ptr=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64),
        member_suffix=np.array(m_suffix, dtype=np.int32),
        member_offset=np.array(m_offset, dtype=np.int64),
        member_size=np.array(m_size, dtype=np.int64),
        suffixes=list(suffix_codes),
    )



# column -> (arrow type test, what it must be), for a WebDataset corpus
def _is_text(t: pa.DataType) -> bool:
    # names are strings, or raw bytes when a tar member name is not UTF-8 (see text_array)
    return pa.types.is_string(t) or pa.types.is_binary(t)


_TAR_COLUMNS = {
    "key": (_is_text, "string or binary"),
    "offset": (pa.types.is_integer, "integer"),
    "length": (pa.types.is_integer, "integer"),
    "member_suffix": (lambda t: pa.types.is_list(t) and (_is_text(t.value_type) or (
        pa.types.is_dictionary(t.value_type) and _is_text(t.value_type.value_type))),
        "list of strings"),
    "member_offset": (lambda t: pa.types.is_list(t) and pa.types.is_integer(t.value_type),
                      "list of integers"),
    "member_size": (lambda t: pa.types.is_list(t) and pa.types.is_integer(t.value_type),
                    "list of integers"),
}


def _check_tar_columns(table: pa.Table) -> None:
    for name, (ok, wanted) in _TAR_COLUMNS.items():
        if name not in table.column_names:
            raise TarColumnsProblem(f"it has no column {name!r} (a WebDataset corpus index "
                                    "needs it)")
        column = table.column(name)
        if not ok(column.type):
            raise TarColumnsProblem(f"column {name!r} must be {wanted}, got {column.type}")
        if column.null_count:
            raise TarColumnsProblem(f"column {name!r} has {column.null_count} null values")


def tar_columns(t: TarTable) -> dict[str, pa.Array]:
    """The index file's columns for ``t``, one row per sample (read back by
    :func:`tar_table_from_arrow`)."""
    ptr = pa.array(t.member_ptr.astype(np.int32))
    suffix = pa.DictionaryArray.from_arrays(pa.array(t.member_suffix), text_array(t.suffixes))
    return {
        "key": t.keys,
        "offset": pa.array(t.offsets),
        "length": pa.array(t.lengths),
        "member_suffix": pa.ListArray.from_arrays(ptr, suffix),
        "member_offset": pa.ListArray.from_arrays(ptr, pa.array(t.member_offset)),
        "member_size": pa.ListArray.from_arrays(ptr, pa.array(t.member_size)),
    }


def tar_table_from_arrow(table: pa.Table) -> TarTable:
    """The :class:`TarTable` of an index file's columns; :class:`TarColumnsProblem` when a
    column is missing, of the wrong type, or the file lists disagree."""
    _check_tar_columns(table)
    suffix_lists = table.column("member_suffix").combine_chunks()
    suffix = suffix_lists.flatten()
    if isinstance(suffix, pa.DictionaryArray):
        codes, vocab = suffix.indices, suffix.dictionary
    else:
        enc = suffix.dictionary_encode()
        codes, vocab = enc.indices, enc.dictionary
    tar = TarTable(
        keys=table.column("key").combine_chunks(),
        offsets=table.column("offset").to_numpy(),
        lengths=table.column("length").to_numpy(),
        member_ptr=suffix_lists.offsets.to_numpy().astype(np.int64),
        member_suffix=codes.to_numpy(zero_copy_only=False).astype(np.int32),
        member_offset=table.column("member_offset").combine_chunks().flatten().to_numpy(),
        member_size=table.column("member_size").combine_chunks().flatten().to_numpy(),
        suffixes=[py_text(v) for v in vocab.to_pylist()],
    )
    members = int(tar.member_ptr[-1] - tar.member_ptr[0])
    if not len(tar.member_offset) == len(tar.member_size) == len(tar.member_suffix) == members:
        raise TarColumnsProblem("columns 'member_suffix', 'member_offset' and 'member_size' "
                                "list different numbers of files")
    return tar


def check_tar_values(t: TarTable, shard_starts: np.ndarray, sizes: np.ndarray,
                     names: list[str]) -> None:
    """Check that the layout values lie inside their shards and agree with their neighbours:
    every sample's span inside its shard (``sizes[s]`` bytes; not checked where the size is
    unknown, -1), the samples of a shard in order without overlap, every file inside its
    sample's span after a header. :class:`TarColumnsProblem` naming the column and row (the row
    is the sample id) otherwise: an edited value would read other samples' bytes, or ask for
    more memory than there is."""
    n = len(t.offsets)
    counts = np.diff(shard_starts)
    shard_of = np.repeat(np.arange(len(counts)), counts)
    size = sizes[shard_of]
    end = t.offsets + t.lengths

    def fail(column: str, bad: np.ndarray, value: np.ndarray, why: str, row=None) -> None:
        i = int(np.flatnonzero(bad)[0])
        r = i if row is None else int(row[i])
        raise TarColumnsProblem(f"column {column!r} row {r} (shard {names[shard_of[r]]}): "
                                f"{int(value[i])} {why}; the file was edited or is corrupt")

    for column, bad, value, why in (
            ("offset", t.offsets < 0, t.offsets, "is negative"),
            ("length", t.lengths < _MIN_SAMPLE, t.lengths, f"is less than {_MIN_SAMPLE} bytes (one "
             "header)"),
            ("length", (size >= 0) & (end > size), end, "is where the sample would end, past "
             "the end of its shard"),
            ("offset", (shard_of[1:] == shard_of[:-1]) & (t.offsets[1:] < end[:-1]),
             t.offsets[1:], "overlaps the sample before it in the shard")):
        if bad.any():
            fail(column, bad, value, why, None if len(bad) == n else np.arange(1, n))
    sample_of = np.repeat(np.arange(n), np.diff(t.member_ptr))
    m_end = t.member_offset + t.member_size
    for column, bad, value, why in (
            ("member_offset", t.member_offset < tarfile.BLOCKSIZE, t.member_offset,
             "lies inside the sample's first header"),
            ("member_size", t.member_size < 0, t.member_size, "is negative"),
            ("member_size", m_end > t.lengths[sample_of], t.member_size, "runs past the end "
             "of its sample's span")):
        if bad.any():
            fail(column, bad, value, why, sample_of)


_MIN_SAMPLE = tarfile.BLOCKSIZE


def text_array(values: list[str]) -> pa.Array:
    """Names as an Arrow ``string`` array, or, when one is not valid UTF-8, a ``binary`` array
    of the raw bytes tarfile decoded it from, which Parquet keeps exactly."""
    try:
        return pa.array(values, pa.string())
    except UnicodeEncodeError:  # a lone surrogate: tarfile's surrogateescape of a non-UTF-8 byte
        return pa.array([v.encode(tarfile.ENCODING, "surrogateescape") for v in values],
                        pa.binary())


def py_text(value: str | bytes) -> str:
    """A name read back from the index, decoded as tarfile (and so webdataset) decodes it."""
    if isinstance(value, bytes):
        return value.decode(tarfile.ENCODING, "surrogateescape")
    return value

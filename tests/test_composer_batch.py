"""The batch helpers of the Composer integration (es_stream.integrations.batch): pure torch, so
they run in the main environment too."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch

from es_stream.integrations.batch import batch_size_of, default_id_key, split_ids, take_rows


def test_split_ids_from_dict_and_tuple_batches():
    batch = {"x": torch.randn(4, 3), "es_id": torch.tensor([7, 2, 9, 4]), "y": torch.arange(4)}
    ids, rest = split_ids(batch, default_id_key(batch))
    assert ids.tolist() == [7, 2, 9, 4] and ids.dtype == torch.int64
    assert set(rest) == {"x", "y"} and "es_id" in batch  # the caller's batch is left alone
    x, y = torch.randn(4, 3), torch.arange(4)
    ids, rest = split_ids((x, y, torch.tensor([1, 2, 3, 0], dtype=torch.int32)), -1)
    assert ids.tolist() == [1, 2, 3, 0] and ids.dtype == torch.int64
    assert isinstance(rest, tuple) and rest[0] is x and rest[1] is y
    ids, rest = split_ids([torch.tensor([5, 6]), x[:2]], 0)
    assert ids.tolist() == [5, 6] and isinstance(rest, list) and len(rest) == 1


def test_split_ids_errors_say_what_to_do():
    with pytest.raises(KeyError, match="no sample-id field 'es_id'"):
        split_ids({"x": torch.zeros(2)}, "es_id")
    with pytest.raises(KeyError, match="must be an index"):
        split_ids((torch.zeros(2),), 3)
    with pytest.raises(ValueError, match="one integer sample id per sample"):
        split_ids({"es_id": torch.zeros(2)}, "es_id")
    with pytest.raises(TypeError, match="tuple or dict batch"):
        split_ids(torch.zeros(2), 0)


def test_take_rows_walks_nested_fields_in_the_given_order():
    Pair = namedtuple("Pair", "a b")
    batch = {"x": torch.arange(12).view(4, 3), "text": ["a", "b", "c", "d"],
             "pair": Pair(torch.arange(4), torch.arange(4) * 10), "scale": torch.tensor(2.0),
             "meta": "kept as is"}
    out = take_rows(batch, torch.tensor([3, 1]), 4)
    assert out["x"].tolist() == [[9, 10, 11], [3, 4, 5]]
    assert out["text"] == ["d", "b"]
    assert isinstance(out["pair"], Pair) and out["pair"].b.tolist() == [30, 10]
    assert out["scale"].item() == 2.0 and out["meta"] == "kept as is"
    assert batch_size_of(out) == 2
    x, y = take_rows((torch.arange(4), torch.arange(4) + 1), torch.tensor([0, 2]), 4)
    assert x.tolist() == [0, 2] and y.tolist() == [1, 3]


def test_take_rows_refuses_fields_that_are_not_one_row_per_sample():
    with pytest.raises(ValueError, match=r"batch\['mask'\]: tensor of shape \(3, 4\)"):
        take_rows({"x": torch.zeros(4, 2), "mask": torch.zeros(3, 4)}, torch.tensor([0]), 4)
    with pytest.raises(ValueError, match="list of 3 entries"):
        take_rows({"text": ["a", "b", "c"]}, torch.tensor([0]), 4)

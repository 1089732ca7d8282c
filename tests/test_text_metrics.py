"""Sentence-embedding metrics: cosine to the original, neighbours kept, and retrieval recall@1
and MRR@10, checked on embeddings whose answers are known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchslim.errors import DataError
from torchslim.evaluate.text import encode, mean_cosine, neighbour_overlap, retrieval


def test_identical_embeddings_agree_fully_and_noise_lowers_every_figure():
    e = F.normalize(torch.randn(200, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert mean_cosine(e, e) == pytest.approx(1.0)
    assert neighbour_overlap(e, e, k=10) == 1.0
    noisy = e + 0.3 * torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    assert 0.5 < mean_cosine(noisy, e) < 0.99
    assert 0.0 < neighbour_overlap(noisy, e, k=10) < 1.0


def test_retrieval_counts_ranks_and_stops_at_ten():
    docs = torch.eye(12)
    queries = docs.clone()
    queries[0] = docs[0] + 2 * docs[1]  # query 0 finds document 1 first, its own second
    queries[1] = 0.1 * docs[1] + sum(docs[j] for j in range(2, 12))  # its own document ranks 11th
    out = retrieval(queries, docs, k=10)
    assert out["recall@1"] == pytest.approx(10 / 12)
    assert out["mrr@10"] == pytest.approx((10 + 0.5) / 12)


def test_encode_mean_pools_over_the_mask_in_order():
    class Tokens(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return {"last_hidden_state": torch.nn.functional.one_hot(input_ids, 4).float()}

    batch = {"input_ids": torch.tensor([[1, 2, 0], [3, 3, 3]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    e = encode(Tokens(), [batch, batch])
    assert e.shape == (4, 4)
    torch.testing.assert_close(e[0], F.normalize(torch.tensor([0.0, 1.0, 1.0, 0.0]), dim=0))  # the pad is left out
    torch.testing.assert_close(e[1], torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_mismatched_inputs_are_clear_errors():
    with pytest.raises(DataError, match="two \\(N, D\\) tensors of one shape"):
        mean_cosine(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(DataError, match="use 1 <= k < 5"):
        neighbour_overlap(torch.randn(5, 3), torch.randn(5, 3), k=5)
    with pytest.raises(DataError, match="no batches"):
        encode(torch.nn.Identity(), [])

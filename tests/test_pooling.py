from __future__ import annotations

import pytest
import torch

from unime.pooling import finish_embeddings, pool


def _reference(hidden: torch.Tensor, lengths: list[int], left: bool, mode: str) -> torch.Tensor:
    """Per-sample loop: pool each sample's real tokens alone."""
    out = []
    seq = hidden.shape[1]
    for row, length in enumerate(lengths):
        tokens = hidden[row, seq - length :] if left else hidden[row, :length]
        out.append({"last": tokens[-1], "cls": tokens[0], "mean": tokens.mean(0)}[mode])
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["last", "mean", "cls"])
@pytest.mark.parametrize("left", [False, True])
def test_pool_matches_per_sample_reference_under_both_paddings(mode: str, left: bool) -> None:
    torch.manual_seed(0)
    lengths = [5, 2, 7, 1]
    hidden = torch.randn(len(lengths), 7, 3)
    mask = torch.zeros(len(lengths), 7, dtype=torch.long)
    for row, length in enumerate(lengths):
        if left:
            mask[row, 7 - length :] = 1
        else:
            mask[row, :length] = 1
    torch.testing.assert_close(pool(hidden, mask, mode), _reference(hidden, lengths, left, mode))


def test_last_pooling_ignores_padding_states() -> None:
    hidden = torch.zeros(1, 4, 2)
    hidden[0, 1] = torch.tensor([1.0, 2.0])
    hidden[0, 2:] = 99.0  # padding positions: must not leak into the result
    mask = torch.tensor([[1, 1, 0, 0]])
    assert pool(hidden, mask, "last").tolist() == [[1.0, 2.0]]
    assert pool(hidden, mask, "mean").tolist() == [[0.5, 1.0]]


def test_pool_rejects_bad_shapes_modes_and_empty_rows() -> None:
    with pytest.raises(ValueError, match="expects hidden"):
        pool(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="unknown pooling mode"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no real token"):
        pool(torch.zeros(2, 2, 3), torch.tensor([[1, 1], [0, 0]]))


def test_finish_truncates_before_normalising() -> None:
    vectors = torch.tensor([[3.0, 4.0, 12.0]])
    torch.testing.assert_close(finish_embeddings(vectors, normalize=True, truncate_dim=2), torch.tensor([[0.6, 0.8]]))
    torch.testing.assert_close(finish_embeddings(vectors, normalize=True), vectors / 13.0)
    with pytest.raises(ValueError, match="truncate_dim"):
        finish_embeddings(vectors, normalize=False, truncate_dim=4)

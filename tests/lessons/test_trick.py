"""The mathematical trick: versions 1-3 compute the same averages; version 4 (one head) gives
causal weights; the sqrt(head_size) scaling keeps the scores' variance near 1."""

from __future__ import annotations

import pytest
import torch

from tinygpt.lessons.trick import OneHead, score_variance, version1_loops, version2_matmul, version3_softmax


def test_versions_1_to_3_agree():
    x = torch.randn(4, 8, 2, generator=torch.Generator().manual_seed(0))
    v1 = version1_loops(x)
    torch.testing.assert_close(version2_matmul(x), v1)
    torch.testing.assert_close(version3_softmax(x), v1)
    torch.testing.assert_close(v1[:, 0], x[:, 0])  # the first position averages only itself
    torch.testing.assert_close(v1[:, -1], x.mean(dim=1))  # the last one averages everything


def test_version_4_weights_are_causal_averages():
    torch.manual_seed(0)
    head = OneHead(n_embd=32, head_size=16)
    x = torch.randn(3, 8, 32)
    wei = head.weights(x)
    assert wei.shape == (3, 8, 8)
    torch.testing.assert_close(wei.sum(-1), torch.ones(3, 8))
    assert torch.all(wei.triu(1) == 0)  # zeros above the diagonal: no looking ahead
    uniform = torch.tril(torch.ones(8, 8)) / torch.arange(1, 9)[:, None]
    assert not torch.allclose(wei, uniform)  # the weights depend on the data
    assert head(x).shape == (3, 8, 16)
    # Changing the future does not change the past's output.
    y = x.clone()
    y[:, 5:] = torch.randn(3, 3, 32)
    torch.testing.assert_close(head(x)[:, :5], head(y)[:, :5])


@pytest.mark.parametrize("head_size", [16, 64])
def test_scaling_keeps_the_score_variance_near_one(head_size):
    assert score_variance(head_size, scaled=False) == pytest.approx(head_size, rel=0.15)
    assert score_variance(head_size, scaled=True) == pytest.approx(1.0, rel=0.15)

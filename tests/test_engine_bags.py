"""Products as embedding bags (``tinygpt.engine.bags``) and the decode layout built on them."""

import pytest
import torch
import torch.nn.functional as F

from tinygpt.engine.bags import (
    BAG_ROWS,
    MAX_PARTS,
    bag_product,
    bag_table,
    column_parts,
    table_product,
)
from tinygpt.engine.decode import LAYOUT_KERNELS


def float_bag(table, indices, offsets, weights):
    return torch.embedding_bag(table, indices, offsets, False, 0, False, weights, False)[0]


def test_column_parts_cut_evenly_and_keep_rows_wide_enough():
    assert column_parts(1152) == MAX_PARTS == 8
    assert column_parts(65) == 5 and column_parts(67) == 1  # 67 is prime
    assert column_parts(384, min_width=96) == 4  # 8 parts would be 48 wide
    assert column_parts(65, min_width=96) == 1


def test_the_table_holds_each_part_of_the_transposed_weight():
    """table[p * in + i, j] == W[p * w + j, i], entry by entry."""
    w = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)  # (out 6, in 4)
    table = bag_table(w, parts=3)  # parts 2 wide
    assert table.shape == (3 * 4, 2) and table.is_contiguous()
    for p in range(3):
        for i in range(4):
            for j in range(2):
                assert table[p * 4 + i, j] == w[p * 2 + j, i]


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("out,parts", [(24, 1), (24, 4), (24, 8), (65, 5)])
def test_bag_products_are_the_matrix_products(rows, out, parts):
    torch.manual_seed(rows * out + parts)
    w, x = torch.randn(out, 40), torch.randn(3, rows, 40)
    y = bag_product(float_bag, bag_table(w, parts), x, parts, out)
    assert y.shape == (3, rows, out)
    torch.testing.assert_close(y, F.linear(x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 9, 64])
@pytest.mark.parametrize("out,parts", [(24, 1), (24, 4), (65, 5)])
def test_table_products_are_the_matrix_products(rows, out, parts):
    torch.manual_seed(rows * out + parts)
    w, x = torch.randn(out, 40), torch.randn(2, rows, 40)
    y = table_product(bag_table(w, parts), x, parts)
    assert y.shape == (2, rows, out)
    torch.testing.assert_close(y, F.linear(x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2])
def test_the_number_of_parts_does_not_change_a_float32_result(rows):
    """Each output is a sum over the input in the same order whatever the parts: the same bits
    (one row takes its own path, without reordering the output)."""
    torch.manual_seed(rows)
    w, x = torch.randn(48, 64), torch.randn(rows, 64)
    results = [bag_product(float_bag, bag_table(w, p), x, p, 48) for p in (1, 2, 4, 8)]
    for y in results[1:]:
        assert torch.equal(y, results[0])


@pytest.mark.parametrize("rows", [1, BAG_ROWS, BAG_ROWS + 1, 40])
def test_the_bag_layout_multiplies_any_number_of_rows(rows):
    """Up to BAG_ROWS rows go through the bags, more through a plain product: both are x W^T + b."""
    torch.manual_seed(rows)
    w, b, x = torch.randn(65, 32), torch.randn(65), torch.randn(rows, 1, 32)
    run, table = LAYOUT_KERNELS["bag"](w, b)
    assert table.shape == (5 * 32, 13) and table.data_ptr() != w.data_ptr()  # a copy
    torch.testing.assert_close(run(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)

"""The key/value cache protocol of the GPT: sized from its config, and the forward continues
each row where its cache ends exactly as if the whole sequence were run at once."""

import pytest
import torch

from tinygpt.models import GPT, GPTConfig
from tinygpt.models.kv_cache import KVCache


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    base = dict(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return GPT(GPTConfig(**{**base, **kw})).eval()


def test_sized_from_the_config():
    config = GPTConfig(vocab_size=11, block_size=12, n_layer=3, n_head=2, n_embd=16)
    cache = KVCache.for_config(config, batch=4, dtype=torch.float64)
    assert cache.k.shape == cache.v.shape == (3, 4, 2, 12, 8)  # layer, row, head, position, D
    assert cache.k.dtype == torch.float64 and cache.capacity == 12
    assert cache.lengths == [0, 0, 0, 0] and cache.batch == 4
    assert cache.layer(2).k.data_ptr() == cache.k[2].data_ptr()  # a layer's part is a view


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_chunks_through_the_cache_give_the_full_forward(pos):
    model = tiny(pos_embedding=pos)
    idx = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache.for_config(model.config, 2)
        parts = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 4), (4, 5), (5, 9))]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    assert cache.lengths == [9, 9]


def test_rows_at_different_lengths_continue_at_their_own_positions():
    model = tiny(pos_embedding="rope")
    a, b = torch.randint(0, 11, (1, 6)), torch.randint(0, 11, (1, 3))
    with torch.no_grad():
        cache = KVCache.for_config(model.config, 2)
        model(torch.cat([a[:, :5], a[:, :5]]), cache=cache)  # both rows 5 long...
        cache.lengths = [5, 2]  # ...then row 1 forgets 3: its keys after 2 are padding now
        both, _ = model(torch.cat([a[:, 5:], b[:, 2:]]), cache=cache)
        alone_a, _ = model(a)
        alone_b, _ = model(torch.cat([a[:, :2], b[:, 2:]], dim=1))
    torch.testing.assert_close(both[0, -1], alone_a[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1, -1], alone_b[0, -1], atol=1e-5, rtol=0)
    assert cache.lengths == [6, 3]


def test_the_cache_refuses_more_than_it_holds():
    model = tiny()
    cache = KVCache.for_config(model.config, 1)
    with torch.no_grad():
        model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="exceeds block_size"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)

"""The generation engine: key/value cache, batched and streamed sampling, stop strings, CLI."""

import math

import pytest
import torch

from tinygpt import cli
from tinygpt.checkpoint import save_checkpoint
from tinygpt.engine import Engine
from tinygpt.generate import SamplingConfig, generate_tokens, make_generator
from tinygpt.models import GPT, BigramConfig, BigramLM, GPTConfig
from tinygpt.models.kv_cache import KVCache
from tinygpt.sequence import TextStream, generate_text, stream
from tinygpt.tokenizer import CharTokenizer

BS = 8  # block size of the test models: every test crosses it
TOK = CharTokenizer("abcdefghijk")  # 11 characters


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: a second thread only adds synchronisation (and the test machine is shared).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_gpt(pos="learned", seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=11, block_size=BS, n_layer=2, n_head=2, n_embd=16, dropout=0.0,
               pos_embedding=pos)
    model = GPT(GPTConfig(**{**cfg, **kw}))
    with torch.no_grad():  # sharper distributions than the init's near-uniform ones
        model.lm_head.weight.mul_(30)
    return model.eval()


@pytest.fixture(params=["learned", "rope"])
def gpt(request) -> GPT:
    return make_gpt(request.param)


def reference_logits(model, tokens, block_size=BS) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor([tokens[-block_size:]]))
    return logits[0, -1]


# --- the cache gives the reference's logits -------------------------------------------------


@pytest.mark.parametrize("prompt", [[3], [1, 2, 3, 4, 5], list(range(8)), [1, 2] * 7])
def test_cached_greedy_matches_reference_across_the_block_boundary(gpt, prompt):
    """With window_shift=1 (the lecture's crop at every step) the cache is exact, too."""
    engine = Engine(gpt, window_shift=1)
    state = engine.new_sequence(prompt)
    for _ in range(3 * BS):  # the window fills, then slides
        logits = engine.step([state])[0]
        torch.testing.assert_close(logits, reference_logits(gpt, state.tokens), atol=1e-5, rtol=0)
        engine.append(state, int(logits.argmax()))
    idx = torch.tensor([prompt])
    ref = generate_tokens(gpt, idx, 3 * BS, SamplingConfig(temperature=0), None, BS, 1)
    assert state.tokens[len(prompt):] == [int(t[0]) for t in ref]


@pytest.mark.parametrize("shift", [None, 1, 3, BS])
@pytest.mark.parametrize("prompt", [[3], list(range(8)), [1, 2] * 7])
def test_cached_uncached_and_reference_agree_for_every_window_shift(gpt, prompt, shift):
    """Greedy tokens equal and logits within 1e-5 at every step, across several window slides."""
    cached, uncached = Engine(gpt, window_shift=shift), Engine(gpt, False, window_shift=shift)
    a, b = cached.new_sequence(prompt), uncached.new_sequence(prompt)
    for _ in range(4 * BS):
        la, lb = cached.step([a])[0], uncached.step([b])[0]
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)
        cached.append(a, int(la.argmax()))
        uncached.append(b, int(lb.argmax()))
    assert a.tokens == b.tokens
    ref = generate_tokens(gpt, torch.tensor([prompt]), 4 * BS, SamplingConfig(temperature=0),
                          None, BS, shift)
    assert a.tokens[len(prompt):] == [int(t[0]) for t in ref]


def test_uncached_engine_is_the_reference(gpt):
    engine = Engine(gpt, use_cache=False, window_shift=1)
    assert not engine.use_cache
    state = engine.new_sequence([4, 2])
    for _ in range(2 * BS):
        logits = engine.step([state])[0]
        torch.testing.assert_close(logits, reference_logits(gpt, state.tokens), atol=0, rtol=0)
        engine.append(state, int(logits.argmax()))


def test_bigram_goes_through_the_engine():
    torch.manual_seed(0)
    model = BigramLM(BigramConfig(vocab_size=11)).eval()
    for use_cache in (True, False):
        engine = Engine(model, use_cache)
        assert engine.block_size == 1 and not engine.use_cache  # nothing to cache
        state = engine.new_sequence([1, 2, 3])
        for _ in range(10):
            logits = engine.step([state])[0]
            torch.testing.assert_close(logits, model.token_embedding_table.weight[state.tokens[-1]])
            engine.append(state, int(logits.argmax()))
    text = generate_text(model, TOK, "abc", 20, SamplingConfig(temperature=0.8), seed=5)[0]
    ref = generate_tokens(model, torch.tensor([TOK.encode("abc")]), 20,
                          SamplingConfig(temperature=0.8), make_generator(5), 1)
    assert text == TOK.decode(int(t[0]) for t in ref)


def test_non_causal_model_is_recomputed_not_cached():
    model = make_gpt(causal=False)
    engine = Engine(model)
    assert not engine.use_cache
    state = engine.new_sequence([1, 2, 3])
    torch.testing.assert_close(engine.step([state])[0], reference_logits(model, state.tokens))
    with pytest.raises(ValueError, match="causal"):
        model(torch.tensor([[1]]), cache=KVCache.for_config(model.config, 1))


def test_mixed_length_batch_equals_each_state_alone(gpt):
    """Continuous batching: states join and leave between steps, at different lengths."""
    prompts = [[1], [2, 3, 4, 5, 6], [7] * 11, [8, 9]]
    batched, alone = Engine(gpt, window_shift=1), Engine(gpt, window_shift=1)
    bs = [batched.new_sequence(p) for p in prompts]
    al = [alone.new_sequence(p) for p in prompts]
    schedule = [[0, 1], [0, 1], [1, 0, 2], [0, 1, 2], [0, 1, 2, 3], [2, 3, 0], [1, 3]]
    schedule += [[0, 1, 2, 3]] * 12 + [[3, 1]] * 3
    for step, members in enumerate(schedule):
        logits = batched.step([bs[i] for i in members])
        assert logits.shape == (len(members), 11) and logits.dtype == torch.float32
        for row, i in enumerate(members):
            single = alone.step([al[i]])[0]
            torch.testing.assert_close(logits[row], single, atol=1e-5, rtol=0)
            torch.testing.assert_close(logits[row], reference_logits(gpt, bs[i].tokens),
                                       atol=1e-5, rtol=0)
            token = (int(single.argmax()) + step) % 11
            batched.append(bs[i], token)
            alone.append(al[i], token)


def test_several_new_tokens_and_repeated_steps(gpt):
    engine = Engine(gpt, window_shift=1)
    state = engine.new_sequence([1, 2])
    first = engine.step([state])
    torch.testing.assert_close(engine.step([state]), first)  # nothing new: same answer
    for t in (3, 4, 5):  # three tokens at once: fed as one chunk
        engine.append(state, t)
    torch.testing.assert_close(engine.step([state])[0], reference_logits(gpt, state.tokens),
                               atol=1e-5, rtol=0)
    for t in range(6):  # outgrows the block: re-prefilled
        engine.append(state, t)
    torch.testing.assert_close(engine.step([state])[0], reference_logits(gpt, state.tokens),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift", [1, 3, BS])
def test_window_shift_recomputes_less_often(gpt, shift):
    """shift > 1: on overflow keep the last BS - shift + 1 tokens, then decode from the cache."""
    engine = Engine(gpt, window_shift=shift)
    state = engine.new_sequence([1, 2, 3])
    start = 0
    for _ in range(4 * BS):
        n = len(state.tokens)
        if n - start > BS:
            start = n - (BS - shift + 1)
        logits = engine.step([state])[0]
        torch.testing.assert_close(logits, reference_logits(gpt, state.tokens[start:]),
                                   atol=1e-5, rtol=0)
        engine.append(state, int(logits.argmax()))


def test_engine_rejects_bad_input(gpt):
    engine = Engine(gpt)
    with pytest.raises(ValueError, match="at least one token"):
        engine.new_sequence([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.new_sequence([1, 11])
    s = engine.new_sequence([1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.append(s, -1)
    with pytest.raises(ValueError, match="twice"):
        engine.step([s, s])
    with pytest.raises(ValueError, match="this engine"):
        engine.step([Engine(gpt).new_sequence([1])])
    for bad in (0, BS + 1, 1.5, True):
        with pytest.raises(ValueError, match="window_shift"):
            Engine(gpt, window_shift=bad)
    assert engine.step([]).shape == (0, 11)


def test_training_mode_is_restored_and_dropout_is_off_while_generating():
    model = make_gpt(dropout=0.5)
    model.train()
    engine = Engine(model)
    s = engine.new_sequence([1, 2, 3])
    a = engine.step([s])[0]
    assert model.training
    torch.testing.assert_close(a, reference_logits(model.eval(), s.tokens), atol=1e-5, rtol=0)


# --- sampling ------------------------------------------------------------------------------


def fixed_logits_model(row: list[float]) -> BigramLM:
    """A bigram model whose next-token logits are ``row`` whatever the context."""
    model = BigramLM(BigramConfig(vocab_size=len(row)))
    with torch.no_grad():
        model.token_embedding_table.weight.copy_(torch.tensor(row).expand(len(row), -1))
    return model.eval()


def test_top_k_1_equals_greedy(gpt):
    greedy = generate_text(gpt, TOK, "abc", 30, SamplingConfig(temperature=0))
    top1 = generate_text(gpt, TOK, "abc", 30, SamplingConfig(temperature=1.5, top_k=1), seed=9)
    assert top1 == greedy


def test_top_k_keeps_exactly_k_even_with_ties():
    model = fixed_logits_model([3.0, 3.0, 3.0, 3.0] + [0.0] * 7)  # four tied favourites
    for k in (1, 2, 3):
        text = generate_text(model, TOK, "a", 300, SamplingConfig(top_k=k), seed=1)[0]
        assert len(set(text)) == k


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = [0.5, 0.3, 0.15, 0.05] + [0.0] * 7
    model = fixed_logits_model([math.log(p) if p else -1e9 for p in probs])
    for p, nucleus in ((0.4, "a"), (0.75, "ab"), (0.85, "abc"), (1.0, "abcd")):
        text = generate_text(model, TOK, "a", 400, SamplingConfig(top_p=p), seed=2)[0]
        assert set(text) == set(nucleus), p


def test_same_seed_same_text_other_seed_other_text(gpt):
    sampling = SamplingConfig(temperature=1.0)
    a = generate_text(gpt, TOK, "ab", 40, sampling, seed=11)
    assert generate_text(gpt, TOK, "ab", 40, sampling, seed=11) == a
    assert generate_text(gpt, TOK, "ab", 40, sampling, seed=12) != a


@pytest.mark.parametrize(
    "sampling", [SamplingConfig(temperature=1.0), SamplingConfig(0.8, top_k=4, top_p=0.9)]
)
def test_batched_samples_equal_one_by_one(gpt, sampling):
    stop = ("kk", "jj")  # rows finish at different steps and leave the batch
    batch = generate_text(gpt, TOK, "abc", 3 * BS, sampling, num_samples=5, seed=100, stop=stop)
    alone = [generate_text(gpt, TOK, "abc", 3 * BS, sampling, seed=100 + i, stop=stop)[0]
             for i in range(5)]
    assert batch == alone
    assert len(set(batch)) > 1


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_cached_text_equals_uncached_and_generate_tokens(pos):
    model = make_gpt(pos, seed=3)
    sampling = SamplingConfig(temperature=1.0, top_k=6)
    cached = generate_text(model, TOK, "ab", 4 * BS, sampling, num_samples=3, seed=7)
    uncached = generate_text(model, TOK, "ab", 4 * BS, sampling, num_samples=3, seed=7,
                             use_cache=False)
    assert cached == uncached
    for i, text in enumerate(cached):
        ref = generate_tokens(model, torch.tensor([TOK.encode("ab")]), 4 * BS, sampling,
                              make_generator(7 + i), BS)
        assert text == TOK.decode(int(t[0]) for t in ref)


def test_stream_yields_pieces_as_they_come(gpt):
    pieces = list(stream(gpt, TOK, "ab", 20, SamplingConfig(), num_samples=2, seed=1))
    texts = generate_text(gpt, TOK, "ab", 20, SamplingConfig(), num_samples=2, seed=1)
    for i in range(2):
        mine = [p for p in pieces if p.sample == i]
        assert len(mine) >= 20  # one piece per character, then the end
        assert "".join(p.text for p in mine) == texts[i] and len(texts[i]) == 20
        assert [p.finish for p in mine].count("length") == 1 and mine[-1].finish == "length"
    # Pieces of the two samples interleave: they are decoded together.
    assert {p.sample for p in pieces[:4]} == {0, 1}


def test_stop_string_ends_the_text_where_it_first_occurs(gpt):
    sampling = SamplingConfig(temperature=1.0)
    full = generate_text(gpt, TOK, "a", 60, sampling, seed=4)[0]
    stop = full[20:22]  # occurs at 20 or earlier
    cut = full.find(stop)
    for use_cache in (True, False):
        pieces = list(stream(gpt, TOK, "a", 60, sampling, seed=4, stop=[stop],
                             use_cache=use_cache))
        assert "".join(p.text for p in pieces) == full[:cut]
        assert pieces[-1].finish == "stop"
    # Two stop strings: whichever appears first.
    other = full[10]
    text = generate_text(gpt, TOK, "a", 60, sampling, seed=4, stop=[stop, other])[0]
    assert text == full[: min(cut, full.find(other))]
    # A stop string that never appears changes nothing.
    assert generate_text(gpt, TOK, "a", 60, sampling, seed=4, stop=["abcdefgh"])[0] == full


def test_text_stream_holds_back_a_possible_stop_string():
    ts = TextStream(["END", "ENOUGH"])
    assert [ts.feed(c) for c in "abE"] == ["a", "b", ""]
    assert ts.feed("N") == ""  # "EN" might still become END or ENOUGH
    assert ts.feed("x") == "ENx" and not ts.stopped
    assert ts.feed("yEND") == "y" and ts.stopped
    assert ts.feed("more") == "" and ts.text == "abENxy"
    ts = TextStream(["xyz"])
    assert ts.feed("abxy") == "ab" and ts.finish() == "xy" and ts.text == "abxy"
    # When several stop strings complete together, the text ends at the longest.
    ts = TextStream(["c", "abc"])
    assert ts.feed("1ab") == "1" and ts.feed("c") == "" and ts.text == "1"
    with pytest.raises(ValueError, match="non-empty"):
        TextStream([""])


def test_stream_rejects_bad_settings(gpt):
    for kw, match in (
        ({"num_samples": 0}, "num_samples"),
        ({"seed": "x"}, "seed"),
        ({"stop": [""]}, "stop strings"),
        ({"window_shift": 0}, "window_shift"),
    ):
        with pytest.raises(ValueError, match=match):
            list(stream(gpt, TOK, "a", 5, **kw))
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(stream(gpt, TOK, "a", -1))


# --- CLI -----------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    """A checkpoint of a small random rotary GPT over the characters of TOK."""
    model = make_gpt("rope", seed=5)
    state = {"model": "gpt", "model_config": model.config.to_dict(),
             "tokenizer": TOK.to_dict(), "step": 0}
    save_checkpoint(tmp_path / "run" / "best", model, None, state)
    return tmp_path / "run"


@pytest.mark.slow  # 10-30 s on a 2-core AVX2 machine
def test_cli_cached_and_no_cache_give_the_same_text(cli, run_dir):
    args = ["sample", run_dir, "--prompt", "abc", "--num-chars", 3 * BS, "--seed", 3,
            "--num-samples", 3, "--top-k", 5]
    fast = cli(*args, "--verbose", check=True)
    slow = cli(*args, "--no-cache", check=True)
    assert fast.stdout == slow.stdout
    lines = fast.stdout.splitlines()
    assert lines[0::2] == ["--- sample 1 ---", "--- sample 2 ---", "--- sample 3 ---"]
    assert all(line.startswith("abc") and len(line) == 3 + 3 * BS for line in lines[1::2])
    assert "chars/s" in fast.stderr and "chars/s" not in slow.stderr
    # Sample i is what seed + i gives on its own.
    second = cli("sample", run_dir, "--prompt", "abc", "--num-chars", 3 * BS, "--seed", 4,
                 "--top-k", 5, check=True)
    assert second.stdout == lines[3] + "\n"


def test_cli_stop(cli, run_dir):
    base = ["sample", run_dir, "--prompt", "a", "--num-chars", 40, "--seed", 8]
    full = cli(*base, check=True).stdout[1:-1]  # without the prompt and the final newline
    stop = full[15:17]
    out = cli(*base, "--stop", stop, "--stop", "zzz", check=True).stdout
    assert out == "a" + full[: full.find(stop)] + "\n"


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--stop", ""], "--stop must be"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--window-shift", "0"], "--window-shift must be >= 1"),
        (["--window-shift", str(BS + 1)], "at most the context length"),
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--prompt", "xyz!"], "does not know"),
    ],
)
def test_cli_bad_values_exit_2_with_one_line(run_dir, capsys, flags, match):
    code = cli.main(["sample", str(run_dir), "--prompt", "a", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert match in err and err.count("\n") == 1 and err.startswith("tinygpt sample: error:")

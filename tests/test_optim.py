import copy
import math

import pytest
import torch

import tinygpt.optim as optim
from tinygpt.models import GPT, BigramConfig, BigramLM, GPTConfig
from tinygpt.optim import (
    Muon,
    batch_size_at,
    build_optimizer,
    lr_factor,
    newton_schulz,
    split_parameters,
    tokens_seen,
)


def tiny_gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, **kw))


@pytest.mark.parametrize("kind", ["adamw", "muon"])
@pytest.mark.parametrize("bias", [True, False])
def test_every_parameter_is_in_exactly_one_group(kind, bias):
    model = tiny_gpt(bias=bias)
    opt = build_optimizer(model, kind)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}


def test_muon_gets_the_block_matrices_and_adamw_the_rest():
    model = tiny_gpt()
    parts = split_parameters(model)
    names = {k: {n for n, _ in v} for k, v in parts.items()}
    assert "blocks.0.attn.c_attn.weight" in names["matrices"]
    assert "blocks.1.mlp.c_proj.weight" in names["matrices"]
    assert {"wte.weight", "wpe.weight", "lm_head.weight"} <= names["embeddings"]
    assert "blocks.0.ln_1.weight" in names["gains"] and "blocks.0.attn.c_attn.bias" in names["gains"]
    opt = build_optimizer(model, "muon")
    muon_params = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    assert muon_params == {id(p) for _, p in parts["matrices"]}
    assert all(p.dim() == 2 for g in opt.optimizers["muon"].param_groups for p in g["params"])


def test_muon_on_a_bigram_has_nothing_to_do():
    opt = build_optimizer(BigramLM(BigramConfig(vocab_size=5)), "muon")
    assert set(opt.optimizers) == {"adamw"}


def test_muon_trains_and_state_round_trips():
    model = tiny_gpt()
    opt = build_optimizer(model, "muon", lr=3e-3, muon_lr=0.02)
    x = torch.randint(0, 11, (4, 8))
    losses = []
    for _ in range(40):
        _, loss = model(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    other = build_optimizer(tiny_gpt(), "muon")
    other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="expected"):
        build_optimizer(tiny_gpt(), "adamw").load_state_dict(opt.state_dict())


def test_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(tiny_gpt(), "sgd")


def test_cosine_factor():
    assert lr_factor("cosine", 0, 0.0, 4, 0.1) == pytest.approx(0.25)
    assert lr_factor("cosine", 3, 0.0, 4, 0.1) == pytest.approx(1.0)
    assert lr_factor("cosine", 10, 0.5, 4, 0.1) == pytest.approx(0.55)
    assert lr_factor("cosine", 10, 1.0, 4, 0.1) == pytest.approx(0.1)


def test_cosine_is_monotone_after_warmup():
    values = [lr_factor("cosine", s, (s - 10) / 90, 10, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.1)


def test_wsd_factor_is_flat_then_decays_linearly_to_the_end_value():
    f = lambda p: lr_factor("wsd", 100, p, 10, 0.0, decay_fraction=0.2)  # noqa: E731
    assert f(0.0) == f(0.5) == f(0.8) == 1.0
    assert f(0.9) == pytest.approx(0.5)
    assert f(1.0) == pytest.approx(0.0)
    assert f(1.7) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor("step", 100, 0.5, 10, 0.0)


def test_batch_warmup_grows_in_multiples_of_the_start():
    sizes = [batch_size_at(s, 32, 8, 300) for s in range(400)]
    assert sizes[:100] == [8] * 100 and sizes[100:200] == [16] * 100
    assert sizes[200:300] == [24] * 100 and sizes[300:] == [32] * 100
    # 16 -> 32: the first multiple above 16 is the full batch, reached at the end of the warmup.
    assert {batch_size_at(s, 32, 16, 200) for s in range(200)} == {16}
    assert batch_size_at(200, 32, 16, 200) == 32
    # A size that is no multiple of the start: the last stage is the full batch.
    assert [batch_size_at(s, 20, 8, 12) for s in (0, 7, 8, 11, 12)] == [8, 8, 16, 16, 20]


@pytest.mark.parametrize("start, warmup", [(None, 100), (32, 100), (8, 0)])
def test_no_batch_warmup(start, warmup):
    assert {batch_size_at(s, 32, start, warmup) for s in range(150)} == {32}


@pytest.mark.parametrize("start, warmup", [(None, 0), (8, 300), (5, 7), (16, 200)])
def test_tokens_seen_is_the_sum_of_the_batches(start, warmup):
    for step in (0, 1, 6, 7, 150, 299, 300, 450):
        expected = sum(batch_size_at(s, 32, start, warmup) for s in range(step)) * 64
        assert tokens_seen(step, 32, start, warmup, 64) == expected


# --- Muon -------------------------------------------------------------------------------------

# Shapes as in a GPT block (c_attn, attn c_proj, c_fc, mlp c_proj), twice, small.
MUON_SHAPES = [(48, 16), (16, 16), (64, 16), (16, 64)] * 2


def reference_muon_step(p, grad, buf, lr, momentum=0.95, weight_decay=0.0):
    """One Muon step on one matrix, written out plainly in float32 (the update's definition)."""
    a, b, c = 3.4445, -4.775, 2.0315
    buf = momentum * buf + (1 - momentum) * grad
    update = (1 - momentum) * grad + momentum * buf  # Nesterov
    tall = p.shape[0] > p.shape[1]
    X = update.T if tall else update
    X = X / X.norm()
    for _ in range(5):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    X = X.T if tall else X
    scale = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
    return p * (1 - lr * weight_decay) - lr * scale * X, buf


def muon_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(0.1 * torch.randn(*s, generator=g)) for s in MUON_SHAPES]


def random_grads(step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(*s, generator=g) for s in MUON_SHAPES]


# The direct order must reproduce the reference to rounding (1e-6). The default float32 step
# takes the Gram order on wide stacks (see test_gram_order_computes_the_same_iterations): its
# orthogonalised updates differ by under 2e-3 of their size (entries of ~0.2 here), and a step
# moves a matrix by lr (0.02) times that, so after three steps every entry is within 3e-5.
@pytest.mark.parametrize("gram, atol", [(False, 1e-6), (None, 3e-5)], ids=["direct", "default"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_muon_float32_steps_equal_a_per_matrix_reference(weight_decay, gram, atol):
    params = muon_params()
    opt = Muon(params, lr=0.02, weight_decay=weight_decay, ns_dtype=torch.float32, gram=gram)
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for step in range(3):
        grads = random_grads(step)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads):
            ref[i], bufs[i] = reference_muon_step(ref[i], g, bufs[i], 0.02, weight_decay=weight_decay)
        for p, r, buf in zip(params, ref, bufs):
            torch.testing.assert_close(p.detach(), r, atol=atol, rtol=0)
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], buf, atol=1e-6, rtol=0)


def ill_conditioned(n_stack, m, n, smallest, dtype=torch.float64, seed=0):
    """(n_stack, m, n) matrices with singular values spread from 1 down to ``smallest``."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n_stack, m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n_stack, n, m, generator=g, dtype=torch.float64))
    return ((U * torch.logspace(0, math.log10(smallest), m, dtype=torch.float64)) @ V.mT).to(dtype)


def relative_error(x, exact):
    return ((x.double() - exact).norm() / exact.norm()).item()


@pytest.mark.parametrize("kind, value", [("smallest", 1e-1), ("smallest", 1e-4), ("smallest", 1e-7),
                                         ("rank", 1), ("rank", 4)])
def test_gram_order_computes_the_same_iterations(kind, value):
    """``newton_schulz_gram`` multiplies in another order, so it must land on the direct order's
    result up to rounding; the yardstick is the direct order in float64. In float64 the two
    agree to 1e-10. In float32 the Gram matrix squares the condition number, so the Gram order
    drifts further than the direct one: measured up to 7e-4 of the update's size (direct:
    1e-5) for singular values spread down to 1e-7, against 1e-2 to 1.6 for the direct order in
    bfloat16 (what torch.optim.Muon uses). Bounds: 2e-3 of the update, and under a twentieth of
    bfloat16's error. A wrong product is off by the update's own size."""
    if kind == "smallest":
        G = ill_conditioned(4, 32, 128, value)
    else:  # exactly low rank, like a gradient from a few tokens
        g = torch.Generator().manual_seed(value)
        G = (torch.randn(4, 32, value, generator=g, dtype=torch.float64)
             @ torch.randn(4, value, 128, generator=g, dtype=torch.float64))
    exact = newton_schulz(G, dtype=torch.float64)
    torch.testing.assert_close(newton_schulz(G, dtype=torch.float64, gram=True), exact,
                               atol=1e-10, rtol=0)
    gram32 = relative_error(newton_schulz(G.float(), gram=True), exact)
    bf16 = relative_error(newton_schulz(G, dtype=torch.bfloat16), exact)
    assert gram32 < 2e-3
    assert gram32 < bf16 / 20


def test_gram_order_with_no_steps_returns_the_normalised_input():
    G = torch.randn(2, 8, 32)
    torch.testing.assert_close(newton_schulz(G, steps=0, gram=True), newton_schulz(G, steps=0))


def test_muon_takes_the_gram_order_for_wide_float32_stacks_only(monkeypatch):
    """Wide (n >= 2m) stacks in float32 take the Gram order; square ones, bfloat16, and
    ``gram=False`` the direct one; ``gram=True`` forces it everywhere."""
    seen = []

    def spy(G, steps, coefficients, eps, dtype, gram):
        seen.append((tuple(G.shape[1:]), dtype, gram))
        return newton_schulz(G, steps, coefficients, eps, dtype, gram)

    monkeypatch.setattr(optim, "newton_schulz", spy)
    for ns_dtype, gram in ((torch.float32, None), (torch.bfloat16, None), (torch.float32, False),
                           (torch.float32, True)):
        params = muon_params()
        for p, g in zip(params, random_grads(0)):
            p.grad = g
        Muon(params, ns_dtype=ns_dtype, gram=gram).step()
    assert sorted(seen[0:3]) == [((16, 16), torch.float32, False), ((16, 48), torch.float32, True),
                                 ((16, 64), torch.float32, True)]
    assert {s[2] for s in seen[3:6]} == {False}
    assert {s[2] for s in seen[6:9]} == {False}
    assert {s[2] for s in seen[9:12]} == {True}


def test_muon_stacks_matrices_of_one_shape_into_one_newton_schulz_call(monkeypatch):
    calls = []

    def spy(G, *args):
        calls.append(tuple(G.shape))
        return newton_schulz(G, *args)

    monkeypatch.setattr(optim, "newton_schulz", spy)
    params = muon_params()
    opt = Muon(params, ns_dtype=torch.float32)
    for p, g in zip(params, random_grads(0)):
        p.grad = g
    opt.step()
    # Tall matrices go in transposed: (48, 16) -> (16, 48), (64, 16) joins (16, 64).
    assert sorted(calls) == [(2, 16, 16), (2, 16, 48), (4, 16, 64)]


def relative_gap(params, others, start):
    """|difference| of two runs over the distance the second moved (whole parameter set)."""
    gap = sum((p.detach() - q.detach()).pow(2).sum() for p, q in zip(params, others)).sqrt()
    moved = sum((q.detach() - s).pow(2).sum() for q, s in zip(others, start)).sqrt()
    return (gap / moved).item()


@pytest.mark.parametrize("ns_dtype", [torch.float32, torch.bfloat16])
def test_muon_stays_close_to_torch_muon(ns_dtype):
    """torch.optim.Muon always iterates in bfloat16 (8 significant bits: each product rounds at
    ~0.4%, and fifteen products compound to about 1% of the update), so float32 iterations
    differ from it by about 1% of the distance moved; bfloat16 ones by rounding order only.
    The bound, 3% of the distance moved after 4 steps, holds both with room to spare."""
    params = muon_params()
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    start = [p.detach().clone() for p in params]
    ours = Muon(params, lr=0.02, ns_dtype=ns_dtype)
    stock = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    for step in range(4):
        for p, q, g in zip(params, theirs, random_grads(step)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        stock.step()
    assert relative_gap(params, theirs, start) < 0.03


def test_orthogonalised_update_has_singular_values_near_one():
    """The quintic's slope at 0 is 3.4 and it oscillates around 1 rather than converging, so
    after 5 steps singular values lie in about [0.7, 1.15] (not exactly 1): the band is
    [0.6, 1.25], while the gradient's own singular values spread over a factor > 2."""
    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 32, 128, generator=g) * torch.logspace(0, 1, 128)  # uneven columns
    raw = torch.linalg.svdvals(G)
    assert (raw.max(-1).values / raw.min(-1).values > 2).all()
    for dtype in (torch.float32, torch.bfloat16):
        s = torch.linalg.svdvals(newton_schulz(G, dtype=dtype).float())
        assert 0.6 < s.min() and s.max() < 1.25, (dtype, s.min(), s.max())


@pytest.mark.parametrize("forced, expected", [("1", torch.bfloat16), ("0", torch.float32)])
def test_muon_iterates_in_bf16_only_where_native(monkeypatch, forced, expected):
    monkeypatch.setenv("TINYGPT_NATIVE_BF16", forced)
    seen = []

    def spy(G, steps, coefficients, eps, dtype, gram):
        seen.append(dtype)
        return newton_schulz(G, steps, coefficients, eps, dtype, gram)

    monkeypatch.setattr(optim, "newton_schulz", spy)
    auto = muon_params()
    fixed = muon_params()
    opt = Muon(auto, lr=0.02)  # ns_dtype None: ask native_bf16
    assert opt.iteration_dtype(torch.device("cpu")) == expected
    explicit = Muon(fixed, lr=0.02, ns_dtype=expected)
    for p, q, g in zip(auto, fixed, random_grads(0)):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    explicit.step()
    assert set(seen) == {expected}
    for p, q in zip(auto, fixed):
        assert torch.equal(p, q)


def test_an_explicit_precision_overrides_the_device(monkeypatch):
    monkeypatch.setenv("TINYGPT_NATIVE_BF16", "1")
    opt = build_optimizer(tiny_gpt(), "muon", muon_ns_dtype=torch.float32)
    assert opt.optimizers["muon"].iteration_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setenv("TINYGPT_NATIVE_BF16", "0")
    opt = build_optimizer(tiny_gpt(), "muon", muon_ns_dtype=torch.bfloat16)
    assert opt.optimizers["muon"].iteration_dtype(torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon(muon_params(), ns_dtype=torch.float16)
    with pytest.raises(ValueError, match="gram"):
        Muon(muon_params(), gram="yes")


def train_steps(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 8), generator=g)
        _, loss = model(x, x)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_a_run_saved_with_torch_muon_resumes_with_the_same_momentum():
    """optimizer.pt of a run trained with torch.optim.Muon loads into tinygpt's Muon: the same
    momentum buffers, and the next step is the reference update from them."""
    old_model = tiny_gpt()
    old = build_optimizer(old_model, "muon")
    matrices = old.optimizers["muon"].param_groups[0]["params"]
    old.optimizers["muon"] = torch.optim.Muon(
        [{"params": matrices, "base_lr": 0.02}], lr=0.02, weight_decay=0.0, adjust_lr_fn="original")
    train_steps(old_model, old, 3, seed=1)
    saved = copy.deepcopy(old.state_dict())

    new_model = copy.deepcopy(old_model)
    new = build_optimizer(new_model, "muon", muon_ns_dtype=torch.float32)
    new.load_state_dict(saved)
    muon = new.optimizers["muon"]
    muon.gram = False  # the reference multiplies in the direct order
    new_matrices = muon.param_groups[0]["params"]
    for p, q in zip(new_matrices, matrices):
        assert torch.equal(muon.state[p]["momentum_buffer"],
                           old.optimizers["muon"].state[q]["momentum_buffer"])
    assert muon.param_groups[0]["base_lr"] == 0.02

    before = [p.detach().clone() for p in new_matrices]
    bufs = [muon.state[p]["momentum_buffer"].clone() for p in new_matrices]
    train_steps(new_model, new, 1, seed=2)
    grads = [p.grad for p in new_matrices]
    for p, b, g, buf in zip(new_matrices, before, grads, bufs):
        expected, _ = reference_muon_step(b, g, buf, muon.param_groups[0]["lr"])
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)
    # And the way back: tinygpt's state loads into torch.optim.Muon.
    torch.optim.Muon(matrices, adjust_lr_fn="original").load_state_dict(muon.state_dict())


def test_a_muon_state_that_does_not_fit_is_refused_in_one_line():
    model = tiny_gpt()
    opt = build_optimizer(model, "muon")
    train_steps(model, opt, 1, seed=0)
    state = copy.deepcopy(opt.state_dict()["muon"])
    del state["param_groups"][0]["ns_steps"]
    with pytest.raises(ValueError, match="lacks the settings ns_steps"):
        build_optimizer(tiny_gpt(), "muon").optimizers["muon"].load_state_dict(state)
    state = copy.deepcopy(opt.state_dict()["muon"])
    state["state"][0]["momentum_buffer"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="momentum buffer of shape"):
        build_optimizer(tiny_gpt(), "muon").optimizers["muon"].load_state_dict(state)
    state = copy.deepcopy(opt.state_dict()["muon"])
    state["param_groups"][0]["adjust_lr_fn"] = "match_rms_adamw"
    with pytest.raises(ValueError, match="only 'original'"):
        build_optimizer(tiny_gpt(), "muon").optimizers["muon"].load_state_dict(state)

"""Decoding from k gathered decoder rows equals the dense scatter-and-multiply, values and gradients."""

import pytest
import torch

from train import sparse_decode
from train.sparse_decode import GatheredRowsSum, SkippedPairs, decode_sparse_rows, decode_topk, dense_decode


def _case(tokens=37, d_in=24, d_sae=96, k=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(tokens, d_sae, generator=g, dtype=dtype)
    values, indices = pre.topk(k, dim=-1, sorted=False)
    W = torch.randn(d_sae, d_in, generator=g, dtype=dtype)
    b = torch.randn(d_in, generator=g, dtype=dtype)
    grad = torch.randn(tokens, d_in, generator=g, dtype=dtype)
    return values, indices, W, b, grad


def _grads(fn, values, indices, W, b, grad):
    v, w, bb = (t.clone().requires_grad_() for t in (values, W, b))
    out = fn(v, indices, w, bb)
    out.backward(grad)
    return out.detach(), v.grad, w.grad, bb.grad


@pytest.mark.parametrize("shape", [dict(d_in=24, d_sae=96, k=5), dict(d_in=40, d_sae=17, k=3),
                                   dict(d_in=8, d_sae=64, k=1)])
def test_gathered_decode_equals_dense_decode_and_its_gradients(shape):
    case = _case(**shape)
    ref = _grads(lambda v, i, w, b: dense_decode(v, i, w) + b, *case)
    got = _grads(lambda v, i, w, b: decode_topk(v, i, w, b, route="gathered"), *case)
    for name, r, o in zip(("x_hat", "values", "W_dec", "b_dec"), ref, got):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12, msg=name)


def test_rows_no_token_chose_get_no_gradient_and_repeated_rows_accumulate():
    values, indices, W, b, grad = _case(tokens=6, d_in=4, d_sae=10, k=2)
    indices = torch.tensor([[0, 3], [3, 0], [0, 3], [7, 3], [0, 7], [3, 7]])
    _, _, w_grad, _ = _grads(lambda v, i, w, b: decode_topk(v, i, w, b, route="gathered"), values, indices, W, b, grad)
    unused = [r for r in range(10) if r not in (0, 3, 7)]
    assert torch.equal(w_grad[unused], torch.zeros(len(unused), 4, dtype=W.dtype))
    expected_row3 = sum(values[t, j] * grad[t] for t in range(6) for j in range(2) if indices[t, j] == 3)
    torch.testing.assert_close(w_grad[3], expected_row3)


def test_variable_rows_as_batchtopk_selects_them_equal_the_dense_decode():
    g = torch.Generator().manual_seed(3)
    tokens, d_in, d_sae = 9, 12, 30
    pre = torch.randn(tokens, d_sae, generator=g, dtype=torch.float64)
    values, flat = pre.flatten().topk(4 * tokens)  # uneven per token; some tokens may get none
    W = torch.randn(d_sae, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_in, generator=g, dtype=torch.float64)
    grad = torch.randn(tokens, d_in, generator=g, dtype=torch.float64)

    def dense(v, w, bb):
        return torch.zeros(tokens * d_sae, dtype=v.dtype).scatter(0, flat, v).view(tokens, d_sae) @ w + bb

    outs = []
    for fn in (dense, lambda v, w, bb: decode_sparse_rows(v, flat, tokens, w, bb, route="gathered")):
        v, w, bb = (t.clone().requires_grad_() for t in (values, W, b))
        out = fn(v, w, bb)
        out.backward(grad)
        outs.append((out.detach(), v.grad, w.grad, bb.grad))
    for name, r, o in zip(("x_hat", "values", "W_dec", "b_dec"), *outs):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12, msg=name)


def test_gradcheck_of_the_autograd_function():
    values, indices, W, _, _ = _case(tokens=5, d_in=6, d_sae=12, k=3)
    offsets = torch.arange(0, 16, 3)
    assert torch.autograd.gradcheck(GatheredRowsSum.apply,
                                    (values.reshape(-1).requires_grad_(), indices.reshape(-1), offsets,
                                     W.requires_grad_()))


def test_auto_route_by_density():
    assert sparse_decode.choose_route(2048 * 32, 2048, 10240) == "gathered"
    assert sparse_decode.choose_route(2048 * 320, 2048, 640) == "dense"
    assert sparse_decode.choose_route(2048 * 320, 2048, 640, "gathered") == "gathered"


@pytest.mark.parametrize("centred", [True, False])
def test_centred_affine_equals_the_plain_expression_and_its_gradients(centred):
    from train.encoder import centered_affine

    g = torch.Generator().manual_seed(1)
    x, W, b_enc, b_dec, grad = (torch.randn(*shape, generator=g, dtype=torch.float64)
                                for shape in ((13, 7), (7, 19), (19,), (7,), (13, 19)))
    results = []
    for fn in (lambda x, w, be, bd: ((x - bd) if centred else x) @ w + be,
               lambda x, w, be, bd: centered_affine(x, w, be, bd if centred else None)):
        leaves = [t.clone().requires_grad_() for t in (x, W, b_enc, b_dec)]
        out = fn(*leaves)
        out.backward(grad)
        results.append([out.detach()] + [t.grad for t in leaves])
    for name, r, o in zip(("pre", "x", "W_enc", "b_enc", "b_dec"), *results):
        if r is None:
            assert o is None, name
        else:
            torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("skip", [SkippedPairs(8, 25), SkippedPairs(0, 40), SkippedPairs(20, 0), SkippedPairs(20, 40)])
@pytest.mark.parametrize("route", ["gathered", "dense"])
@pytest.mark.parametrize("code", ["topk", "sparse rows"])
def test_a_decode_that_skips_pairs_in_its_weight_gradient_equals_two_decodes_one_detached(code, route, skip):
    """`skip`: one decode whose W_dec gradient leaves out the skipped pairs equals, values and every
    gradient, the plain two-term formulation: the skipped pairs decoded through a detached W_dec."""
    values, indices, W, b, grad = _case(tokens=20, d_in=12, d_sae=40, k=4)
    tokens, d_sae = indices.shape[0], W.shape[0]
    flat = (indices + torch.arange(tokens)[:, None] * d_sae).flatten()

    def reference(v, w, bb):
        code = torch.zeros(tokens * d_sae, dtype=v.dtype).scatter(0, flat, v.flatten()).view(tokens, d_sae)
        skipped = (torch.arange(tokens)[:, None] < skip.rows) & (torch.arange(d_sae)[None, :] < skip.latents)
        return torch.where(skipped, 0, code) @ w + torch.where(skipped, code, 0) @ w.detach() + bb

    def ours(v, w, bb):
        if code == "topk":
            return decode_topk(v, indices, w, bb, route=route, skip=skip)
        return decode_sparse_rows(v.flatten(), flat, tokens, w, bb, route=route, skip=skip)

    ref, got = _grads(lambda v, i, w, bb: reference(v, w, bb), values, indices, W, b, grad), \
        _grads(lambda v, i, w, bb: ours(v, w, bb), values, indices, W, b, grad)
    for name, r, o in zip(("x_hat", "values", "W_dec", "b_dec"), ref, got):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12, msg=name)
    if skip.rows and skip.latents:  # the skipped pairs did reach W_dec's gradient in the plain decode
        plain = _grads(lambda v, i, w, bb: decode_topk(v, i, w, bb, route=route), values, indices, W, b, grad)
        assert not torch.allclose(plain[2], got[2])


def test_the_dense_decode_that_skips_pairs_follows_autocast_as_addmm_does():
    """Under bf16 autocast the dense decode that skips pairs computes in bf16 and returns each gradient in
    its input's dtype, as autocast's own addmm (its reference here, with no pair skipped) does."""
    values, indices, W, b, grad = _case(tokens=16, d_in=8, d_sae=24, k=3, dtype=torch.float32)
    code = torch.zeros(16, 24).scatter(1, indices, values)
    results = []
    for fn in (lambda c, w, bb: torch.addmm(bb, c, w),
               lambda c, w, bb: sparse_decode.decode_dense(c, w, bb, skip=SkippedPairs(0, 0))):
        c, w, bb = (t.clone().requires_grad_() for t in (code, W, b))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(c, w, bb)
        out.backward(grad.to(out.dtype))
        results.append((out, c.grad, w.grad, bb.grad))
    for name, r, o in zip(("x_hat", "code", "W_dec", "b_dec"), *results):
        assert o.dtype == r.dtype, name
        torch.testing.assert_close(o, r, rtol=2e-2, atol=2e-2, msg=name)

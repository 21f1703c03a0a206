"""The fused loss kernels against the naive formulas: values and gradients.

The PyTorch paths are checked in fp64 (gradcheck) and fp32; the Triton kernels run
through the Triton interpreter on CPU (conftest sets TRITON_INTERPRET=1), on small shapes
because the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

from dskd.kernels import attention, hidden, logits, reference, triton_available

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's masked-lane inf - inf

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed (pip install -e '.[test]')")


def _mask(b, s, lengths):
    mask = torch.zeros(b, s, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return mask


def _qk(b, h, s, d, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    return (q.requires_grad_(grad), k.requires_grad_(grad))


def _grads(rows, inputs, seed=1):
    weights = torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed), dtype=rows.dtype)
    return torch.autograd.grad((rows * weights).sum(), inputs)


# ------------------------------------------------------------- attention, PyTorch path


@pytest.mark.parametrize("groups, s_heads, t_heads", [((1, 1), 2, 2), ((2, 1), 4, 2), ((1, 2), 2, 4), ((2, 4), 2, 4)])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_attention_kl_equals_the_naive_rows_and_gradients(groups, s_heads, t_heads, chunk):
    mask = _mask(3, 11, [11, 6, 0])  # full, padded, fully padded
    student = _qk(3, s_heads, 11, 8, torch.float64, 0, grad=True)
    teacher = _qk(3, t_heads, 11, 4, torch.float64, 1)
    want = reference.attention_kl_rows(student, teacher, mask, groups)
    got = attention.attention_kl_rows_torch(student, teacher, mask, groups, chunk)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got[1, :, 6:] == 0).all() and (got[2] == 0).all()  # padded rows and a fully padded example
    for a, b in zip(_grads(got, student), _grads(want, student)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_attention_kl_passes_gradcheck():
    mask = _mask(2, 7, [7, 4])
    student = _qk(2, 4, 7, 3, torch.float64, 2, grad=True)
    teacher = _qk(2, 2, 7, 3, torch.float64, 3)
    assert torch.autograd.gradcheck(lambda q, k: attention.attention_kl_rows_torch((q, k), teacher, mask, (2, 1), 3),
                                    student)


def test_teacher_probabilities_entry_point_equals_the_q_k_one():
    mask = _mask(2, 9, [9, 5])
    student = _qk(2, 2, 9, 4, torch.float64, 0, grad=True)
    teacher = _qk(2, 4, 9, 4, torch.float64, 1)
    probs = reference.attention_log_probs(*teacher, mask.bool()).exp()
    from_qk = attention.attention_kl_rows_torch(student, teacher, mask, (1, 2), 4)
    from_probs = attention.attention_kl_rows_torch(student, probs, mask, (1, 2), 4)
    torch.testing.assert_close(from_probs, from_qk, rtol=1e-9, atol=1e-12)
    for a, b in zip(_grads(from_probs, student), _grads(from_qk, student)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_attention_kl_with_low_precision_and_strided_inputs(dtype):
    mask = _mask(2, 12, [12, 7])
    # Captured Q/K are transposed views ([B, S, H, D] memory): non-contiguous.
    raw = [torch.randn(2, 12, 2, 8, generator=torch.Generator().manual_seed(i)).to(dtype) for i in range(4)]
    views = [x.transpose(1, 2) for x in raw]
    assert not views[0].is_contiguous()
    student = (views[0].requires_grad_(), views[1].requires_grad_())
    want = reference.attention_kl_rows((views[0].double(), views[1].double()), (views[2].double(), views[3].double()),
                                       mask)
    got = attention.attention_kl_rows_torch(student, (views[2], views[3]), mask, chunk=5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)  # fp32 work on exactly-converted inputs
    dq, dk = torch.autograd.grad(got.sum(), student)
    assert dq.dtype == dtype and torch.isfinite(dq.float()).all() and dq.float().abs().sum() > 0


def test_chunk_size_bounds_the_temporary():
    assert attention.chunk_rows(8, 12, 512) == 42  # 8 MB / (8 * 12 * 512 * 4 bytes)
    assert attention.chunk_rows(64, 16, 8192) == 1
    assert attention.chunk_rows(1, 1, 16) == 16


# ------------------------------------------------------------- attention, Triton kernel


@needs_triton
@pytest.mark.parametrize("dtype, d_s, d_t, tol", [
    (torch.float32, 16, 16, 2e-6),
    (torch.float32, 12, 24, 2e-6),  # head dims differ and are not powers of two
    (torch.bfloat16, 16, 16, 2e-2),
])
def test_triton_attention_kl_matches_the_naive_rows_and_gradients(dtype, d_s, d_t, tol):
    from dskd.kernels.triton_kernels import attention_kl_rows_triton

    mask = _mask(3, 37, [37, 20, 0])  # 37 is not a multiple of the 16-wide blocks
    raw = [torch.randn(3, 37, 2, d, generator=torch.Generator().manual_seed(i)).to(dtype)
           for i, d in enumerate((d_s, d_s, d_t, d_t))]
    views = [x.transpose(1, 2) for x in raw]  # the captured layout
    student = (views[0].requires_grad_(), views[1].requires_grad_())
    got = attention_kl_rows_triton(student, (views[2], views[3]), mask)
    ref_student = tuple(v.detach().double().requires_grad_() for v in views[:2])
    want = reference.attention_kl_rows(ref_student, (views[2].double(), views[3].double()), mask)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert (got[2] == 0).all() and (got[1, :, 20:] == 0).all()
    for a, b in zip(_grads(got.double(), student), _grads(want, ref_student)):
        torch.testing.assert_close(a.double(), b, rtol=tol * 10, atol=tol * 10)


def test_dispatch_uses_the_chunked_path_on_cpu_and_for_grouped_heads():
    student, teacher = _qk(1, 2, 4, 4), _qk(1, 2, 4, 4, seed=1)
    assert not attention.triton_supported(student, teacher, (1, 1))  # CPU tensors
    assert not attention.triton_supported(student, teacher, (2, 1))


# ------------------------------------------------------------------- soft-label KL


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_soft_kl_equals_the_naive_rows_and_gradient(temperature):
    zs = torch.randn(13, 70, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(13, 70, dtype=torch.float64)
    got = logits.soft_kl_rows_torch(zs, zt, temperature, chunk=4)
    want = reference.soft_kl_rows(zs, zt, temperature)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grads(got, zs)[0], _grads(want, zs)[0], rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: logits.soft_kl_rows_torch(z, zt, temperature, 5), (zs,))


@needs_triton
@pytest.mark.parametrize("dtype, tol, grad_tol", [(torch.float32, 2e-6, 2e-5), (torch.bfloat16, 1e-5, 1e-2)])
def test_triton_soft_kl_matches_the_naive_rows_and_gradient(dtype, tol, grad_tol):
    from dskd.kernels.triton_kernels import soft_kl_rows_triton

    # 1100 classes: more than one 1024-wide class block; a strided (column-sliced) input.
    zs = torch.randn(19, 1200).to(dtype)[:, :1100].requires_grad_()
    zt = torch.randn(19, 1100).to(dtype)
    assert not zs.is_contiguous()
    got = soft_kl_rows_triton(zs, zt, 2.0)
    ref_zs = zs.detach().double().requires_grad_()
    want = reference.soft_kl_rows(ref_zs, zt.double(), 2.0)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    grad = _grads(got.double(), zs)[0]
    assert grad.dtype == dtype  # returned in the input's dtype: bf16 rounding (2^-8 relative) bounds the error
    torch.testing.assert_close(grad.double(), _grads(want, ref_zs)[0], rtol=grad_tol, atol=grad_tol * 1e-2)


# ---------------------------------------------------------------- hidden cosine / MSE


def _hidden_case(dtype=torch.float64, projection=True):
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(21, 12, generator=g, dtype=dtype).requires_grad_()
    ht = torch.randn(21, 20 if projection else 12, generator=g, dtype=dtype)
    w = torch.randn(20, 12, generator=g, dtype=dtype).requires_grad_() if projection else None
    b = torch.randn(20, generator=g, dtype=dtype).requires_grad_() if projection else None
    return hs, ht, w, b


@pytest.mark.parametrize("kind", ["cosine", "mse"])
@pytest.mark.parametrize("projection", [True, False])
def test_chunked_hidden_loss_equals_the_naive_rows_and_gradients(kind, projection):
    hs, ht, w, b = _hidden_case(projection=projection)
    inputs = tuple(x for x in (hs, w, b) if x is not None)
    got = hidden.hidden_rows(hs, ht, kind, w, b, chunk=5)
    want = reference.hidden_rows(hs, ht, kind, w, b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, c in zip(_grads(got, inputs), _grads(want, inputs)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *x: hidden.hidden_rows(x[0], ht, kind, *x[1:], chunk=4) if projection
                                    else hidden.hidden_rows(x[0], ht, kind, chunk=4), inputs)


@needs_triton
@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_triton_hidden_rows_match_the_naive_rows_and_gradients(kind):
    from dskd.kernels.triton_kernels import hidden_row_loss_and_grad

    hs, ht, w, b = _hidden_case(torch.float32)
    got = hidden.hidden_rows_with(hidden_row_loss_and_grad, hs, ht, kind, w, b, chunk=8)
    want = reference.hidden_rows(hs, ht, kind, w, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, c in zip(_grads(got, (hs, w, b)), _grads(want, (hs, w, b))):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def test_hidden_rows_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        hidden.hidden_rows(torch.zeros(2, 3), torch.zeros(2, 3), "l1")


# ----------------------------------------------------------------- through the losses


def test_loss_terms_give_the_same_values_and_gradients_with_either_kernel():
    from dskd.losses import LayerGeometry, build_loss_terms

    geometry = LayerGeometry(((1, 2),), 16, 16, 2, 4)
    results = {}
    for kernel in ("fused", "naive"):
        losses = {"attention_kl": {"weight": 1.0, "kernel": kernel},
                  "soft_kd": {"weight": 1.0, "temperature": 2.0, "kernel": kernel},
                  "cls_cosine": {"weight": 1.0, "kernel": kernel}}
        terms = build_loss_terms(losses, geometry)
        s_qk = _qk(2, 2, 9, 8, grad=True)
        student = {"pairs": ((1, 2),), "attention_qk": [s_qk],
                   "logits": torch.randn(2, 3, generator=torch.Generator().manual_seed(5)).requires_grad_(),
                   "cls": [torch.randn(2, 16, generator=torch.Generator().manual_seed(6)).requires_grad_()]}
        teacher = {"attention_qk": [_qk(2, 4, 9, 4, seed=1)], "logits": torch.randn(2, 3, generator=torch.Generator().manual_seed(8)),
                   "cls": [torch.randn(2, 16, generator=torch.Generator().manual_seed(7))]}
        mask = _mask(2, 9, [9, 4])
        values = {name: term(student, teacher, mask) for name, term in terms.items()}
        grads = torch.autograd.grad(sum(values.values()), [*s_qk, student["logits"], student["cls"][0]])
        results[kernel] = (values, grads)
    for name in results["fused"][0]:
        torch.testing.assert_close(results["fused"][0][name], results["naive"][0][name], rtol=1e-5, atol=1e-6)
    for a, b in zip(results["fused"][1], results["naive"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_bad_kernel_name_is_refused_by_key():
    from dskd.errors import DskdError
    from dskd.losses import validate_loss_terms

    with pytest.raises(DskdError, match="`losses.attention_kl`: kernel must be 'fused' or 'naive', got 'triton'"):
        validate_loss_terms({"attention_kl": {"weight": 1.0, "kernel": "triton"}}, "c.yaml")

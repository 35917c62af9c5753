"""The C++ CPU kernels (csrc/cpu/per_sample.cpp) against float64 references, in float32 and float64, on odd
shapes; their registration (schemas, opcheck, fakes); the noise they add; determinism across thread counts.

The pure-PyTorch implementations (used on CPU when the extension is not built, and on CUDA where Triton
does not run) are checked against the same references. float32 bound (flash-attention rule): the error
against the fp64 reference is at most twice that of the pure-PyTorch float32 implementation plus a small
absolute term; float64 results must agree to 1e-10 relative.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from dpsat_fast import ops
from dpsat_fast.ops import multi_tensor, per_sample, reference

pytestmark = pytest.mark.skipif(not ops.EXTENSION_AVAILABLE, reason="the compiled extension is not built")

OPS = sorted(per_sample.SCHEMAS)
TORCH = per_sample.TORCH_IMPLS


@pytest.fixture(autouse=True)
def _cpu_kernels():
    """The ops on CPU tensors, whatever DPSAT_FAST_KERNELS says (the Triton interpreter is tested elsewhere)."""
    with ops.kernel_backend_as("torch"):
        yield


def op(name):
    return getattr(torch.ops.dpsat_fast, name)


def assert_close_to_reference(ours, torch32, ref64, name=""):
    """float64 results: 1e-10 relative. float32: ``|ours − ref| ≤ 2 |pytorch32 − ref| + 1e-6·max|ref|``."""
    assert ours.shape == ref64.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    scale = max(ref64.abs().max().item(), 1e-30) if ref64.numel() else 1.0
    if ours.dtype == torch.float64:
        torch.testing.assert_close(ours, ref64, rtol=1e-10, atol=1e-12 * scale, msg=name)
        return
    assert ours.dtype == torch.float32, f"{name}: dtype {ours.dtype}"
    err = (ours.double() - ref64).abs()
    bound = 2 * (torch32.double() - ref64).abs() + 1e-6 * scale
    if err.numel():
        worst = (err - bound).argmax()
        assert bool((err <= bound).all()), (f"{name}: error {err.flatten()[worst].item():.3e} above bound "
                                            f"{bound.flatten()[worst].item():.3e}")


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", OPS + sorted(multi_tensor.SCHEMAS))
def test_schema_and_cpu_kernel_come_from_the_extension(name):
    schemas = {**per_sample.SCHEMAS, **multi_tensor.SCHEMAS}
    assert str(op(name).default._schema) == f"dpsat_fast::{schemas[name]}"
    dump = torch._C._dispatch_dump(f"dpsat_fast::{name}")
    cpu = [line for line in dump.splitlines() if line.startswith("CPU:")]
    assert cpu and "per_sample.cpp" in cpu[0], dump  # the C++ kernel, not a Python one
    assert any(line.startswith("CUDA:") for line in dump.splitlines())


# ---------------------------------------------------------------------------------------------------
# Linear: G_i = g_iᵀ a_i
# ---------------------------------------------------------------------------------------------------

# (B, T, D, P); the last one has B·T above CLIPPED_SUM_BLOCK_ROWS: a clipped sum of several blocks
LINEAR = [(3, 1, 7, 5), (4, 13, 19, 6), (2, 37, 5, 33), (5, 3, 17, 16), (1, 2, 1, 1), (40, 30, 5, 6)]


def linear_reference(a, g):
    return torch.einsum("btp,btd->bpd", g.double(), a.double()), g.double().sum(1)  # [B, P, D], [B, P]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("route", ["ghost", "instantiate"])
@pytest.mark.parametrize("B, T, D, P", LINEAR)
def test_linear_weight_sq_norms(dtype, route, B, T, D, P):
    a, g = randn(B, T, D, dtype=dtype), randn(B, T, P, dtype=dtype)
    pw, pb = linear_reference(a, g)
    ref = (pw.flatten(1).pow(2).sum(1), pb.pow(2).sum(1))
    ours = op("linear_weight_sq_norms")(a, g, route, True)
    base = TORCH["linear_weight_sq_norms"](a.float(), g.float(), route, True)
    for o, b, r, n in zip(ours, base, ref, ("weight", "bias")):
        assert_close_to_reference(o, b, r, n)
    w_only, empty = op("linear_weight_sq_norms")(a, g, route, False)
    assert torch.equal(w_only, ours[0]) and empty.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, T, D, P", LINEAR)
def test_linear_clipped_sum(dtype, B, T, D, P):
    a, g, s = randn(B, T, D, dtype=dtype), randn(B, T, P, dtype=dtype), torch.rand(B, dtype=dtype)
    pw, pb = linear_reference(a, g)
    ref = (torch.einsum("b,bpd->pd", s.double(), pw), s.double() @ pb)
    ours = op("linear_clipped_sum_with_noise")(a, g, s, True, 0, 0, 0, 0.0)
    base = TORCH["linear_clipped_sum_with_noise"](a.float(), g.float(), s.float(), True, 0, 0, 0, 0.0)
    for o, b, r, n in zip(ours, base, ref, ("weight", "bias")):
        assert_close_to_reference(o, b, r, n)


def test_linear_non_contiguous_and_16_bit_inputs():
    a, g = randn(7, 3, 4).transpose(0, 1), randn(3, 5, 7).transpose(1, 2)  # [3, 7, 4], [3, 7, 5] views
    pw, _ = linear_reference(a, g)
    w, _ = op("linear_weight_sq_norms")(a, g, "instantiate", False)
    assert_close_to_reference(w, TORCH["linear_weight_sq_norms"](a, g, "instantiate", False)[0],
                              pw.flatten(1).pow(2).sum(1))
    for dtype in (torch.bfloat16, torch.float16):
        a16, g16 = a.to(dtype), g.to(dtype)
        w16, _ = op("linear_weight_sq_norms")(a16, g16, "ghost", False)
        pw16, _ = linear_reference(a16, g16)  # exact products of the rounded inputs
        assert w16.dtype == torch.float32
        torch.testing.assert_close(w16.double(), pw16.flatten(1).pow(2).sum(1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Convolutions: stride, padding, dilation, groups, 1-D/2-D/3-D, and every per-example-gradient path
# ---------------------------------------------------------------------------------------------------

# (C_in, C_out, kernel, stride, padding, dilation, groups, spatial)
CONV = [
    (3, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, (7, 6)),      # small fan-in: unfold + bmm
    (9, 5, (3, 3), (2, 2), (0, 0), (1, 1), 1, (9, 8)),      # fan-in 81: batch-grouped conv weight-gradient
    (8, 3, (3, 2), (1, 2), (2, 1), (2, 1), 1, (7, 7)),      # dilation, asymmetric kernel/stride/padding
    (8, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, (5, 6)),      # groups
    (4, 4, (3, 3), (2, 2), (1, 1), (1, 1), 4, (7, 5)),      # depthwise
    (6, 3, (1, 1), (2, 2), (0, 0), (1, 1), 1, (5, 6)),      # strided 1x1 shortcut (direct bmm, odd size)
    (70, 3, (1, 1), (1, 1), (0, 0), (1, 1), 1, (3, 3)),     # 1x1 with fan-in > 64
    (3, 4, (3,), (2,), (1,), (1,), 1, (11,)),               # Conv1d
    (8, 4, (5,), (1,), (4,), (2,), 2, (13,)),               # Conv1d, dilation, groups
    (2, 3, (2, 3, 2), (1, 2, 1), (1, 0, 1), (1, 1, 2), 1, (4, 5, 5)),  # Conv3d
]
CONV_IDS = [f"conv{len(c[2])}d-{i}" for i, c in enumerate(CONV)]
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_case(case, batch=3, dtype=torch.float32):
    c_in, c_out, k, s, p, d, groups, spatial = case
    w = randn(c_out, c_in // groups, *k, dtype=torch.float64)
    x = randn(batch, c_in, *spatial, dtype=dtype)
    out = _CONV_FN[len(k)](x.double(), w, None, s, p, d, groups)
    g = randn(*out.shape, dtype=dtype)
    return w, x, g, (list(w.shape), list(s), list(p), list(d), groups)


def conv_reference(w, x, g, args):
    """Per-example (weight [B, *W], bias [B, C_out]) gradients in fp64 by torch.func: no im2col involved."""
    _, s, p, d, groups = args
    fn = _CONV_FN[w.dim() - 2]

    def loss(weight, xi, gi):
        return (fn(xi[None], weight, None, s, p, d, groups) * gi[None]).sum()

    pw = vmap(grad(loss), in_dims=(None, 0, 0))(w, x.double(), g.double())
    return pw, g.double().flatten(2).sum(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("route", ["ghost", "instantiate"])
@pytest.mark.parametrize("case", CONV, ids=CONV_IDS)
@pytest.mark.parametrize("batch", [3, 33])
def test_conv_weight_sq_norms(dtype, route, case, batch):
    w, x, g, args = conv_case(case, batch=batch, dtype=dtype)
    pw, pb = conv_reference(w, x, g, args)
    ours = op("conv_weight_sq_norms")(x, g, *args, route, True)
    base = TORCH["conv_weight_sq_norms"](x.float(), g.float(), *args, route, True)
    ref = (pw.flatten(1).pow(2).sum(1), pb.pow(2).sum(1))
    for o, b, r, n in zip(ours, base, ref, ("weight", "bias")):
        assert_close_to_reference(o, b, r, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CONV, ids=CONV_IDS)
@pytest.mark.parametrize("batch", [3, 33])  # below / above the batch from which the kernel loops over examples
def test_conv_per_example_grads(dtype, case, batch):
    w, x, g, args = conv_case(case, batch=batch, dtype=dtype)
    pw, pb = conv_reference(w, x, g, args)
    ours = op("conv_per_example_grads")(x, g, *args, True)
    base = TORCH["conv_per_example_grads"](x.float(), g.float(), *args, True)
    ref = (pw, pb, pw.flatten(1).pow(2).sum(1), pb.pow(2).sum(1))
    for o, b, r, n in zip(ours, base, ref, ("weight", "bias", "weight_sq", "bias_sq")):
        assert_close_to_reference(o, b, r, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CONV, ids=CONV_IDS)
@pytest.mark.parametrize("batch", [4, 60])  # one block of examples / several (B·T above CLIPPED_SUM_BLOCK_ROWS)
def test_conv_clipped_sum(dtype, case, batch):
    w, x, g, args = conv_case(case, batch=batch, dtype=dtype)
    s = torch.rand(batch, dtype=dtype)
    pw, pb = conv_reference(w, x, g, args)
    ours = op("conv_clipped_sum_with_noise")(x, g, s, *args, True, 0, 0, 0, 0.0)
    base = TORCH["conv_clipped_sum_with_noise"](x.float(), g.float(), s.float(), *args, True, 0, 0, 0, 0.0)
    ref = (torch.einsum("b,b...->...", s.double(), pw), s.double() @ pb)
    for o, b, r, n in zip(ours, base, ref, ("weight", "bias")):
        assert_close_to_reference(o, b, r, n)


def test_conv_channels_last_and_strided_inputs():
    w, x, g, args = conv_case(CONV[1])
    x_cl = x.contiguous(memory_format=torch.channels_last)
    g_view = torch.cat([g, g], 3)[..., : g.shape[3]]  # non-contiguous view with g's values
    pw, pb = conv_reference(w, x, g, args)
    for route in ("ghost", "instantiate"):
        wn, bn = op("conv_weight_sq_norms")(x_cl, g_view, *args, route, True)
        torch.testing.assert_close(wn.double(), pw.flatten(1).pow(2).sum(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.double(), pb.pow(2).sum(1), rtol=1e-5, atol=1e-5)
    s = torch.rand(3)
    ws, _ = op("conv_clipped_sum_with_noise")(x_cl, g_view, s, *args, False, 0, 0, 0, 0.0)
    torch.testing.assert_close(ws.double(), torch.einsum("b,b...->...", s.double(), pw), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# norm layers and materialized per-example gradients
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["channel_first", "channel_last"])
@pytest.mark.parametrize("B, T, C", [(3, 37, 5), (2, 1, 9), (4, 6, 1), (1, 129, 33)])
def test_affine_per_example_grads(dtype, layout, B, T, C):
    if layout == "channel_first":  # GroupNorm: [B, C, T] storage seen as [B, T, C]
        xhat, g = randn(B, C, T, dtype=dtype).transpose(1, 2), randn(B, C, T, dtype=dtype).transpose(1, 2)
    else:
        xhat, g = randn(B, T, C, dtype=dtype), randn(B, T, C, dtype=dtype)
    dw, db = (xhat.double() * g.double()).sum(1), g.double().sum(1)
    ref = (dw, db, dw.pow(2).sum(1), db.pow(2).sum(1))
    ours = op("affine_per_example_grads")(xhat, g, True, True)
    base = TORCH["affine_per_example_grads"](xhat.float(), g.float(), True, True)
    for o, b, r, n in zip(ours, base, ref, ("dw", "db", "dw_sq", "db_sq")):
        assert_close_to_reference(o, b, r, n)
    only_bias = op("affine_per_example_grads")(xhat, g, False, True)
    assert only_bias[0].shape == (0,) and only_bias[2].shape == (0,)
    assert torch.equal(only_bias[1], ours[1]) and torch.equal(only_bias[3], ours[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, K", [(3, 7), (5, 513), (2, 1025), (1, 1), (7, 3000)])
def test_per_example_clipped_sum(dtype, B, K):
    grads, s = randn(B, K, dtype=dtype), torch.rand(B, dtype=dtype)
    ours = op("per_example_clipped_sum_with_noise")(grads, s, 0, 0, 0.0)
    base = TORCH["per_example_clipped_sum_with_noise"](grads.float(), s.float(), 0, 0, 0.0)
    assert_close_to_reference(ours, base, s.double() @ grads.double())


# ---------------------------------------------------------------------------------------------------
# noise: the reference Philox stream, added once, in row-major order
# ---------------------------------------------------------------------------------------------------

def _noise_cases(dtype):
    a, g, s = randn(3, 5, 6, dtype=dtype), randn(3, 5, 4, dtype=dtype), torch.rand(3, dtype=dtype)
    w, x, cg, args = conv_case(CONV[3], dtype=dtype)
    cs = torch.rand(3, dtype=dtype)
    grads = randn(3, 1100, dtype=dtype)
    ab, gb, sb = randn(300, 5, 6, dtype=dtype), randn(300, 5, 4, dtype=dtype), torch.rand(300, dtype=dtype)
    return {
        "linear": (lambda std: op("linear_clipped_sum_with_noise")(a, g, s, True, 11, 7, 200, std), (7, 200)),
        "linear_blocks": (lambda std: op("linear_clipped_sum_with_noise")(ab, gb, sb, True, 11, 7, 200, std),
                          (7, 200)),
        "conv": (lambda std: op("conv_clipped_sum_with_noise")(x, cg, cs, *args, True, 11, 0, 5000, std), (0, 5000)),
        "per_example": (lambda std: (op("per_example_clipped_sum_with_noise")(grads, s, 11, 123, std),), (123,)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["linear", "linear_blocks", "conv", "per_example"])
def test_noise_is_the_reference_stream(dtype, case):
    run, offsets = _noise_cases(dtype)[case]
    std = 0.75
    clean, noisy = run(0.0), run(std)
    for c, n, offset in zip(clean, noisy, offsets):
        xi = reference.philox_normal(11, offset, c.numel()).to(dtype).view(c.shape)
        expected = c + torch.tensor(std, dtype=dtype) * xi
        assert torch.equal(n, expected), f"{case}: noise differs from the reference stream"


def test_noise_std_and_independence_of_streams():
    grads, s = torch.zeros(2, 200_000), torch.ones(2)
    a = op("per_example_clipped_sum_with_noise")(grads, s, 5, 0, 2.0)
    b = op("per_example_clipped_sum_with_noise")(grads, s, 5, 200_000, 2.0)
    assert abs(a.std().item() - 2.0) < 0.02 and abs(a.mean().item()) < 0.02
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.01


# ---------------------------------------------------------------------------------------------------
# empty batches, argument checks, determinism
# ---------------------------------------------------------------------------------------------------

def test_empty_batch_gives_zero_norms_and_pure_noise():
    a, g, s = torch.zeros(0, 3, 4), torch.zeros(0, 3, 5), torch.zeros(0)
    assert op("linear_weight_sq_norms")(a, g, "ghost", True)[0].shape == (0,)
    w, b = op("linear_clipped_sum_with_noise")(a, g, s, True, 1, 0, 20, 1.0)
    assert torch.equal(w, reference.philox_normal(1, 0, 20).view(5, 4))
    assert torch.equal(b, reference.philox_normal(1, 20, 5))
    _, x, cg, args = conv_case(CONV[1], batch=0)
    for route in ("ghost", "instantiate"):
        assert op("conv_weight_sq_norms")(x, cg, *args, route, True)[0].shape == (0,)
    w, _ = op("conv_clipped_sum_with_noise")(x, cg, s, *args, False, 1, 0, 0, 1.0)
    assert torch.equal(w, reference.philox_normal(1, 0, w.numel()).view(w.shape))
    pe = op("conv_per_example_grads")(x, cg, *args, True)
    assert pe[0].shape == (0, *args[0]) and pe[2].shape == (0,)
    assert torch.equal(op("per_example_clipped_sum_with_noise")(torch.zeros(0, 9), s, 1, 4, 1.0),
                       reference.philox_normal(1, 4, 9))


@pytest.mark.parametrize("call, match", [
    (lambda: op("linear_weight_sq_norms")(torch.zeros(2, 3, 4), torch.zeros(2, 4, 5), "ghost", False), "must agree"),
    (lambda: op("linear_weight_sq_norms")(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), "fast", False), "route"),
    (lambda: op("linear_clipped_sum_with_noise")(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.ones(3), False,
                                                 0, 0, 0, 0.0), "scale"),
    (lambda: op("per_example_clipped_sum_with_noise")(torch.zeros(2, 3), torch.ones(2), -1, 0, 1.0), "seed"),
    (lambda: op("per_example_clipped_sum_with_noise")(torch.zeros(2, 3), torch.ones(2), 0, 0, float("nan")),
     "noise_std"),
    (lambda: op("conv_weight_sq_norms")(torch.zeros(2, 3, 5, 5), torch.zeros(2, 4, 3, 3), [4, 2, 3, 3], [1, 1],
                                        [0, 0], [1, 1], 1, "ghost", False), "channels"),
    (lambda: op("affine_per_example_grads")(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), True, True), "xhat"),
    (lambda: op("linear_weight_sq_norms")(torch.zeros(2, 3, 4, dtype=torch.int64), torch.zeros(2, 3, 5), "ghost",
                                          False), "float"),
])
def test_kernels_check_arguments_and_name_the_op(call, match):
    with pytest.raises(RuntimeError, match=match) as info:
        call()
    assert "dpsat_fast::" in str(info.value)


def test_results_do_not_depend_on_the_thread_count():
    torch.manual_seed(0)
    grads, s = randn(9, 40_000), torch.rand(9)
    xhat, g = randn(4, 300, 70), randn(4, 300, 70)
    a3, g3 = randn(5, 40, 30), randn(5, 40, 20)
    tensors = [randn(100_003), randn(70, 3001)]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append((op("per_example_clipped_sum_with_noise")(grads, s, 3, 9, 1.0),
                            *op("affine_per_example_grads")(xhat, g, True, True),
                            *op("linear_weight_sq_norms")(a3, g3, "ghost", True),
                            op("multi_tensor_sq_norm")(tensors)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for r0, r in zip(results[0], other):
            assert torch.equal(r0, r)


# ---------------------------------------------------------------------------------------------------
# DP-SAT's multi-tensor passes
# ---------------------------------------------------------------------------------------------------

def _tensor_list(dtype):
    return [randn(3, 5, dtype=dtype), randn(70_001, dtype=dtype), randn(1, dtype=dtype), randn(2, 3, 7, dtype=dtype)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_multi_tensor_sq_norm(dtype):
    tensors = _tensor_list(dtype)
    ours = ops.multi_tensor_sq_norm(tensors)
    ref = sum(t.double().pow(2).sum() for t in tensors)
    assert ours.dim() == 0 and ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-12 if dtype == torch.float64 else 2e-6, atol=0)
    # the _foreach fallback squares fp32 per-tensor norms: PyTorch's own fp32 accuracy
    torch.testing.assert_close(multi_tensor._torch_sq_norm(tensors).double(), ref,
                               rtol=1e-12 if dtype == torch.float64 else 2e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_multi_tensor_perturb_is_copy_then_add(dtype):
    params, direction = _tensor_list(dtype), _tensor_list(dtype)
    before = [p.clone() for p in params]
    backup = [torch.full_like(p, float("nan")) for p in params]
    alpha = torch.tensor(0.37)
    ops.multi_tensor_perturb_(params, backup, direction, alpha)
    expected = torch._foreach_add(before, torch._foreach_mul(direction, alpha))
    for p, b, p0, e in zip(params, backup, before, expected):
        assert torch.equal(b, p0)
        assert torch.equal(p, e)  # bit for bit what the two-step PyTorch update gives


def test_multi_tensor_perturb_checks_arguments():
    p = [torch.zeros(3)]
    with pytest.raises(ValueError, match="one tensor each"):
        ops.multi_tensor_perturb_(p, [], p, 1.0)
    with pytest.raises(ValueError, match="shape or dtype"):
        ops.multi_tensor_perturb_(p, [torch.zeros(4)], p, 1.0)
    with pytest.raises(RuntimeError, match="dpsat_fast::multi_tensor_perturb_"):
        op("multi_tensor_perturb_")(p, [torch.zeros(3, dtype=torch.float64)], p, torch.tensor(1.0))


def test_multi_tensor_perturb_non_contiguous_takes_the_foreach_path():
    p = [randn(4, 6).t()]
    d = [randn(4, 6).t()]
    b = [torch.empty(6, 4)]
    p0 = p[0].clone()
    ops.multi_tensor_perturb_(p, b, d, 2.0)
    assert torch.equal(b[0], p0) and torch.equal(p[0], p0 + 2.0 * d[0])


# ---------------------------------------------------------------------------------------------------
# opcheck: schema, fake tensors, autograd registration, AOT dispatch
# ---------------------------------------------------------------------------------------------------

def _op_samples():
    a, g, s = randn(3, 5, 4), randn(3, 5, 6), torch.rand(3)
    _, x, cg, args = conv_case(CONV[3])
    _, x3, cg3, args3 = conv_case(CONV[-1], batch=2)
    return [
        ("linear_weight_sq_norms", (a, g, "ghost", True)),
        ("linear_weight_sq_norms", (a.double(), g.double(), "instantiate", False)),
        ("conv_weight_sq_norms", (x, cg, *args, "instantiate", True)),
        ("conv_weight_sq_norms", (x3, cg3, *args3, "ghost", False)),
        ("conv_per_example_grads", (x, cg, *args, True)),
        ("linear_clipped_sum_with_noise", (a, g, s, True, 3, 0, 100, 0.5)),
        ("conv_clipped_sum_with_noise", (x, cg, s, *args, True, 3, 0, 500, 0.5)),
        ("affine_per_example_grads", (a, randn(3, 5, 4), True, False)),
        ("per_example_clipped_sum_with_noise", (randn(3, 7), s, 1, 2, 0.5)),
        ("multi_tensor_sq_norm", ([randn(3, 4), randn(5)],)),
        ("multi_tensor_perturb_", ([randn(3, 4), randn(5)], [torch.empty(3, 4), torch.empty(5)],
                                   [randn(3, 4), randn(5)], torch.tensor(0.5))),
    ]


@pytest.mark.parametrize("name, args", _op_samples(), ids=[n for n, _ in _op_samples()])
def test_opcheck(name, args):
    torch.library.opcheck(op(name), args)


def test_torch_compile_traces_the_cpu_ops():
    a, g, scale = randn(3, 5, 4), randn(3, 5, 6), torch.rand(3)

    def private_layer_grad(a, g, scale):
        sq, _ = ops.linear_weight_sq_norms(a, g, "ghost")
        clip = (1.0 / sq.sqrt().clamp_min(1e-6)).clamp(max=1.0) * scale
        return ops.linear_clipped_sum_with_noise(a, g, clip, seed=3, noise_std=0.5)[0]

    compiled = torch.compile(private_layer_grad, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(a, g, scale), private_layer_grad(a, g, scale))


# ---------------------------------------------------------------------------------------------------
# the package without the extension: same training steps through the pure-PyTorch ops
# ---------------------------------------------------------------------------------------------------

_DPSAT_STEPS = """
import sys, torch, torch.nn.functional as F
from torch import nn
import dpsat_fast.ops as ops
from dpsat_fast.engine import BookKeepingEngine
from dpsat_fast.optim import DPSAT
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                      nn.Conv2d(8, 4, 1), nn.Flatten(), nn.LayerNorm(4 * 16), nn.Linear(4 * 16, 5))
engine = BookKeepingEngine(model, max_grad_norm=0.5)
opt = DPSAT(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine, rho=0.05, noise_multiplier=1.0,
            expected_batch_size=6, seed=123)
x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
grads = []
for _ in range(2):
    F.cross_entropy(model(x), y).backward()
    opt.step()
    grads.append([p.grad.clone() for p in model.parameters()])
    opt.zero_grad()
dump = torch._C._dispatch_dump("dpsat_fast::conv_weight_sq_norms")
cpu_kernel = [line for line in dump.splitlines() if line.startswith("CPU:")][0]
torch.save({"grads": grads, "params": [p.detach() for p in model.parameters()],
            "compiled": ops.EXTENSION_AVAILABLE, "cpu_kernel": cpu_kernel}, sys.argv[1])
"""


def _dpsat_steps_in_subprocess(tmp_path, name, **env):
    import os
    import subprocess
    import sys

    path = tmp_path / f"{name}.pt"
    result = subprocess.run([sys.executable, "-c", _DPSAT_STEPS, str(path)], env={**os.environ, **env},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return torch.load(path)


def test_training_without_the_extension_matches_the_cpu_kernels(tmp_path):
    compiled = _dpsat_steps_in_subprocess(tmp_path, "compiled", DPSAT_FAST_KERNELS="torch")
    pure = _dpsat_steps_in_subprocess(tmp_path, "pure", DPSAT_FAST_KERNELS="torch", DPSAT_FAST_DISABLE_EXT="1")
    assert compiled["compiled"] and "per_sample.cpp" in compiled["cpu_kernel"]
    assert not pure["compiled"] and "per_sample.cpp" not in pure["cpu_kernel"]
    for step_c, step_p in zip(compiled["grads"], pure["grads"]):
        for gc, gp in zip(step_c, step_p):
            torch.testing.assert_close(gc, gp, rtol=1e-5, atol=1e-6)
    for pc, pp in zip(compiled["params"], pure["params"]):
        torch.testing.assert_close(pc, pp, rtol=1e-5, atol=1e-6)

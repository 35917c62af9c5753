"""Ground truth for per-sample tests: per-example gradients from a loop of single-example backward passes
on an untouched float64 copy of the model, and the engine's answers for the same batch."""

import copy
from typing import Dict, Sequence

import torch
from torch import Tensor, nn

from dpsat_fast.engine import BookKeepingEngine


def projection_loss(out, weights) -> Tensor:
    """Per-example loss ℓ_i = <out_i, w_i>; returns [B] (works for any output shape)."""
    if isinstance(out, tuple):
        out = out[0]
    return (out * weights).flatten(1).sum(1)


def per_example_grads(model: nn.Module, inputs: Sequence[Tensor], loss_weights: Tensor,
                      batch_dims: Sequence[int] | None = None) -> Dict[str, Tensor]:
    """{param name: [B, *shape]} in float64 by one backward per example."""
    ref = copy.deepcopy(model).double()
    batch_dims = batch_dims or [0] * len(inputs)
    B = inputs[0].shape[batch_dims[0]]
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    out = {n: [] for n in names}
    for i in range(B):
        ref.zero_grad(set_to_none=True)
        xs = [x.narrow(d, i, 1) for x, d in zip(inputs, batch_dims)]
        xs = [x.double() if x.is_floating_point() else x for x in xs]
        y = ref(*xs)
        projection_loss(_batch_first(y, batch_dims[0]), loss_weights[i:i + 1].double()).sum().backward()
        params = dict(ref.named_parameters())
        for n in names:
            g = params[n].grad
            out[n].append(torch.zeros_like(params[n]) if g is None else g.clone())
    return {n: torch.stack(v) for n, v in out.items()}


def _batch_first(y, d):
    if isinstance(y, tuple):
        y = y[0]
    return y.movedim(d, 0) if d != 0 else y


def engine_results(model: nn.Module, inputs: Sequence[Tensor], loss_weights: Tensor, max_grad_norm: float,
                   batch_dims: Sequence[int] | None = None, **engine_kwargs):
    """(per-param squared norms, per-param clipped sums) from one backward through the engine."""
    batch_dims = batch_dims or [0] * len(inputs)
    engine = BookKeepingEngine(model, max_grad_norm=max_grad_norm, loss_reduction="sum", **engine_kwargs)
    try:
        y = model(*inputs)
        projection_loss(_batch_first(y, batch_dims[0]), loss_weights.to(_out_dtype(y))).sum().backward()
        names = {p: n for n, p in model.named_parameters()}
        sums = {names[p]: s for p, s in engine.summed_grads.items()}
        return dict(engine.last_sq_norms), sums
    finally:
        engine.detach()


def _out_dtype(y):
    return (y[0] if isinstance(y, tuple) else y).dtype


def reference_clipped_sums(grads: Dict[str, Tensor], max_grad_norm: float,
                            sq_norms: Dict[str, Tensor] | None = None) -> Dict[str, Tensor]:
    """Σ_i c_i G_i with flat clip factors from the exact norms of ``grads``, or from ``sq_norms`` (e.g. the
    engine's certified norms, to check the sum for the clip factors it used)."""
    norms = sq_norms if sq_norms is not None else {n: g.flatten(1).pow(2).sum(1) for n, g in grads.items()}
    total = torch.stack([v.double() for v in norms.values()]).sum(0).sqrt()
    c = (max_grad_norm / (total + 1e-6)).clamp(max=1.0)
    return {n: torch.tensordot(c, g, dims=1) for n, g in grads.items()}


def assert_certified_norms(sq: Dict[str, Tensor], ref: Dict[str, Tensor], dtype: torch.dtype) -> None:
    """The engine's clipping norms are certified upper bounds of the exact per-example norms: never below
    them (beyond the dtype's tolerance, since the reference runs a float64 copy of the model) and above them
    by no more than the rounding certificate (``CERTIFIED_NORM_SLACK``)."""
    from conftest import CERTIFIED_NORM_SLACK, DTYPE_TOLERANCES

    rtol, atol = DTYPE_TOLERANCES[dtype]
    for n, g in ref.items():
        exact = g.flatten(1).pow(2).sum(1)
        got = sq[n].double()
        assert bool((got >= exact * (1 - rtol) - atol).all()), f"{n}: certified norm below the exact one: {got} < {exact}"
        assert bool((got <= exact * (1 + rtol + CERTIFIED_NORM_SLACK[dtype]) + atol).all()), \
            f"{n}: certified norm too loose: {got} vs exact {exact}"


def assert_matches_reference(model: nn.Module, inputs: Sequence[Tensor], dtype: torch.dtype,
                             max_grad_norm: float = 1.0, batch_dims=None, out_shape=None, **engine_kwargs):
    """The engine's per-example squared norms and clipped sums equal the float64 loop reference."""
    from conftest import DTYPE_TOLERANCES

    rtol, atol = DTYPE_TOLERANCES[dtype]
    model = model.to(dtype)
    inputs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
    with torch.no_grad():
        y = model(*inputs)
    y = _batch_first(y, (batch_dims or [0])[0])
    loss_weights = torch.randn(y.shape, dtype=torch.float64)
    ref = per_example_grads(model, inputs, loss_weights, batch_dims)
    sq, sums = engine_results(model, inputs, loss_weights, max_grad_norm, batch_dims, **engine_kwargs)
    assert set(sq) == set(ref), (sorted(sq), sorted(ref))
    assert_certified_norms(sq, ref, dtype)
    ref_sums = reference_clipped_sums(ref, max_grad_norm, sq)
    for n, s in ref_sums.items():
        torch.testing.assert_close(sums[n].double(), s, rtol=rtol, atol=atol,
                                   msg=lambda m: f"clipped sum of {n}: {m}")
    return ref, sq


def neighbour_update_distance(base: nn.Module, x: Tensor, y: Tensor, outlier: Tensor, *, C: float, lr: float,
                              expected_batch: float, engine_kwargs=None, make_optimizer_kwargs=None) -> float:
    """One DP-SGD step (σ = 1, seed 7) from ``base`` on (x, y) and on (x + outlier, y + y[0]): the L2 distance
    of the two updated weight vectors. ``make_optimizer_kwargs(model)`` adds DPOptimizer arguments."""
    import torch.nn.functional as F

    from dpsat_fast.optim import DPOptimizer

    results = []
    for xs, ys in [(x, y), (torch.cat([x, outlier]), torch.cat([y, y[:1]]))]:
        model = copy.deepcopy(base)
        extra = make_optimizer_kwargs(model) if make_optimizer_kwargs is not None else {}
        engine = BookKeepingEngine(model, max_grad_norm=C, **(engine_kwargs or {}))
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), engine=engine, noise_multiplier=1.0,
                          expected_batch_size=expected_batch, seed=7, **extra)
        F.cross_entropy(model(xs), ys).backward()
        opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return (results[0] - results[1]).norm().item()

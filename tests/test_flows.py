"""Every invertible layer in float64 with random, non-identity parameters: round trips in both
directions, inverse log-det = -forward log-det, and log-dets against autograd Jacobians."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from helpers import perturb_parameters

from flowpp.ddi import data_dependent_init
from flowpp.flows import (
    AffineCoupling,
    ChannelSplit,
    ElementwiseNorm,
    Inverse,
    LogitPreprocess,
    MixtureLogisticCoupling,
    Pointwise,
    Sequential,
    Sigmoid,
    Squeeze,
    StripeSplit,
    SwapHalves,
)
from flowpp.nets import Conditioner

pytestmark = pytest.mark.usefixtures("single_thread")

B, C, H, W = 3, 2, 4, 4
F64 = torch.float64


# --- helpers: values are tensors or pairs of tensors -------------------------------------------


def flat(v) -> torch.Tensor:
    """(B, n): a tensor or a pair, each sample flattened and the halves concatenated."""
    if isinstance(v, tuple):
        return torch.cat([t.reshape(t.shape[0], -1) for t in v], dim=1)
    return v.reshape(v.shape[0], -1)


def unflat(f: torch.Tensor, like):
    if isinstance(like, tuple):
        out, i = [], 0
        for t in like:
            n = t[0].numel()
            out.append(f[:, i : i + n].reshape(f.shape[0], *t.shape[1:]))
            i += n
        return tuple(out)
    return f.reshape(f.shape[0], *like.shape[1:])


def sample(v, i):
    return tuple(t[i : i + 1] for t in v) if isinstance(v, tuple) else v[i : i + 1]


def jacobian(fn, x, context=None, vectorize=False) -> torch.Tensor:
    """The (n, n) Jacobian of a layer direction at one sample x (batch of 1)."""

    def f(vec):
        out, _ = fn(unflat(vec[None], x), context)
        return flat(out)[0]

    return torch.autograd.functional.jacobian(f, flat(x)[0], vectorize=vectorize)


def g(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, scale=1.0):
    return scale * torch.randn(*shape, generator=g(seed), dtype=F64)


def pair(shape, seed, scale=1.0):
    return randn(B, *shape, seed=seed, scale=scale), randn(B, *shape, seed=seed + 1000, scale=scale)


# --- the layer cases ---------------------------------------------------------------------------


@dataclass
class Case:
    layer: torch.nn.Module
    make_input: Callable[[int], object]
    make_output: Optional[Callable[[int], object]] = None  # default: forward of another input
    context: Optional[torch.Tensor] = None
    elementwise: bool = False
    volume_preserving: bool = False
    coupling: bool = False


def _initialised(layer, make_input, context=None, seed=0):
    """Data-dependent init on one batch, then random perturbation of every parameter."""
    layer = layer.double()
    with data_dependent_init(layer):
        layer(make_input(seed + 500), context)
    perturb_parameters(layer, 0.1, seed=seed)
    return layer


def _conditioner(c_in, c_out, h, w, **kw):
    return Conditioner(c_in, c_out, h, w, filters=8, blocks=1, heads=2, **kw)


def _mixture_coupling(context_channels=0, k=3, seed=1, **kw):
    half = (C, H, W // 2)
    cond = _conditioner(C, C * (2 + 3 * k), H, W // 2, context_channels=context_channels, **kw)
    layer = MixtureLogisticCoupling(cond, C, k)
    ctx = randn(B, context_channels, H, W // 2, seed=77) if context_channels else None
    mk = lambda s: pair(half, s, 1.5)  # noqa: E731
    return Case(_initialised(layer, mk, ctx, seed), mk, lambda s: pair(half, s + 3, 2.0), ctx, coupling=True)


def _affine_coupling(seed=2, **kw):
    half = (C, H, W // 2)
    layer = AffineCoupling(_conditioner(C, 2 * C, H, W // 2, **kw), C)
    mk = lambda s: pair(half, s)  # noqa: E731
    return Case(_initialised(layer, mk, None, seed), mk, lambda s: pair(half, s + 3), coupling=True)


def _sequential():
    k = 2
    half = (C, H, W // 2)
    ch_half = (2 * C, H // 2, W // 2)
    layers = Sequential(
        LogitPreprocess(256),
        StripeSplit(),
        ElementwiseNorm(half),
        Pointwise(C),
        MixtureLogisticCoupling(_conditioner(C, C * (2 + 3 * k), H, W // 2), C, k),
        SwapHalves(),
        ElementwiseNorm(half),
        AffineCoupling(_conditioner(C, 2 * C, H, W // 2), C),
        SwapHalves(),
        Inverse(StripeSplit()),
        Squeeze(),
        ChannelSplit(),
        ElementwiseNorm(ch_half),
        Pointwise(2 * C),
        MixtureLogisticCoupling(_conditioner(2 * C, 2 * C * (2 + 3 * k), H // 2, W // 2), 2 * C, k),
        SwapHalves(),
        Inverse(ChannelSplit()),
    )
    mk = lambda s: 256.0 * torch.rand(B, C, H, W, generator=g(s), dtype=F64)  # noqa: E731
    # Inverse-first round trips start from forward(another input): a random latent can map to
    # the saturated ends of the logit pre-processing, where the round trip is ill-conditioned.
    return Case(_initialised(layers, mk, None, 3), mk)


def _norm(halves):
    if halves == 2:
        mk = lambda s: pair((C, H, W // 2), s, 3.0)  # noqa: E731
        layer = ElementwiseNorm((C, H, W // 2))
    else:
        mk = lambda s: 2.0 + randn(B, C, H, W, seed=s, scale=3.0)  # noqa: E731
        layer = ElementwiseNorm((C, H, W), halves=1)
    return Case(_initialised(layer, mk, None, 4), mk, elementwise=True)


def _pointwise():
    mk = lambda s: pair((3, H, W // 2), s)  # noqa: E731
    return Case(_initialised(Pointwise(3), mk, None, 5), mk)


def _tensor(s, c=C):
    return randn(B, c, H, W, seed=s)


CASES = {
    "LogitPreprocess(256)": lambda: Case(
        LogitPreprocess(256).double(),
        lambda s: 256.0 * torch.rand(B, C, H, W, generator=g(s), dtype=F64),
        lambda s: randn(B, C, H, W, seed=s, scale=2.0),
        elementwise=True,
    ),
    "LogitPreprocess(17, margin=0)": lambda: Case(
        LogitPreprocess(17, margin=0.0).double(),
        lambda s: 0.01 + 16.98 * torch.rand(B, C, H, W, generator=g(s), dtype=F64),
        lambda s: randn(B, C, H, W, seed=s, scale=3.0),
        elementwise=True,
    ),
    "Sigmoid": lambda: Case(
        Sigmoid(),
        lambda s: randn(B, C, H, W, seed=s, scale=3.0),
        lambda s: 0.01 + 0.98 * torch.rand(B, C, H, W, generator=g(s), dtype=F64),
        elementwise=True,
    ),
    "StripeSplit": lambda: Case(StripeSplit(), _tensor, volume_preserving=True),
    "Inverse(StripeSplit)": lambda: Case(
        Inverse(StripeSplit()), lambda s: pair((C, H, W // 2), s), volume_preserving=True
    ),
    "ChannelSplit": lambda: Case(ChannelSplit(), lambda s: _tensor(s, 4), volume_preserving=True),
    "Inverse(ChannelSplit)": lambda: Case(
        Inverse(ChannelSplit()), lambda s: pair((2, H, W), s), volume_preserving=True
    ),
    "SwapHalves": lambda: Case(SwapHalves(), lambda s: pair((C, H, W // 2), s), volume_preserving=True),
    "Squeeze": lambda: Case(Squeeze(), lambda s: _tensor(s, 3), volume_preserving=True),
    "ElementwiseNorm(pair)": lambda: _norm(2),
    "ElementwiseNorm(single)": lambda: _norm(1),
    "Pointwise": _pointwise,
    "MixtureLogisticCoupling": lambda: _mixture_coupling(),
    "MixtureLogisticCoupling(context)": lambda: _mixture_coupling(context_channels=3, seed=6),
    "MixtureLogisticCoupling(K=1, no attention, concat_elu, weight_norm)": lambda: _mixture_coupling(
        k=1, seed=7, mixer="pointwise", final_concat_elu=True, weight_norm=True
    ),
    "AffineCoupling": lambda: _affine_coupling(),
    "AffineCoupling(no mixer, no layer norm)": lambda: _affine_coupling(seed=8, mixer="none", layer_norm=False),
    "Sequential": _sequential,
}

ELEMENTWISE = [
    "LogitPreprocess(256)",
    "LogitPreprocess(17, margin=0)",
    "Sigmoid",
    "ElementwiseNorm(pair)",
    "ElementwiseNorm(single)",
]
COUPLINGS = [name for name in CASES if "Coupling" in name]
# Layers whose inverse is closed-form (the couplings' inverse runs an iterative solver: their
# inverse log-det is tested against -forward log-det instead of an autograd Jacobian).
CLOSED_FORM_INVERSE = [name for name in CASES if name not in COUPLINGS and name != "Sequential"]

_built: dict[str, Case] = {}


@pytest.fixture(params=list(CASES))
def case(request) -> Case:
    if request.param not in _built:
        torch.manual_seed(0)
        _built[request.param] = CASES[request.param]()
    return _built[request.param]


def output_point(case: Case, seed: int):
    if case.make_output is not None:
        return case.make_output(seed)
    with torch.no_grad():
        return case.layer(case.make_input(seed + 7), case.context)[0]


def max_abs(a, b) -> float:
    return (flat(a) - flat(b)).abs().max().item()


MEASURED: dict[str, dict[str, float]] = {}


def record(name, key, value):
    MEASURED.setdefault(name, {})[key] = value


@pytest.fixture(scope="module", autouse=True)
def report_measurements():
    yield
    if MEASURED:
        print("\n[flows] measured errors (float64, random non-identity parameters):")
        for name, vals in MEASURED.items():
            print(f"  {name:>62s}: " + ", ".join(f"{k} {v:.2g}" for k, v in sorted(vals.items())))


# --- generic properties --------------------------------------------------------------------------


@torch.no_grad()
def test_round_trip_forward_then_inverse(case, request):
    x = case.make_input(1)
    y, ld = case.layer(x, case.context)
    assert ld.shape == (B,) and ld.dtype == F64
    x2, ild = case.layer.inverse(y, case.context)
    err = max_abs(x2, x)
    record(request.node.callspec.id, "x->y->x", err)
    assert err < 1e-9
    assert type(x2) is type(x)


@torch.no_grad()
def test_round_trip_inverse_then_forward(case, request):
    y = output_point(case, 2)
    x, ild = case.layer.inverse(y, case.context)
    assert ild.shape == (B,)
    y2, ld = case.layer(x, case.context)
    err = max_abs(y2, y)
    record(request.node.callspec.id, "y->x->y", err)
    assert err < 1e-9
    assert (ld + ild).abs().max().item() < 1e-9


@torch.no_grad()
def test_inverse_logdet_is_minus_forward_logdet(case, request):
    x = case.make_input(3)
    y, ld = case.layer(x, case.context)
    _, ild = case.layer.inverse(y, case.context)
    err = (ld + ild).abs().max().item()
    record(request.node.callspec.id, "|ld_fwd + ld_inv|", err)
    assert err < 1e-9
    if case.volume_preserving:
        assert torch.equal(ld, torch.zeros(B, dtype=ld.dtype)) and torch.equal(ild, torch.zeros(B, dtype=F64))
    else:
        assert ld.abs().min().item() > 1e-3  # not trivially zero


def test_logdet_matches_jacobian(case, request):
    x = case.make_input(4)
    with torch.no_grad():
        _, ld = case.layer(x, case.context)
    worst = 0.0
    for i in range(B):
        ctx = None if case.context is None else case.context[i : i + 1]
        jac = jacobian(case.layer, sample(x, i), ctx)
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        worst = max(worst, abs(logabs.item() - ld[i].item()))
    record(request.node.callspec.id, "|ld - log|det J||", worst)
    assert worst < 1e-9


@pytest.mark.parametrize("case", CLOSED_FORM_INVERSE, indirect=True)
def test_inverse_logdet_matches_jacobian_of_inverse(case, request):
    y = output_point(case, 5)
    with torch.no_grad():
        _, ild = case.layer.inverse(y, case.context)
    worst = 0.0
    for i in range(B):
        jac = jacobian(case.layer.inverse, sample(y, i))
        worst = max(worst, abs(torch.linalg.slogdet(jac)[1].item() - ild[i].item()))
    record(request.node.callspec.id, "|ld_inv - log|det J_inv||", worst)
    assert worst < 1e-9


@pytest.mark.parametrize("case", ELEMENTWISE, indirect=True)
def test_elementwise_layers_have_diagonal_jacobian(case):
    assert case.elementwise
    x = case.make_input(6)
    with torch.no_grad():
        _, ld = case.layer(x, case.context)
    for i in range(B):
        jac = jacobian(case.layer, sample(x, i))
        diag = torch.diagonal(jac)
        assert torch.count_nonzero(jac - torch.diag(diag)) == 0
        assert (diag > 0).all()
        assert diag.log().sum().item() == pytest.approx(ld[i].item(), abs=1e-10)


@pytest.mark.parametrize("case", COUPLINGS, indirect=True)
def test_coupling_is_block_triangular_and_far_from_identity(case):
    assert case.coupling
    x = case.make_input(7)
    with torch.no_grad():
        (y_c, y_e), _ = case.layer(x, case.context)
    assert torch.equal(y_c, x[0])  # the conditioning half passes unchanged
    assert (y_e - x[1]).abs().max().item() > 0.3  # the random parameters are far from identity
    ctx = None if case.context is None else case.context[:1]
    jac = jacobian(case.layer, sample(x, 0), ctx)
    n = x[0][0].numel()
    assert torch.equal(jac[:n, :n], torch.eye(n, dtype=F64))  # d y_c / d x_c = I
    assert torch.count_nonzero(jac[:n, n:]) == 0  # d y_c / d x_e = 0
    block = jac[n:, n:]  # d y_e / d x_e is diagonal (elementwise transform)
    assert torch.count_nonzero(block - torch.diag(torch.diagonal(block))) == 0
    assert torch.count_nonzero(jac[n:, :n]) > 0  # and does depend on x_c


# --- specific layers -------------------------------------------------------------------------------


def space_to_depth_reference(x: np.ndarray) -> np.ndarray:
    """TF space_to_depth(block 2) written out on NCHW: out[:, (dy*2 + dx)*C + c, i, j] = x[:, c, 2i+dy, 2j+dx]."""
    b, c, h, w = x.shape
    out = np.empty((b, 4 * c, h // 2, w // 2), x.dtype)
    for dy in range(2):
        for dx in range(2):
            for ch in range(c):
                for i in range(h // 2):
                    for j in range(w // 2):
                        out[:, (dy * 2 + dx) * c + ch, i, j] = x[:, ch, 2 * i + dy, 2 * j + dx]
    return out


def test_squeeze_matches_tf_space_to_depth_channel_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=F64).reshape(2, 3, 4, 6)
    y, ld = Squeeze()(x)
    assert y.shape == (2, 12, 2, 3)
    np.testing.assert_array_equal(y.numpy(), space_to_depth_reference(x.numpy()))
    assert torch.equal(ld, torch.zeros(2, dtype=F64))
    # TF works on NHWC: the channel vector at (i, j) is the 2x2 block read row by row, each pixel's
    # channels contiguous.
    nhwc = x.permute(0, 2, 3, 1).numpy()
    block = nhwc[:, 2:4, 4:6, :].reshape(2, 12)
    np.testing.assert_array_equal(y[:, :, 1, 2].numpy(), block)
    # ... which is not pixel_unshuffle's (c, dy, dx) order.
    assert not torch.equal(y, torch.nn.functional.pixel_unshuffle(x, 2))
    # A channel split after the squeeze separates the top row of each block from the bottom row.
    top, bottom = ChannelSplit()(y)[0]
    np.testing.assert_array_equal(top.numpy(), space_to_depth_reference(x.numpy())[:, :6])
    assert set(top.flatten().tolist()) == set(x[:, :, 0::2, :].flatten().tolist())
    assert set(bottom.flatten().tolist()) == set(x[:, :, 1::2, :].flatten().tolist())


def test_stripe_split_gives_even_and_odd_columns():
    x = torch.arange(2 * 3 * 4 * 6, dtype=F64).reshape(2, 3, 4, 6)
    (a, b), _ = StripeSplit()(x)
    xn = x.numpy()
    np.testing.assert_array_equal(a.numpy(), xn[..., [0, 2, 4]])
    np.testing.assert_array_equal(b.numpy(), xn[..., [1, 3, 5]])
    assert torch.equal(Inverse(StripeSplit())((a, b))[0], x)
    assert torch.equal(StripeSplit().inverse((a, b))[0], x)


def test_channel_split_and_swap():
    x = torch.arange(2 * 4 * 2 * 2, dtype=F64).reshape(2, 4, 2, 2)
    (a, b), _ = ChannelSplit()(x)
    assert torch.equal(a, x[:, :2]) and torch.equal(b, x[:, 2:])
    (b2, a2), _ = SwapHalves()((a, b))
    assert b2 is b and a2 is a


@pytest.mark.parametrize(
    "layer, shape",
    [
        (Squeeze(), (1, 2, 3, 4)),
        (Squeeze(), (1, 2, 4, 3)),
        (StripeSplit(), (1, 2, 4, 3)),
        (ChannelSplit(), (1, 3, 4, 4)),
    ],
)
def test_reshapes_reject_odd_sizes(layer, shape):
    with pytest.raises(ValueError, match=r"got shape \(" + ", ".join(map(str, shape)) + r"\)"):
        layer(torch.zeros(shape))


def test_elementwise_norm_data_dependent_init():
    torch.manual_seed(0)
    half = (C, H, W // 2)
    x = (randn(64, *half, seed=1, scale=3.0) + 5.0, randn(64, *half, seed=2, scale=0.2) - 1.0)
    layer = ElementwiseNorm(half).double()
    with data_dependent_init(layer):
        (a, b), ld = layer(x)
    for t in (a, b):  # per element: mean 0, std 1 over the batch
        assert t.mean(0).abs().max().item() < 1e-12
        assert (t.std(0, unbiased=False) - 1).abs().max().item() < 1e-6
    assert ld[0].item() == pytest.approx(sum(torch.log(s).sum().item() for s in layer.scales), rel=1e-12)
    assert bool(layer.initialized)
    # Init happens once: a second batch inside init mode changes nothing.
    before = [p.clone() for p in layer.parameters()]
    with data_dependent_init(layer):
        layer((x[0] * 2, x[1] * 3))
    assert all(torch.equal(p, q) for p, q in zip(before, layer.parameters()))
    # ... and outside init mode, a fresh layer is not initialised by a forward call.
    fresh = ElementwiseNorm(half).double()
    fresh(x)
    assert not bool(fresh.initialized)
    assert all(torch.equal(s, torch.ones(half, dtype=F64)) for s in fresh.scales)


def test_elementwise_norm_rejects_wrong_number_of_parts():
    with pytest.raises(ValueError, match="2 parts, got 1"):
        ElementwiseNorm((C, H, W))(torch.zeros(1, C, H, W))


def test_pointwise_starts_near_identity_and_keeps_halves_apart(perturb):
    torch.manual_seed(0)
    layer = Pointwise(4).double()
    for w in layer.weights:
        assert (w - torch.eye(4, dtype=F64)).abs().max().item() < 0.01
    perturb(layer, 0.1)
    x = pair((4, 2, 2), 0)
    (a, b), _ = layer(x)
    (a2, b2), _ = layer((x[0], torch.zeros_like(x[1])))
    assert torch.equal(a, a2)  # the first half does not see the second


def test_sequential_container():
    seq = Sequential(StripeSplit(), SwapHalves(), Inverse(StripeSplit()))
    assert len(seq) == 3 and isinstance(seq[1], SwapHalves)
    x = randn(2, 1, 2, 4)
    y, ld = seq(x)
    assert torch.equal(y, x[..., [1, 0, 3, 2]])
    assert torch.equal(seq.inverse(y)[0], x)


def test_float32_model_with_float64_mixture(perturb):
    torch.manual_seed(0)
    half = (C, H, W // 2)
    cond = _conditioner(C, C * (2 + 3 * 2), H, W // 2)
    layer = MixtureLogisticCoupling(cond, C, 2, mixture_dtype=torch.float64)
    x = tuple(t.float() for t in pair(half, 0))
    with data_dependent_init(layer):
        layer(x)
    perturb(layer, 0.1)
    with torch.no_grad():
        (y_c, y_e), ld = layer(x)
        assert y_e.dtype == torch.float32 and ld.dtype == torch.float32
        (_, x_e), ild = layer.inverse((y_c, y_e))
    assert x_e.dtype == torch.float32
    assert (x_e - x[1]).abs().max().item() < 1e-4
    assert (ld + ild).abs().max().item() < 1e-3


# --- float64 accuracy of the fixed elementwise log-dets (torch softplus threshold) ----------------


@pytest.mark.parametrize("which", ["Sigmoid", "LogitPreprocess(margin=0)"])
def test_elementwise_logdet_float64_past_softplus_threshold(which):
    # Regression: F.softplus (linear past threshold 20) lost log1p(exp(-|x|)), up to 2e-9 in float64.
    if which == "Sigmoid":
        x = torch.tensor([[20.5, -20.5, 25.0, 30.0]], dtype=F64)
        # log sigmoid'(x) = -|x| - 2 log1p(exp(-|x|)), exactly
        expected = sum(-abs(v) - 2 * math.log1p(math.exp(-abs(v))) for v in x[0].tolist())
        _, ld = Sigmoid()(x)
    else:
        # p = x / 256 = 1 - 2^-36 exactly; y = logit(p) ~ 24.95; d y / d x = 1 / (256 p (1 - p))
        x = torch.tensor([[256.0 - 2.0**-28]], dtype=F64)
        expected = -math.log(256.0) - math.log1p(-(2.0**-36)) + 36 * math.log(2.0)
        _, ld = LogitPreprocess(256, margin=0.0)(x)
    assert ld.item() == pytest.approx(expected, rel=4 * torch.finfo(F64).eps)

"""The whole model: the `tiny` config in float64 with random non-identity parameters."""

from __future__ import annotations

import io
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flowpp
from flowpp.dequantizers import UniformDequantizer, VariationalDequantizer
from flowpp.flows import LogitPreprocess, MixtureLogisticCoupling, Sequential

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def images(config, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.num_levels, (n, *config.image_shape), generator=g)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def continuous(config, n, seed=0):
    """Continuous images in (0, L): integers plus uniform noise."""
    g = gen(seed)
    x = torch.randint(0, config.num_levels, (n, *config.image_shape), generator=g).to(F64)
    return x + torch.rand(x.shape, generator=g, dtype=F64).clamp(1e-6, 1 - 1e-6)


def jacobian_of(fn, x):
    """(D, D) Jacobian of a tensor -> tensor map at one sample (batch 1)."""
    shape = x.shape
    return torch.autograd.functional.jacobian(lambda v: fn(v.reshape(shape)).reshape(-1), x.reshape(-1))


# --- the main flow and the dequantizer flow ----------------------------------------------------------


def test_tiny_model_structure(tiny_model, tiny_config):
    assert tiny_model.latent_shape == (12, 4, 4)
    n_coupling = sum(isinstance(m, MixtureLogisticCoupling) for m in tiny_model.flow.modules())
    assert n_coupling == 5  # stripe x2, squeeze, channel x2, stripe x1
    assert isinstance(tiny_model.flow[0], LogitPreprocess)
    assert isinstance(tiny_model.dequantizer, VariationalDequantizer)
    assert sum(isinstance(m, MixtureLogisticCoupling) for m in tiny_model.dequantizer.modules()) == 2


@torch.no_grad()
def test_main_flow_round_trips(tiny_model, tiny_config):
    y = continuous(tiny_config, 6, seed=3)
    z, ld = tiny_model.flow(y)
    assert z.shape == (6, 12, 4, 4) and ld.shape == (6,)
    y2, ild = tiny_model.flow.inverse(z)
    err_x = (y2 - y).abs().max().item()
    err_ld = (ld + ild).abs().max().item()
    # The other direction, from latents near the image of the data. (Not z ~ N(0, I): with random
    # parameters the inverse extrapolates far outside the logit range of [0, L] and the
    # pre-processing saturates, which is no defect of the layers.)
    z0 = tiny_model.flow(continuous(tiny_config, 6, seed=4))[0]
    z0 = z0 + 1e-3 * torch.randn(z0.shape, generator=gen(4), dtype=F64)
    y0, ild0 = tiny_model.flow.inverse(z0)
    z1, ld0 = tiny_model.flow(y0)
    err_z = (z1 - z0).abs().max().item()
    err_ld0 = (ld0 + ild0).abs().max().item()
    print(
        f"\n[model] tiny main flow, float64: |y - f^-1(f(y))| {err_x:.3g}, |z - f(f^-1(z))| {err_z:.3g}, "
        f"|ld + ld_inv| {max(err_ld, err_ld0):.3g}"
    )
    assert err_x < 1e-9 and err_z < 1e-9 and err_ld < 1e-9 and err_ld0 < 1e-9
    # the coupling stack is far from the identity
    assert (z - tiny_model.flow[0](y)[0].reshape(6, 12, 4, 4)).abs().max() > 1.0


def test_main_flow_logdet_matches_full_jacobian(tiny_model, tiny_config):
    y = continuous(tiny_config, 1, seed=5)
    with torch.no_grad():
        _, ld = tiny_model.flow(y)
    jac = jacobian_of(lambda v: tiny_model.flow(v)[0], y)
    assert jac.shape == (192, 192)
    sign, logabs = torch.linalg.slogdet(jac)
    err = abs(logabs.item() - ld.item())
    print(
        f"\n[model] tiny main flow: log|det J| (192x192) {logabs.item():.6f} vs logdet {ld.item():.6f}: diff {err:.3g}"
    )
    assert sign.item() != 0
    assert err < 1e-9


def _dequantizer_io(model, config, seed):
    x = images(config, 3, seed=seed).to(F64)
    ctx = model.dequantizer.context_net(x)
    eps = torch.randn(x.shape, generator=gen(seed + 1), dtype=F64)
    return x, ctx, eps


@torch.no_grad()
def test_dequantizer_flow_round_trips_with_context(tiny_model, tiny_config):
    x, ctx, eps = _dequantizer_io(tiny_model, tiny_config, 6)
    assert ctx.shape == (3, tiny_config.context_channels, 8, 4)
    u, ld = tiny_model.dequantizer.flow(eps, ctx)
    assert u.shape == x.shape and ((u > 0) & (u < 1)).all()
    eps2, ild = tiny_model.dequantizer.flow.inverse(u, ctx)
    err = (eps2 - eps).abs().max().item()
    err_ld = (ld + ild).abs().max().item()
    # inverse first, from u in (0, 1)
    u0 = torch.rand(x.shape, generator=gen(7), dtype=F64).clamp(0.01, 0.99)
    e0, ild0 = tiny_model.dequantizer.flow.inverse(u0, ctx)
    u1, ld0 = tiny_model.dequantizer.flow(e0, ctx)
    err_u = (u1 - u0).abs().max().item()
    print(
        f"\n[model] tiny dequantizer flow: |eps - g^-1(g(eps))| {err:.3g}, |u - g(g^-1(u))| {err_u:.3g}, "
        f"|ld + ld_inv| {max(err_ld, (ld0 + ild0).abs().max().item()):.3g}"
    )
    assert err < 1e-9 and err_u < 1e-9 and err_ld < 1e-9 and (ld0 + ild0).abs().max().item() < 1e-9
    # The context matters: another image gives another u.
    u_other, _ = tiny_model.dequantizer.flow(eps, tiny_model.dequantizer.context_net(255 - x))
    assert (u_other - u).abs().max() > 1e-3


def test_dequantizer_flow_logdet_matches_full_jacobian(tiny_model, tiny_config):
    x, ctx, eps = _dequantizer_io(tiny_model, tiny_config, 8)
    eps, ctx = eps[:1], ctx[:1].detach()
    with torch.no_grad():
        _, ld = tiny_model.dequantizer.flow(eps, ctx)
    jac = jacobian_of(lambda v: tiny_model.dequantizer.flow(v, ctx)[0], eps)
    sign, logabs = torch.linalg.slogdet(jac)
    err = abs(logabs.item() - ld.item())
    print(
        f"\n[model] tiny dequantizer flow: log|det J| (192x192) {logabs.item():.6f} vs logdet {ld.item():.6f}: "
        f"diff {err:.3g}"
    )
    assert sign.item() != 0 and err < 1e-9


@torch.no_grad()
def test_log_q_is_the_change_of_variables_density(tiny_model, tiny_config):
    x = images(tiny_config, 3, seed=9).to(F64)
    u, log_q = tiny_model.dequantizer(x, generator=gen(10))
    eps = torch.randn(x.shape, generator=gen(10), dtype=F64)  # the same draw
    ctx = tiny_model.dequantizer.context_net(x)
    eps_back, ild = tiny_model.dequantizer.flow.inverse(u, ctx)
    assert torch.allclose(eps_back, eps, atol=1e-9)
    log_n = (-0.5 * eps.square() - HALF_LOG_2PI).flatten(1).sum(1)
    assert torch.allclose(log_q, log_n + ild, atol=1e-9)


@torch.no_grad()
def test_log_prob_decomposition_and_bits_per_dim(tiny_model, tiny_config):
    x = images(tiny_config, 4, seed=11)
    lp = tiny_model.log_prob(x, generator=gen(1))
    assert lp.shape == (4,) and lp.dtype == F64 and torch.isfinite(lp).all()
    u, log_q = tiny_model.dequantizer(x.to(F64), generator=gen(1))
    z, ld = tiny_model.flow(x.to(F64) + u)
    prior = (-0.5 * z.square() - HALF_LOG_2PI).flatten(1).sum(1)
    assert torch.allclose(lp, prior + ld - log_q, rtol=1e-13, atol=1e-10)
    bpd = tiny_model.bits_per_dim(x, generator=gen(1))
    assert torch.allclose(bpd, -lp / (192 * math.log(2)), rtol=1e-13)
    # uint8 images are accepted too
    assert torch.equal(tiny_model.log_prob(x.to(torch.uint8), generator=gen(1)), lp)


@torch.no_grad()
def test_flow_treats_samples_independently(tiny_model, tiny_config):
    y = continuous(tiny_config, 4, seed=12)
    z, ld = tiny_model.flow(y)
    for i in range(4):
        zi, ldi = tiny_model.flow(y[i : i + 1])
        assert torch.allclose(zi, z[i : i + 1], rtol=1e-12, atol=1e-12)
        assert torch.allclose(ldi, ld[i : i + 1], rtol=1e-12, atol=1e-12)


# --- data-dependent init and checkpoints ---------------------------------------------------------------


def test_initialize_is_idempotent(tiny_config):
    torch.manual_seed(0)
    model = flowpp.FlowPlusPlus(tiny_config).double()
    assert not bool(model.initialized)
    assert model.initialize(images(tiny_config, 16, seed=1)) is True
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.initialize(images(tiny_config, 16, seed=2)) is False
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert bool(model.initialized)
    # every data-dependent layer is marked, and the init mode is switched off again
    flags = [k for k in state if k.endswith("initialized")]
    assert len(flags) > 20 and all(bool(state[k]) for k in flags)
    assert not any(getattr(m, "_ddi_active", False) for m in model.modules())


def test_first_coupling_normalises_the_init_batch(tiny_config):
    """After init the first ElementwiseNorm outputs mean 0 / std 1 per element on the init batch."""
    torch.manual_seed(0)
    model = flowpp.FlowPlusPlus(tiny_config).double()
    x = images(tiny_config, 16, seed=1)
    model.initialize(x)
    u, _ = model.dequantizer(x.to(F64), generator=gen(0))
    # Re-run the first layers on another dequantization of the same batch: stats close to 0 / 1.
    h = x.to(F64) + u
    for layer in model.flow.layers[:3]:  # LogitPreprocess, StripeSplit, ElementwiseNorm
        h, _ = layer(h)
    for part in h:
        assert part.mean(0).abs().max().item() < 0.5
        assert (part.std(0) - 1).abs().max().item() < 0.5


def test_state_dict_round_trip_keeps_init_and_log_prob(tiny_config, tiny_model):
    x = images(tiny_config, 4, seed=13)
    buf = io.BytesIO()
    torch.save(tiny_model.state_dict(), buf)
    fresh = flowpp.FlowPlusPlus(tiny_config).double()
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert fresh.initialize(images(tiny_config, 16, seed=14)) is False
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    with torch.no_grad():
        lp_a = tiny_model.log_prob(x, generator=gen(0))
        lp_b = fresh.log_prob(x, generator=gen(0))
    assert torch.equal(lp_a, lp_b)


# --- gradients, train / eval ------------------------------------------------------------------------


def test_gradients_reach_every_parameter(tiny_model, tiny_config):
    x = images(tiny_config, 4, seed=15)
    loss = -tiny_model.log_prob(x, generator=gen(0)).mean()
    loss.backward()
    missing = [n for n, p in tiny_model.named_parameters() if p.requires_grad and p.grad is None]
    zero = [
        n
        for n, p in tiny_model.named_parameters()
        if p.requires_grad and p.grad is not None and not bool(p.grad.abs().sum() > 0)
    ]
    assert not missing and not zero, (missing, zero)
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters() if p.grad is not None)


def test_eval_equals_train_without_dropout(tiny_model, tiny_config):
    x = images(tiny_config, 3, seed=16)
    with torch.no_grad():
        tiny_model.train()
        lp_train = tiny_model.log_prob(x, generator=gen(0))
        tiny_model.eval()
        lp_eval = tiny_model.log_prob(x, generator=gen(0))
    assert torch.equal(lp_train, lp_eval)


def test_dropout_acts_in_train_mode_only(tiny_config):
    cfg = tiny_config.replace(dropout=0.5)
    torch.manual_seed(0)
    model = flowpp.FlowPlusPlus(cfg).double()
    model.initialize(images(cfg, 16, seed=1))
    assert any(isinstance(m, nn.Dropout) and m.p == 0.5 for m in model.modules())
    x = images(cfg, 3, seed=17)
    with torch.no_grad():
        model.train()
        a = model.log_prob(x, generator=gen(0))
        b = model.log_prob(x, generator=gen(0))
        model.eval()
        c = model.log_prob(x, generator=gen(0))
        d = model.log_prob(x, generator=gen(0))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    assert torch.equal(c, d)


# --- bits per dim of a uniform density -------------------------------------------------------------


class _LogisticPriorModel(flowpp.FlowPlusPlus):
    """Uniform dequantization, main flow = LogitPreprocess(L, margin 0), standard logistic prior:
    the density of x + u on [0, L]^D is exactly L^-D, so bits/dim must be log2(L)."""

    def __init__(self, num_levels):
        super().__init__(flowpp.get_config("tiny").replace(num_levels=num_levels, dequantizer="uniform"))
        self.flow = Sequential(LogitPreprocess(num_levels, margin=0.0))
        self.latent_shape = self.config.image_shape
        self.dtype_anchor = nn.Parameter(torch.zeros((), dtype=F64))  # sets the model's float type

    def prior_log_prob(self, z):
        return (F.logsigmoid(z) + F.logsigmoid(-z)).flatten(1).sum(1)


@pytest.mark.parametrize("levels", [17, 256])
def test_uniform_density_gives_log2_levels_bits_per_dim(levels):
    model = _LogisticPriorModel(levels)
    assert isinstance(model.dequantizer, UniformDequantizer)
    x = (torch.arange(4 * 192) % levels).reshape(4, 3, 8, 8)  # every level, in all positions
    x[3] = levels - 1
    x[2] = 0
    bpd = model.bits_per_dim(x, generator=gen(0))
    assert bpd.dtype == F64
    err = (bpd - math.log2(levels)).abs().max().item()
    print(f"\n[model] uniform density, L={levels}: |bpd - log2(L)| = {err:.3g}")
    assert err < 1e-10


# --- input checks ----------------------------------------------------------------------------------

BAD_INPUTS = {
    "wrong channels": (lambda: torch.zeros(2, 1, 8, 8, dtype=torch.long), ["(B, 3, 8, 8)", "(2, 1, 8, 8)"]),
    "wrong size": (lambda: torch.zeros(2, 3, 8, 6, dtype=torch.long), ["(B, 3, 8, 8)", "(2, 3, 8, 6)"]),
    "3-D tensor": (lambda: torch.zeros(3, 8, 8, dtype=torch.long), ["(B, 3, 8, 8)", "(3, 8, 8)"]),
    "negative values": (
        lambda: torch.full((2, 3, 8, 8), 5).index_put_((torch.tensor(0),), torch.tensor(-1)),
        ["[0, 256)", "[-1, 5]"],
    ),
    "values >= L": (lambda: torch.full((2, 3, 8, 8), 256), ["[0, 256)", "[256, 256]"]),
    "float images": (lambda: torch.full((2, 3, 8, 8), 3.0), ["integer", "torch.float32"]),
    "not a tensor": (lambda: [[0]], ["torch.Tensor", "list"]),
}


@pytest.mark.parametrize("method", ["log_prob", "bits_per_dim", "initialize"])
@pytest.mark.parametrize("bad", list(BAD_INPUTS))
def test_bad_input_raises_value_error_saying_what_was_expected(method, bad, tiny_config):
    make, fragments = BAD_INPUTS[bad]
    model = flowpp.FlowPlusPlus(tiny_config)  # fresh: initialize() validates before doing anything
    with pytest.raises(ValueError) as info:
        getattr(model, method)(make())
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    assert not bool(model.initialized)


# --- sampling and the continuous bijection ------------------------------------------------------------


@torch.no_grad()
def test_sample(tiny_model, tiny_config):
    a = tiny_model.sample(5, 0.7, generator=gen(3))
    assert a.dtype == torch.int64 and a.shape == (5, 3, 8, 8)
    assert a.min() >= 0 and a.max() < tiny_config.num_levels
    assert torch.equal(a, tiny_model.sample(5, 0.7, generator=gen(3)))
    assert not torch.equal(a, tiny_model.sample(5, 0.7, generator=gen(4)))
    cold = tiny_model.sample(3, 0.0, generator=gen(5))
    assert torch.equal(cold[0], cold[1]) and torch.equal(cold[0], cold[2])
    tiny_model.check_images(a)  # samples are valid model inputs


@torch.no_grad()
def test_decode_inverts_encode(tiny_model, tiny_config):
    y = continuous(tiny_config, 4, seed=18)
    z = tiny_model.encode(y)
    assert z.shape == (4, *tiny_model.latent_shape)
    err = (tiny_model.decode(z) - y).abs().max().item()
    assert err < 1e-9


# --- other configurations of the same library ----------------------------------------------------------

VARIANTS = {
    "affine": dict(coupling="affine"),
    "no attention": dict(mixer="pointwise", dequant_mixer="pointwise"),
    "imagenet-style": dict(
        weight_norm=True,
        final_concat_elu=True,
        mixture_float64=True,
        pointwise=False,
        context_mixer="attention",
        context_layer_norm=True,
    ),
    "uniform dequantizer": dict(dequantizer="uniform"),
    "frozen dequant pos emb": dict(dequant_mixer="none", dequant_frozen_pos_emb=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variants_build_init_and_invert(variant, tiny_config, perturb):
    cfg = tiny_config.replace(**VARIANTS[variant])
    torch.manual_seed(0)
    model = flowpp.FlowPlusPlus(cfg).double()
    assert model.initialize(images(cfg, 8, seed=1))
    perturb(model, 0.1)
    x = images(cfg, 2, seed=2)
    lp = model.log_prob(x, generator=gen(0))
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    with torch.no_grad():
        y = continuous(cfg, 2, seed=3)
        z, ld = model.flow(y)
        y2, ild = model.flow.inverse(z)
    assert (y2 - y).abs().max().item() < 1e-9 and (ld + ild).abs().max().item() < 1e-9


def test_float32_model_round_trip_and_bits_per_dim(tiny_config):
    torch.manual_seed(0)
    model = flowpp.FlowPlusPlus(tiny_config)
    x = images(tiny_config, 16, seed=1)
    model.initialize(x)
    with torch.no_grad():
        bpd = model.bits_per_dim(x[:4], generator=gen(0))
        y = continuous(tiny_config, 4, seed=2).float()
        z, ld = model.flow(y)
        y2, ild = model.flow.inverse(z)
    err = (y2 - y).abs().max().item()
    print(f"\n[model] tiny float32 at init: bpd {bpd.mean().item():.3f}, |y - f^-1(f(y))| {err:.3g}")
    assert bpd.dtype == torch.float32 and torch.isfinite(bpd).all()
    assert 6.0 < bpd.mean().item() < 12.0  # random 8-bit data at init: about 8 bits/dim
    assert err < 1e-2


def test_bf16_autocast_of_the_conditioners_keeps_mixture_math_in_float32():
    cfg = flowpp.get_config("tiny")
    torch.manual_seed(0)
    model = flowpp.FlowPlusPlus(cfg).eval()
    x = torch.randint(0, 256, (8, 3, 8, 8))
    model.initialize(x)
    ref = model.bits_per_dim(x, generator=torch.Generator().manual_seed(1))
    model.set_autocast(torch.bfloat16)
    low = model.bits_per_dim(x, generator=torch.Generator().manual_seed(1))
    assert low.dtype == torch.float32
    diff = (low - ref).abs().max().item()
    assert 0 < diff < 0.05  # bf16 changes the numbers a little, not the result
    # Each coupling stays an exact bijection: given the same conditioner input, the bf16
    # network returns the same parameters in both directions.
    coupling = next(layer for layer in model.flow.layers if isinstance(layer, flowpp.flows.MixtureLogisticCoupling))
    u = (torch.randn(8, 3, 8, 4), torch.randn(8, 3, 8, 4))
    with torch.no_grad():
        v, ld = coupling(u)
        u2, ild = coupling.inverse(v)
    assert torch.equal(u2[0], u[0]) and (u2[1] - u[1]).abs().max() < 1e-4 and (ld + ild).abs().max() < 1e-3
    # Through the whole flow the float32 inverse error (~1e-6) can flip a bf16 rounding of a
    # later conditioner's input, which moves its output by a bf16 step, so whole-model round
    # trips with bf16 conditioners are only approximate (0.18 px on this model).
    y = x.float() + 0.5
    assert (model.decode(model.encode(y)) - y).abs().max() < 1.0
    model.set_autocast(None)
    assert torch.equal(model.bits_per_dim(x, generator=torch.Generator().manual_seed(1)), ref)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = flowpp.get_config("tiny")
    torch.manual_seed(0)
    model = flowpp.FlowPlusPlus(cfg).double()
    x = torch.randint(0, 256, (4, 3, 8, 8))
    model.initialize(x)

    def loss_and_grads():
        model.zero_grad()
        loss = -model.log_prob(x, generator=torch.Generator().manual_seed(3)).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ref_loss, ref_grads = loss_and_grads()
    model.set_activation_checkpointing(True)
    loss, grads = loss_and_grads()
    assert torch.allclose(loss, ref_loss, rtol=0, atol=1e-10)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-8, atol=1e-10)


def _compiled_against_eager(backend: str):
    """log_prob and decode of the tiny model eager and with compile_networks(backend=...), the
    number of graphs compiled, and whether the state_dict's keys stayed the same."""
    import torch._dynamo

    torch.manual_seed(0)
    model = flowpp.FlowPlusPlus(flowpp.get_config("tiny")).eval()
    x = torch.randint(0, 256, (4, 3, 8, 8))
    model.initialize(x)
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model.log_prob(x, generator=torch.Generator().manual_seed(0))
        z = torch.randn(4, *model.latent_shape, generator=torch.Generator().manual_seed(1))  # one shape: one compile
        ref_decoded = model.decode(z)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        model.compile_networks(backend=backend)
        with torch.no_grad():
            got = model.log_prob(x, generator=torch.Generator().manual_seed(0))
            decoded = model.decode(z)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()  # no compiled graphs left for later tests
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(decoded, ref_decoded, rtol=1e-5, atol=1e-4)
    return graphs, list(model.state_dict()) == keys


def test_compile_networks_compiles_the_networks_and_keeps_the_numbers_and_the_checkpoint_keys():
    # dynamo's capture without code generation: what flowpp sets up, in seconds and without a
    # C++ compiler (inductor's code generation, below, takes over a minute on a fresh machine).
    graphs, same_keys = _compiled_against_eager("aot_eager")
    assert graphs > 0 and same_keys


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
    reason="torch.compile on CPU needs a C++ compiler",
)
def test_compile_networks_with_inductor_gives_the_same_numbers():
    graphs, same_keys = _compiled_against_eager("inductor")
    assert graphs > 0 and same_keys

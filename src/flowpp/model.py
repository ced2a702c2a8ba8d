"""The Flow++ model: a dequantizer and a multi-scale coupling flow with a N(0, I) prior.

The main flow is built from the config's ``layout``, one stage per entry, exactly as the
paper's architecture table reads. For the CIFAR-10 config ``print(model.flow)`` lists:

    LogitPreprocess
    StripeSplit,   4 x [ElementwiseNorm, Pointwise, MixtureLogisticCoupling, SwapHalves], Inverse(StripeSplit)
    Squeeze
    ChannelSplit,  2 x [...], Inverse(ChannelSplit)
    StripeSplit,   3 x [...], Inverse(StripeSplit)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .configs import FlowConfig, model_size, parse_stage
from .ddi import data_dependent_init
from .dequantizers import UniformDequantizer, VariationalDequantizer
from .errors import ConfigError, InputError
from .flows import (
    AffineCoupling,
    ChannelSplit,
    ElementwiseNorm,
    Flow,
    Inverse,
    LogitPreprocess,
    MixtureLogisticCoupling,
    Pointwise,
    Sequential,
    Sigmoid,
    Squeeze,
    StripeSplit,
    SwapHalves,
    standard_normal_log_prob,
)
from .nets import Conditioner, ContextNet

__all__ = ["FlowPlusPlus", "count_parameters"]


def _coupling_step(
    cfg: FlowConfig,
    half_shape: tuple[int, int, int],
    *,
    filters: int,
    blocks: int,
    components: int,
    mixer: str,
    context_channels: int = 0,
    frozen_pos_emb: bool = False,
) -> list[Flow]:
    """[Norm, (Pointwise), coupling, swap] for one pair of halves of shape (C, H, W) each."""
    c, h, w = half_shape
    per_element = 2 + 3 * components if cfg.coupling == "mixture" else 2
    conditioner = Conditioner(
        c,
        c * per_element,
        h,
        w,
        filters=filters,
        blocks=blocks,
        mixer=mixer,
        heads=cfg.heads,
        layer_norm=cfg.layer_norm,
        context_channels=context_channels,
        gate_kernel=1,
        final_concat_elu=cfg.final_concat_elu,
        dropout=cfg.dropout,
        weight_norm=cfg.weight_norm,
        frozen_pos_emb=frozen_pos_emb,
    )
    if cfg.coupling == "mixture":
        coupling = MixtureLogisticCoupling(
            conditioner, c, components, mixture_dtype=torch.float64 if cfg.mixture_float64 else None
        )
    else:
        coupling = AffineCoupling(conditioner, c)
    step: list[Flow] = [ElementwiseNorm(half_shape)]
    if cfg.pointwise:
        step.append(Pointwise(c))
    return step + [coupling, SwapHalves()]


def _stages(
    cfg: FlowConfig, layout: tuple[str, ...], shape: tuple[int, int, int], **coupling_kwargs
) -> tuple[list[Flow], tuple[int, int, int]]:
    """The layers of each layout stage in order, and the shape that comes out."""
    layers: list[Flow] = []
    c, h, w = shape
    for token in layout:
        kind, n, mixing = parse_stage(token)
        if kind == "squeeze":
            if h % 2 or w % 2:
                raise ConfigError(f"config {cfg.name!r}: cannot squeeze a {c}x{h}x{w} volume")
            layers.append(Squeeze())
            c, h, w = 4 * c, h // 2, w // 2
            continue
        if kind == "stripe":
            if w % 2:
                raise ConfigError(f"config {cfg.name!r}: stripe split needs an even width, got {c}x{h}x{w}")
            split, half = StripeSplit(), (c, h, w // 2)
        else:
            if c % 2:
                raise ConfigError(f"config {cfg.name!r}: channel split needs an even channel count, got {c}x{h}x{w}")
            split, half = ChannelSplit(), (c // 2, h, w)
        layers.append(split)
        stage_kwargs = coupling_kwargs if mixing else {**coupling_kwargs, "mixer": "none"}
        for _ in range(n):
            layers.extend(_coupling_step(cfg, half, **stage_kwargs))
        layers.append(Inverse(split))
    return layers, (c, h, w)


class FlowPlusPlus(nn.Module):
    """Flow++ for integer images of shape ``config.image_shape`` with ``config.num_levels`` levels.

    ``log_prob(x)`` is the dequantization lower bound E_q[log p(x + u) - log q(u|x)] estimated
    with one u per image, in nats, for integer images x (B, C, H, W) with values in [0, L).
    """

    def __init__(self, config: FlowConfig):
        super().__init__()
        self.config = config
        cfg = config
        c, h, w = cfg.image_shape

        main_layers, latent_shape = _stages(
            cfg,
            cfg.layout,
            cfg.image_shape,
            filters=cfg.filters,
            blocks=cfg.blocks,
            components=cfg.components,
            mixer=cfg.mixer,
        )
        self.flow = Sequential(LogitPreprocess(cfg.num_levels), *main_layers)
        self.latent_shape = latent_shape

        if cfg.dequantizer == "uniform":
            self.dequantizer: nn.Module = UniformDequantizer()
        else:
            dq_layers, _ = _stages(
                cfg,
                cfg.dequant_layout,
                cfg.image_shape,
                filters=cfg.dequant_filters,
                blocks=cfg.dequant_blocks,
                components=cfg.dequant_components,
                mixer=cfg.dequant_mixer,
                context_channels=cfg.context_channels,
                frozen_pos_emb=cfg.dequant_frozen_pos_emb,
            )
            context_net = ContextNet(
                c,
                h,
                w,
                cfg.num_levels,
                channels=cfg.context_channels,
                blocks=cfg.context_blocks,
                mixer=cfg.context_mixer,
                heads=cfg.heads,
                layer_norm=cfg.context_layer_norm,
                dropout=cfg.dropout,
                weight_norm=cfg.weight_norm,
            )
            self.dequantizer = VariationalDequantizer(context_net, Sequential(*dq_layers, Sigmoid()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @classmethod
    def from_pretrained(cls, path, device="cpu") -> "FlowPlusPlus":
        """The model of an exported ``.safetensors`` file, in eval mode (:func:`flowpp.load`)."""
        from .export_file import load_export

        return load_export(path, device, cls)[0]

    def set_autocast(self, dtype: torch.dtype | None) -> "FlowPlusPlus":
        """Run the conditioner and context networks under autocast (e.g. ``torch.bfloat16`` on
        CUDA); ``None`` turns it off. The mixture CDF math and the log-determinants stay in the
        model's precision, since the networks hand back float32 parameters."""
        from .nets import Conditioner, ContextNet

        for m in self.modules():
            if isinstance(m, (Conditioner, ContextNet)):
                m.autocast_dtype = dtype
        return self

    def compile_networks(self, **options) -> "FlowPlusPlus":
        """``torch.compile`` each conditioner and context network in place (``options`` go to
        ``torch.compile``); the mixture math and the flow's bookkeeping stay eager.

        Compiling fuses the networks' elementwise work (concat-ELU, gates, layer norm, residual
        adds) around the convolutions and attention (what it gains: docs/performance.md). Each
        new input shape compiles first; on CPU this needs a C++ compiler.
        Call it after ``initialize`` and after any copies (EMA) are made; parameters and
        ``state_dict`` keys are unchanged. It raises dynamo's process-wide cache limit to fit
        one compiled graph per network and input shape.
        """
        import torch._dynamo

        from .nets import Conditioner, ContextNet

        networks = [m for m in self.modules() if isinstance(m, (Conditioner, ContextNet))]
        # All networks share one code object, so dynamo keeps one cache entry per network and
        # input shape; the default limit (8) would silently leave the rest uncompiled.
        for key in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 4 * len(networks)))
        for m in networks:
            m.compile(**options)
        return self

    def set_activation_checkpointing(self, enabled: bool = True) -> "FlowPlusPlus":
        """Recompute each conditioner network in the backward pass instead of storing its
        activations: much less training memory for about one more forward pass of compute."""
        from .nets import Conditioner

        for m in self.modules():
            if isinstance(m, Conditioner):
                m.activation_checkpointing = enabled
        return self

    # --- input checks -----------------------------------------------------------------------

    def check_images(self, x: Tensor) -> None:
        """Raise InputError unless x is an integer tensor (B, C, H, W) with values in [0, L)."""
        expected = tuple(self.config.image_shape)
        if not isinstance(x, Tensor):
            raise InputError(f"expected a torch.Tensor of integer images, got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise InputError(
                f"expected images of shape (B, {expected[0]}, {expected[1]}, {expected[2]}) (B, C, H, W), "
                f"got {tuple(x.shape)}"
            )
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise InputError(
                f"expected integer images (uint8 or int64) with values in [0, {self.config.num_levels}), "
                f"got dtype {x.dtype}; convert with x.round().long() if the values are whole numbers"
            )
        if x.numel():
            lo, hi = int(x.min()), int(x.max())
            if lo < 0 or hi >= self.config.num_levels:
                raise InputError(
                    f"expected pixel values in [0, {self.config.num_levels}) for config {self.config.name!r}, "
                    f"got values in [{lo}, {hi}]"
                )

    def _float(self, x: Tensor) -> Tensor:
        return x.to(next(self.parameters()).dtype)

    # --- densities ----------------------------------------------------------------------------

    def prior_log_prob(self, z: Tensor) -> Tensor:
        return standard_normal_log_prob(z)

    def log_prob(
        self, x: Tensor, *, check: bool = True, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> Tensor:
        """(B,) lower bound on log P(x) in nats with one dequantization sample per image.

        ``noise`` optionally fixes the dequantizer's input noise (shape of x; Gaussian for the
        variational dequantizer, uniform for the uniform one); otherwise it is drawn with
        ``generator``.
        """
        if check:
            self.check_images(x)
        xf = self._float(x)
        u, log_q = self.dequantizer(xf, generator=generator, noise=noise)
        z, logdet = self.flow(xf + u)
        return self.prior_log_prob(z) + logdet - log_q

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        """Same as :meth:`log_prob` (so that wrappers such as DDP can call the model)."""
        return self.log_prob(x, **kwargs)

    def bits_per_dim(self, x: Tensor, **kwargs) -> Tensor:
        """(B,) -log_prob / (D ln 2)."""
        return -self.log_prob(x, **kwargs) / self.config.nats_per_bpd

    # --- the continuous bijection ---------------------------------------------------------------

    def encode(self, x: Tensor) -> Tensor:
        """Continuous images y in [0, L] (B, C, H, W) -> latents z (B, *latent_shape)."""
        z, _ = self.flow(x)
        return z

    def decode(self, z: Tensor) -> Tensor:
        """Latents -> continuous images; the exact inverse of :meth:`encode`.

        Images of the data lie in [0, L]; an arbitrary z (e.g. a sample) maps into the slightly
        wider range (-L/18, L + L/18) that the logit pre-processing's margins allow, which
        :meth:`sample` clips to [0, L)."""
        x, _ = self.flow.inverse(z)
        return x

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """n integer images (n, C, H, W), int64 in [0, L), from z ~ N(0, T^2 I)."""
        p = next(self.parameters())
        z = torch.randn((n, *self.latent_shape), generator=generator, device=p.device, dtype=p.dtype)
        x = self.decode(z * temperature)
        return x.floor().clamp_(0, self.config.num_levels - 1).long()

    # --- data-dependent initialisation ------------------------------------------------------------

    def initialize(self, x: Tensor) -> bool:
        """Data-dependent init from a batch of integer images (one forward pass).

        Idempotent: returns False and changes nothing when the model is already initialised
        (the flag is a buffer, so it survives ``state_dict`` round trips).
        """
        if bool(self.initialized):
            return False
        self.check_images(x)
        with data_dependent_init(self):
            self.log_prob(x, check=False)
        self.initialized.fill_(True)
        return True


def count_parameters(config: FlowConfig) -> int:
    """Number of parameters of the model for ``config``, computed from the config's numbers
    (``configs.model_size``) without building anything: building even a meta model of a paper
    config takes a second. Tests hold it equal to the built model's count for every named config."""
    return model_size(config).parameters

"""Named configurations: parameter counts of the paper's models, meta-device builds, and the
config object itself (frozen, dict round trip, validation)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

import flowpp
from flowpp.configs import FlowConfig, parse_stage
from flowpp.dequantizers import UniformDequantizer
from flowpp.flows import AffineCoupling, MixtureLogisticCoupling, Pointwise

# Official counts (the released TensorFlow models; the ablations keep ~31-32M by widening).
PARAMETER_COUNTS = {
    "cifar10": 31_443_440,
    "imagenet32": 168_955_724,
    "imagenet64": 73_489_960,
    "cifar10-uniform-dequant": 32_324_408,
    "cifar10-affine": 32_045_708,
    "cifar10-no-attention": 31_443_440,
    # the release's n-bit launchers
    "imagenet64-5bit": 73_489_960,
    "celeba64-5bit": 73_489_960,
    "celeba64-3bit": 73_489_960,
    "celeba128-5bit": 122_790_952,
}
N_BIT_LEVELS = {"imagenet64-5bit": 32, "celeba64-5bit": 32, "celeba64-3bit": 8, "celeba128-5bit": 32}


class _MetaModels(dict):
    """Named configs built on the meta device (no memory, no init), each when first asked for:
    the tests of this module may be spread over processes, each needing only some."""

    def __missing__(self, name):
        with torch.device("meta"):
            model = self[name] = flowpp.FlowPlusPlus(flowpp.get_config(name))
        return model


@pytest.fixture(scope="session")
def meta_models():
    return _MetaModels()


def test_known_configs_are_listed():
    names = flowpp.list_configs()
    assert set(PARAMETER_COUNTS) | {"tiny"} <= set(names)


@pytest.mark.parametrize("name", list(PARAMETER_COUNTS))
def test_parameter_counts_match_the_official_models(name, meta_models):
    expected = PARAMETER_COUNTS[name]
    assert flowpp.count_parameters(flowpp.get_config(name)) == expected
    assert sum(p.numel() for p in meta_models[name].parameters()) == expected


@pytest.mark.parametrize("name", flowpp.list_configs())
def test_every_config_builds_on_meta_and_exposes_its_shape(name, meta_models):
    cfg = flowpp.get_config(name)
    model = meta_models[name]
    assert all(p.device.type == "meta" for p in model.parameters())
    assert flowpp.count_parameters(cfg) == sum(p.numel() for p in model.parameters())  # arithmetic = built
    c, h, w = cfg.image_shape
    assert isinstance(cfg.image_shape, tuple) and len(cfg.image_shape) == 3
    assert all(isinstance(v, int) and v > 0 for v in cfg.image_shape)
    assert isinstance(cfg.num_levels, int) and cfg.num_levels >= 2
    assert model.config is cfg
    assert cfg.num_dims == c * h * w
    # No factor-out: the latent has every dimension of the image.
    assert math.prod(model.latent_shape) == c * h * w
    assert cfg.name == name


# (main-flow couplings, dequantizer couplings, latent shape (C, H, W)) from the paper's table
ARCHITECTURES = {
    "cifar10": (9, 4, (12, 16, 16)),
    "imagenet32": (13, 8, (12, 16, 16)),
    "imagenet64": (12, 4, (192, 8, 8)),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architectures_match_the_paper(name, meta_models):
    n_main, n_deq, latent = ARCHITECTURES[name]
    model = meta_models[name]
    cfg = model.config
    count = lambda mod: sum(isinstance(m, (MixtureLogisticCoupling, AffineCoupling)) for m in mod.modules())  # noqa: E731
    assert count(model.flow) == n_main
    assert count(model.dequantizer) == n_deq
    assert model.latent_shape == latent
    assert any(isinstance(m, Pointwise) for m in model.modules()) == (name == "cifar10")
    assert cfg.mixture_float64 == name.startswith("imagenet")


def test_ablation_configs_change_what_they_say(meta_models):
    assert isinstance(meta_models["cifar10-uniform-dequant"].dequantizer, UniformDequantizer)
    affine = meta_models["cifar10-affine"]
    assert any(isinstance(m, AffineCoupling) for m in affine.modules())
    assert not any(isinstance(m, MixtureLogisticCoupling) for m in affine.modules())
    assert flowpp.get_config("cifar10-no-attention").mixer == "pointwise"


@pytest.mark.parametrize("name", flowpp.list_configs())
def test_dict_round_trip(name):
    cfg = flowpp.get_config(name)
    d = cfg.to_dict()
    assert isinstance(d, dict) and d["name"] == name
    again = FlowConfig.from_dict(json.loads(json.dumps(d)))  # through JSON: tuples become lists
    assert again == cfg
    assert again.to_dict() == d
    assert isinstance(again.image_shape, tuple) and isinstance(again.layout, tuple)
    assert hash(again) == hash(cfg)


def test_from_dict_rejects_unknown_fields():
    d = flowpp.get_config("tiny").to_dict()
    d["filterz"] = 3
    with pytest.raises(ValueError, match="filterz"):
        FlowConfig.from_dict(d)


def test_config_is_frozen():
    cfg = flowpp.get_config("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.filters = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.image_shape = (1, 2, 2)
    new = cfg.replace(dropout=0.5)
    assert new.dropout == 0.5 and cfg.dropout == 0.0
    assert flowpp.get_config("tiny") is cfg


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown config 'cifar11'.*cifar10"):
        flowpp.get_config("cifar11")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(coupling="spline"), "coupling='spline'"),
        (dict(mixer="conv"), "mixer='conv'"),
        (dict(dequantizer="none"), "dequantizer='none'"),
        (dict(layout=("stripe x2", "squish")), "bad layout stage 'squish'"),
        (dict(dequant_layout=("channel x2",)), "dequantizer layout may only use stripe"),
        (dict(image_shape=(0, 8, 8)), "bad image_shape"),
        (dict(num_levels=1), "num_levels"),
        (dict(lr_schedule="triangle"), "lr_schedule='triangle'"),
    ],
)
def test_invalid_configs_are_rejected(changes, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        flowpp.get_config("tiny").replace(**changes)


def test_layout_that_cannot_be_built_is_rejected_at_build_time():
    with pytest.raises(ValueError, match="cannot squeeze"):
        flowpp.FlowPlusPlus(flowpp.get_config("tiny").replace(image_shape=(3, 6, 6), layout=("squeeze", "squeeze")))
    with pytest.raises(ValueError, match="even width"):
        flowpp.FlowPlusPlus(flowpp.get_config("tiny").replace(image_shape=(3, 8, 5)))


def test_parse_stage():
    assert parse_stage("stripe x4") == ("stripe", 4, True)
    assert parse_stage(" channel x12 ") == ("channel", 12, True)
    assert parse_stage("stripe x2 no-attention") == ("stripe", 2, False)
    assert parse_stage("squeeze") == ("squeeze", 0, False)
    with pytest.raises(ValueError, match="expected 'stripe xN'"):
        parse_stage("stripes x4")


def test_no_attention_stage_builds_conv_only_conditioners():
    import flowpp
    from flowpp.nets import GatedAttention

    cfg = flowpp.get_config("tiny").replace(layout=("stripe x2 no-attention", "squeeze", "channel x2", "stripe x1"))
    with torch.device("meta"):
        model = flowpp.FlowPlusPlus(cfg)
    couplings = [m for m in model.flow.layers if hasattr(m, "conditioner")]
    has_attention = [any(isinstance(b, GatedAttention) for b in c.conditioner.modules()) for c in couplings]
    assert has_attention == [False, False, True, True, True]
    assert flowpp.count_parameters(cfg) < flowpp.count_parameters(flowpp.get_config("tiny"))


@pytest.mark.parametrize("name", list(N_BIT_LEVELS))
def test_n_bit_models_are_imagenet64_on_fewer_levels_in_float32(name):
    cfg, ref = flowpp.get_config(name), flowpp.get_config("imagenet64")
    assert cfg.num_levels == N_BIT_LEVELS[name] and not cfg.mixture_float64
    assert cfg.official and cfg.grad_clip_units == "nats" and cfg.dropout == 0 and cfg.ema_decay == 0.999
    for key in (
        "filters",
        "components",
        "dequant_layout",
        "dequant_blocks",
        "dequant_mixer",
        "context_blocks",
        "dequant_frozen_pos_emb",
        "pointwise",
        "final_concat_elu",
    ):
        assert getattr(cfg, key) == getattr(ref, key), key
    if name == "celeba128-5bit":
        assert cfg.image_shape == (3, 128, 128) and cfg.layout == ("squeeze",) + ref.layout and cfg.blocks == 12
    else:
        assert cfg.image_shape == ref.image_shape and cfg.layout == ref.layout and cfg.blocks == ref.blocks


@pytest.mark.parametrize("name", ["cifar10", "imagenet32", "imagenet64", "cifar10-affine", "celeba64-3bit"])
def test_paper_configs_clip_on_the_nats_scale(name):
    assert flowpp.get_config(name).grad_clip_units == "nats"


def test_configs_written_before_grad_clip_units_keep_the_bits_per_dim_scale():
    d = flowpp.get_config("cifar10").to_dict()
    del d["grad_clip_units"]
    assert FlowConfig.from_dict(d).grad_clip_units == "bpd"
    with pytest.raises(ValueError, match="grad_clip_units='nat'"):
        flowpp.get_config("tiny").replace(grad_clip_units="nat")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(filters=-3), "filters=-3, expected a whole number from 1"),
        (dict(filters="abc"), "filters='abc'"),
        (dict(filters=10**12), "filters=1000000000000"),
        (dict(filters=8.0), "filters=8.0"),
        (dict(components=0), "components=0"),
        (dict(image_shape=5), "bad image_shape 5"),
        (dict(lr="fast"), "lr='fast', expected a number"),
        (dict(lr=float("nan")), "lr=nan"),
        (dict(dropout=1.5), "dropout=1.5"),
        (dict(grad_clip=0), "grad_clip=0"),
        (dict(adam_betas=[0.9]), "adam_betas"),
        (dict(pointwise="yes"), "pointwise='yes', expected true or false"),
        (dict(layout="stripe x4"), "layout"),
    ],
)
def test_values_a_user_can_type_are_checked_with_one_clear_error(changes, fragment):
    from flowpp.errors import ConfigError

    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        flowpp.get_config("tiny").with_changes(changes)

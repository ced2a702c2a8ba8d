"""Small inputs that would cost gigabytes: configs (from --set, a run's config.json, an export's
metadata or a checkpoint) are sized from their numbers before any model is built, files that
hold weights must hold what their config describes, and .npz headers must fit the bytes the
member really has. Every attack runs with model building (and array reading) replaced by a
failure, so that a regression fails the test instead of allocating."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

import flowpp
from flowpp import configs
from flowpp.checkpoint import CheckpointError
from flowpp.configs import FlowConfig, parse_override
from flowpp.data import DatasetError
from flowpp.data.npz_files import NpzReader
from flowpp.errors import ConfigError
from flowpp.runs import RunDir

TINY = flowpp.get_config("tiny")
DEEP = "[" * 100_000 + "]" * 100_000  # JSON nested past the parser's recursion limit


@pytest.fixture
def no_model_building(monkeypatch):
    """Building a model (on any device, meta included) fails the test."""

    def refuse(self, *args, **kwargs):
        raise AssertionError("a model was built for a config that should have been refused first")

    monkeypatch.setattr(flowpp.FlowPlusPlus, "__init__", refuse)
    monkeypatch.setattr(flowpp.nets.Conditioner, "__init__", refuse)


def _one_line(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and len(text) < 500, text
    return text


# --- configs: sized from their numbers -------------------------------------------------------


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(filters=65536, blocks=1024), r"parameters.*filters=65536"),
        (dict(components=1024, filters=2048), "parameters"),
        (dict(image_shape=[3, 65536, 65536]), "image_shape"),
        (dict(image_shape=[3, 65536, 65536], layout=["squeeze"], dequantizer="uniform"), "image_shape"),
        (dict(layout=["stripe x100000000"]), "layout"),
        (dict(dequant_layout=["stripe x100000000"]), "dequant_layout"),
        (dict(layout=["stripe x" + "9" * 5000]), "layout"),
        (dict(layout=["stripe x0"] * 100_000), "layout"),
        (dict(layout=["stripe x1000"], blocks=1000, filters=2, heads=1), "blocks=1000 in each of 1,000"),
        (dict(dequant_blocks=1024, dequant_layout=["stripe x1000"]), "dequant_blocks=1024 in each"),
    ],
    ids=[
        "filters-blocks",
        "components",
        "image",
        "image-no-params",
        "1e8-couplings",
        "1e8-dequant-couplings",
        "5000-digits",
        "1e5-stages",
        "blocks",
        "dequant-blocks",
    ],
)
def test_configs_beyond_the_size_bounds_are_refused_from_their_numbers(changes, fragment, no_model_building):
    with pytest.raises(ConfigError, match=fragment) as e:
        TINY.with_changes(changes)
    _one_line(e.value)


def test_the_arithmetic_size_is_the_parameter_count_of_the_built_model():
    official = {"cifar10": 31_443_440, "imagenet32": 168_955_724, "imagenet64": 73_489_960,
                "cifar10-uniform-dequant": 32_324_408, "cifar10-affine": 32_045_708,
                "cifar10-no-attention": 31_443_440, "celeba128-5bit": 122_790_952}  # fmt: skip
    for name, count in official.items():
        assert configs.model_size(flowpp.get_config(name)).parameters == count, name
    variants = [
        {},
        dict(weight_norm=True, final_concat_elu=True, pointwise=False, layer_norm=False),
        dict(coupling="affine", mixer="pointwise", dequant_mixer="none", context_mixer="attention", context_blocks=2),
        dict(dequantizer="uniform", layout=["stripe x1 no-attention", "squeeze", "stripe x0", "channel x3"]),
        dict(dequant_frozen_pos_emb=True, dequant_mixer="none", context_blocks=0, context_layer_norm=True),
        dict(image_shape=[1, 4, 6], layout=["stripe x2", "squeeze", "channel x1"], heads=1),
    ]
    for changes in variants:
        cfg = TINY.with_changes(changes)
        with torch.device("meta"):
            built = sum(p.numel() for p in flowpp.FlowPlusPlus(cfg).parameters())
        assert configs.model_size(cfg).parameters == built, changes


def test_the_papers_configs_are_well_inside_the_bounds():
    sizes = [configs.model_size(flowpp.get_config(name)) for name in flowpp.list_configs()]
    assert max(s.parameters for s in sizes) * 10 < configs.MAX_PARAMETERS
    assert max(s.gated_blocks for s in sizes) * 10 < configs.MAX_GATED_BLOCKS
    assert max(s.activation_per_image for s in sizes) * 100 < configs.MAX_ACTIVATION_PER_IMAGE


def test_heads_that_do_not_divide_the_attention_width_are_a_config_error(no_model_building):
    with pytest.raises(ConfigError, match=r"heads=3 .*filters=8") as e:
        TINY.with_changes({"heads": 3})
    _one_line(e.value)
    with pytest.raises(ConfigError, match=r"heads=3 .*context_channels=4"):
        TINY.with_changes({"heads": 3, "mixer": "none", "dequant_mixer": "none", "context_mixer": "attention"})
    # Where no network attends, heads splits nothing and any value builds.
    TINY.with_changes({"heads": 3, "mixer": "pointwise", "dequant_mixer": "none"})
    TINY.with_changes({"heads": 3, "layout": ["stripe x2 no-attention"], "dequantizer": "uniform"})


@pytest.mark.parametrize(
    "value, fragment",
    [
        ([["filters", 8]], "JSON object"),
        ("tiny", "JSON object"),
        (dict(TINY.to_dict(), name=["tiny"]), "name"),
        (dict(TINY.to_dict(), notes={"a": 1}), "notes"),
        (dict(TINY.to_dict(), filters=[[8] * 100_000]), "filters"),
        (dict(TINY.to_dict(), **{f"field{i}": i for i in range(10_000)}), "unknown config fields"),
    ],
    ids=["list", "string", "list-name", "dict-notes", "wide-filters", "10000-unknown"],
)
def test_wrong_typed_config_json_is_one_config_error(value, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        FlowConfig.from_dict(value)
    _one_line(e.value)


def test_set_values_nested_past_the_parser_or_too_long_are_one_error():
    for text in (f"filters={DEEP}", "filters=" + "9" * 5000):
        with pytest.raises(ConfigError, match="filters") as e:
            TINY.with_changes(dict([parse_override(text)]))
        _one_line(e.value)


def test_train_with_a_set_layout_of_1e8_couplings_stops_at_the_config(tmp_path, capsys, no_model_building):
    from flowpp.cli import main

    argv = ["train", "--config", "tiny", "--data", str(tmp_path / "none.npz"), "--out", str(tmp_path / "run"),
            "--set", 'layout=["stripe x100000000"]', "--no-progress", "--threads", "1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowpp: error: config 'tiny'") and "layout" in err and "\n" not in err


# --- files that hold weights: their config must describe what they hold -------------------------


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """(tensors, metadata) of an export of the tiny model, to rewrite."""
    st = pytest.importorskip("safetensors.torch")
    from flowpp.export import save_export

    path, _ = save_export(flowpp.FlowPlusPlus(TINY), tmp_path_factory.mktemp("export") / "t.safetensors", {}, {})
    with st.safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _export_with_config(tmp_path, tiny_export, config_text: str):
    import safetensors.torch as st

    tensors, meta = tiny_export
    path = tmp_path / "x.safetensors"
    path.write_bytes(st.save(tensors, metadata=dict(meta, config=config_text)))
    return path


def test_an_export_whose_config_describes_more_weights_than_it_holds_is_refused_before_building(
    tmp_path, tiny_export, no_model_building
):
    big = json.dumps(dict(TINY.to_dict(), filters=1024))  # ~150M parameters from a 250 KB file
    with pytest.raises(CheckpointError, match=r"does not fit config 'tiny'.*57,984 parameters") as e:
        flowpp.load(_export_with_config(tmp_path, tiny_export, big))
    _one_line(e.value)


@pytest.mark.parametrize(
    "config_text, fragment",
    [
        (json.dumps(dict(TINY.to_dict(), layout=["stripe x100000000"])), "layout"),
        (json.dumps(dict(TINY.to_dict(), heads=3)), "heads=3"),
        (json.dumps(dict(TINY.to_dict(), image_shape=[3, 65536, 65536])), "image_shape"),
        (DEEP, "not a valid flowpp config"),
        (json.dumps([1, 2]), "not a valid flowpp config"),
        (json.dumps(dict(TINY.to_dict(), name={"x": [1]})), "name"),
    ],
    ids=["1e8-couplings", "heads", "image", "nested", "list", "dict-name"],
)
def test_an_export_with_bad_config_metadata_is_one_error(tmp_path, tiny_export, config_text, fragment,
                                                         no_model_building):  # fmt: skip
    with pytest.raises(CheckpointError, match=fragment) as e:
        flowpp.load(_export_with_config(tmp_path, tiny_export, config_text))
    _one_line(e.value)


def test_a_checkpoint_whose_config_describes_more_weights_than_it_holds_is_refused_before_building(
    tmp_path, tiny_export, no_model_building
):
    tensors = tiny_export[0]
    run = RunDir(tmp_path)
    config = dict(TINY.to_dict(), filters=1024)
    run.save_best(dict(config=config, model=tensors, ema=tensors, train_state=dict(step=1)))
    with pytest.raises(CheckpointError, match=r"does not fit config 'tiny'.*57,984 parameters") as e:
        run.load_model(which="best")
    _one_line(e.value)
    run.save_best(dict(config=dict(filters=8), model=tensors, ema=tensors, train_state=dict(step=1)))
    with pytest.raises(CheckpointError, match=r"lacks the fields \['name', 'image_shape'\]"):
        run.load_model(which="best")


def test_an_export_that_fits_its_config_still_loads(tmp_path, tiny_export):
    model = flowpp.load(_export_with_config(tmp_path, tiny_export, tiny_export[1]["config"]))
    assert sum(p.numel() for p in model.parameters()) == 57_984


# --- .npz headers against the member's bytes ---------------------------------------------------


def _npz_with_lying_directory(path, shape) -> None:
    """An .npz whose member x.npy has an .npy header for ``shape`` (uint8) and a few KB of zeros,
    with the zip directory claiming the full uncompressed size: a member of ~100 compressed bytes
    that says it expands to the whole declared array."""
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", header.getvalue() + bytes(4096))
    claimed = (len(header.getvalue()) + int(np.prod(shape))).to_bytes(4, "little")
    data = bytearray(path.read_bytes())
    local = 0  # the only member's local header starts the file
    central = data.index(b"PK\x01\x02")
    data[local + 22 : local + 26] = claimed  # uncompressed size fields
    data[central + 24 : central + 28] = claimed
    path.write_bytes(bytes(data))


@pytest.fixture
def no_array_reading(monkeypatch):
    def never(self, key):
        raise AssertionError(f"{key} was read before its header was checked against the file")

    monkeypatch.setattr(NpzReader, "read", never)


def test_an_npz_header_declaring_1e7_images_in_a_few_bytes_is_refused_before_reading(tmp_path, no_array_reading):
    from flowpp.score import read_images

    path = tmp_path / "lying.npz"
    _npz_with_lying_directory(path, (10**7, 8, 8, 3))
    assert path.stat().st_size < 2_000
    with NpzReader(path) as z:
        assert z._members["x"].file_size > 1_900_000_000  # what the directory claims
    with pytest.raises(DatasetError, match=r"header declares \(10000000, 8, 8, 3\)") as e:
        read_images([path])
    _one_line(e.value)


def test_an_npz_zip_bomb_is_refused_by_score_before_reading(tmp_path, tiny_export, capsys, no_array_reading):
    import safetensors.torch as st

    from flowpp.cli import main

    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, x=np.zeros((400_000, 8, 8, 3), np.uint8))  # 77 MB of zeros
    assert bomb.stat().st_size < 200_000
    model = tmp_path / "tiny.safetensors"
    model.write_bytes(st.save(*tiny_export[:1], metadata=tiny_export[1]))
    assert main(["score", "--run", str(model), str(bomb), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the line naming the model's weights
    assert err.startswith("flowpp: error: ") and "header declares (400000, 8, 8, 3)" in err


def test_npz_members_that_hold_what_they_declare_are_still_read(tmp_path):
    from flowpp.score import read_images

    np.savez_compressed(tmp_path / "a.npz", x=np.zeros((50, 8, 8, 3), np.uint8))  # 1000x smaller, under the floor
    np.savez(tmp_path / "b.npz", x=np.full((3, 8, 8, 3), 7, np.uint8))
    out = read_images([tmp_path / "a.npz", tmp_path / "b.npz"])
    assert len(out) == 53 and out[-1][1].shape == (8, 8, 3) and out[-1][1][0, 0, 0] == 7
    assert torch.from_numpy(out[0][1]).sum() == 0

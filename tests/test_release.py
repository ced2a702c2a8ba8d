"""The Flow++ release's weight format: the official fixtures reproduced, strict mapping, and back."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import flowpp
from flowpp.atomic import file_sha256
from flowpp.cli import main
from flowpp.ddi import is_initialized
from flowpp.errors import ConfigError
from flowpp.release import (
    ReleaseFormatError,
    configs_fitting,
    expected_shapes,
    import_release,
    release_arrays,
    write_release,
)
from flowpp.runs import RunDir

OFFICIAL = Path(__file__).resolve().parents[1].parent / "shared" / "official-weights"

# The fixtures' architectures in flowpp terms (their README): sizes set, depths of the named config.
FIXTURES = {
    "cifar10-tiny": ("cifar10", dict(filters=8, blocks=1, components=2)),
    "cifar10-tiny2": ("cifar10", dict(filters=8, blocks=2, components=4)),
    "imagenet32-reduced": ("imagenet32", dict(filters=8, blocks=1, components=2)),
    "imagenet64-reduced": ("imagenet64", dict(filters=8, blocks=1, components=2)),
}

# The official parameter counts of the full-size models.
OFFICIAL_COUNTS = {"cifar10": 31_443_440, "imagenet32": 168_955_724, "imagenet64": 73_489_960}


def fixture_config(name: str) -> flowpp.FlowConfig:
    base, sizes = FIXTURES[name]
    k = sizes["components"]
    return flowpp.get_config(base).with_changes(
        dict(sizes, dequant_filters=sizes["filters"], dequant_components=k, heads=4, dropout=0.0)
    )


def needs_fixtures(name: str):
    return pytest.mark.skipif(not (OFFICIAL / f"{name}.npz").is_file(), reason="official weight fixtures not present")


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2)


def max_relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((actual.double() - expected.double()).abs() / expected.double().abs()).max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(FIXTURES))
def test_an_imported_fixture_computes_what_the_official_graph_computed(name, dtype, single_thread):
    if not (OFFICIAL / f"{name}.npz").is_file():
        pytest.skip("official weight fixtures not present")
    model, info = import_release(OFFICIAL / f"{name}.npz", fixture_config(name))
    assert info["ema"] is False and info["ignored"] == [] and len(info["sha256"]) == 64
    model = model.to(dtype)
    expected = np.load(OFFICIAL / f"{name}.expected.npz")
    x = nchw(expected["x"]).long()
    with torch.no_grad():
        u, log_q = model.dequantizer(x.to(dtype), noise=nchw(expected["eps"]).to(dtype))
        y = x.to(dtype) + u
        z, logdet = model.flow(y)
        log_likelihood = model.prior_log_prob(z) + logdet - log_q
        # the public entry point gives the same number from the same noise
        assert torch.equal(model.log_prob(x, noise=nchw(expected["eps"]).to(dtype)), log_likelihood)
    # float64: the official graph's float64 numbers to 1e-9 (measured: 1e-12 or better);
    # float32: to float32 rounding accumulated over the model (measured: up to 7e-7).
    tol = 1e-9 if dtype == torch.float64 else 4e-6
    assert max_relative(log_likelihood, torch.from_numpy(expected["log_likelihood"])) < tol
    assert max_relative(log_q, torch.from_numpy(expected["log_q"])) < tol
    for ours, key in ((y, "dequantized_x"), (z, "z")):
        ref = nchw(expected[key])
        assert ours.shape == ref.shape
        assert float((ours.double() - ref).abs().max()) < 10 * tol * float(ref.abs().max())
    if dtype == torch.float64:  # and the inverse takes the official latent back to its input
        with torch.no_grad():
            back = model.decode(nchw(expected["z"]))
        assert float((back - nchw(expected["dequantized_x"])).abs().max()) < 1e-7


@pytest.mark.parametrize("name", list(FIXTURES))
def test_writing_an_imported_fixture_gives_back_its_file_bit_for_bit(name, tmp_path):
    if not (OFFICIAL / f"{name}.npz").is_file():
        pytest.skip("official weight fixtures not present")
    original = np.load(OFFICIAL / f"{name}.npz")
    model, _ = import_release(OFFICIAL / f"{name}.npz", fixture_config(name))
    path, n = write_release(model, tmp_path / "again.npz")
    again = np.load(path)
    assert n == len(original.files) and sorted(again.files) == sorted(original.files)
    for key in original.files:
        assert again[key].dtype == original[key].dtype == np.float32
        assert np.array_equal(again[key], original[key]), key


def test_the_official_full_size_files_have_the_official_names_and_parameter_counts():
    for name, count in OFFICIAL_COUNTS.items():
        shapes = expected_shapes(flowpp.get_config(name))
        assert sum(int(np.prod(s)) for s in shapes.values()) == count, name
    cifar = expected_shapes(flowpp.get_config("cifar10"))
    # names quoted from the release's CIFAR-10 file
    assert cifar["context_proc/proj/W"] == (3, 3, 6, 32)
    assert cifar["Norm_3/norm1/g"] == (32, 16, 3)
    assert cifar["Pointwise_2/W0"] == (3, 3)
    assert cifar["MixLogisticAttnCoupling_5/block7/attn/proj1/W"] == (96, 288)
    # 4 dequantizer and 9 main couplings, numbered in the graph's order
    assert "MixLogisticAttnCoupling_12/proj_out/b" in cifar and "MixLogisticAttnCoupling_13/proj_out/b" not in cifar
    imagenet32 = expected_shapes(flowpp.get_config("imagenet32"))
    assert imagenet32["MixLogisticAttnCoupling_20/c2/V"] == (3, 3, 256, 12 * (2 + 3 * 32))
    assert imagenet32["context_proc/pos_emb_dq"] == (32, 16, 32)
    imagenet64 = expected_shapes(flowpp.get_config("imagenet64"))
    assert imagenet64["MixLogisticCoupling_3/pos_emb"] == (64, 32, 96)  # the dequantizer's unused embedding
    assert imagenet64["context_proc/dqln4/g"] == (32,)


def test_the_n_bit_models_share_the_imagenet64_file_layout():
    fits = configs_fitting(expected_shapes(flowpp.get_config("imagenet64")))
    assert fits == ["celeba64-3bit", "celeba64-5bit", "imagenet64", "imagenet64-5bit"]
    assert configs_fitting(expected_shapes(flowpp.get_config("celeba128-5bit"))) == ["celeba128-5bit"]


@pytest.mark.parametrize("name", list(OFFICIAL_COUNTS))
def test_a_full_size_model_written_and_imported_again_is_identical(name, tmp_path):
    torch.manual_seed(0)
    model = flowpp.FlowPlusPlus(flowpp.get_config(name))  # random, non-identity weights
    if name == "imagenet32":  # 676 MB: the arrays in memory, as a file would hold them (file I/O: the others)
        source, n = release_arrays(model), len(expected_shapes(model.config))
    else:
        source, n = write_release(model, tmp_path / f"{name}.npz")
    back, info = import_release(source, name)
    assert info["parameters"] == OFFICIAL_COUNTS[name] and info["variables"] == n
    ours, theirs = dict(model.named_parameters()), dict(back.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert is_initialized(back) and bool(back.initialized)


# --- strictness, on a small model of the CIFAR-10 architecture ----------------------------------


@pytest.fixture(scope="module")
def small():
    """(config, arrays) of a small CIFAR-10-architecture model with random weights."""
    config = flowpp.get_config("tiny")
    torch.manual_seed(1)
    return config, release_arrays(flowpp.FlowPlusPlus(config))


def save(path, arrays):
    np.savez(path, **arrays)
    return path


def error_of(source, config) -> str:
    with pytest.raises(ReleaseFormatError) as e:
        import_release(source, config)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_a_missing_variable_is_named(small):
    config, arrays = small
    dropped = dict(arrays)
    del dropped["Pointwise_2/W1"]
    assert "needs variable 'Pointwise_2/W1', which the file lacks (1 missing)" in error_of(dropped, config)


def test_an_unused_variable_is_named(small):
    config, arrays = small
    message = error_of(dict(arrays, **{"Extra/W": np.zeros(3, np.float32)}), config)
    assert "variable 'Extra/W' has no place in config 'tiny'" in message


def test_a_wrong_shape_is_named_with_both_shapes(small):
    config, arrays = small
    bad = dict(arrays, **{"Norm_1/norm0/g": arrays["Norm_1/norm0/g"][:-1]})
    message = error_of(bad, config)
    assert "'Norm_1/norm0/g' has shape (7, 4, 3), but config 'tiny' expects (8, 4, 3)" in message


def test_a_file_of_another_config_says_which_it_fits(small, tmp_path):
    config, arrays = small
    message = error_of(save(tmp_path / "tiny.npz", arrays), flowpp.get_config("cifar10"))
    assert message.startswith(str(tmp_path / "tiny.npz")) and "the file fits config 'tiny'" in message


@needs_fixtures("imagenet64-reduced")
def test_a_reduced_file_says_the_settings_it_fits():
    message = error_of(OFFICIAL / "imagenet64-reduced.npz", "imagenet64")
    assert message.endswith(
        "fits config 'imagenet64' reduced in size: --set filters=8 --set blocks=1 --set components=2 "
        "--set dequant_filters=8 --set dequant_components=2"
    )


def test_non_finite_or_integer_weights_are_refused(small):
    config, arrays = small
    nan = dict(arrays, **{"Pointwise/W0": np.full((3, 3), np.nan, np.float32)})
    assert "'Pointwise/W0' holds non-finite values" in error_of(nan, config)
    ints = dict(arrays, **{"Pointwise/W0": np.eye(3, dtype=np.int32)})
    assert "'Pointwise/W0' has dtype int32" in error_of(ints, config)


def test_pickled_truncated_missing_and_empty_files_are_refused(small, tmp_path):
    config, arrays = small
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **dict(arrays, evil=np.array([{"a": 1}], dtype=object)))
    assert "holds pickled objects" in error_of(pickled, config)
    good = save(tmp_path / "good.npz", arrays)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert "is not a readable .npz file" in error_of(truncated, config)
    assert "does not exist" in error_of(tmp_path / "nothing.npz", config)
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    assert "holds no arrays" in error_of(tmp_path / "empty.npz", config)


def test_ema_shadows_are_used_and_adam_slots_ignored(small, tmp_path):
    config, arrays = small
    shadows = {f"{k}/ExponentialMovingAverage": v + 1 for k, v in arrays.items()}
    slots = {f"{k}/{s}": np.zeros_like(v) for k, v in arrays.items() for s in ("Adam", "Adam_1")}
    path = save(tmp_path / "checkpoint.npz", {**arrays, **shadows, **slots, "beta1_power": np.float32(0.9)})
    model, info = import_release(path, config)
    assert info["ema"] is True and len(info["ignored"]) == 2 * len(arrays) + 1
    written = release_arrays(model)
    assert all(np.array_equal(written[k], arrays[k] + 1) for k in arrays)
    partial = dict(shadows)
    partial.pop("Pointwise/W0/ExponentialMovingAverage")
    message = error_of(save(tmp_path / "partial.npz", {**arrays, **partial}), config)
    assert "holds exponential-moving-average shadows, but not of 'Pointwise/W0'" in message


@pytest.mark.parametrize("name", ["cifar10-affine", "cifar10-uniform-dequant", "cifar10-no-attention", "mnist"])
def test_configs_the_official_code_cannot_build_are_refused_both_ways(name, small):
    config = flowpp.get_config(name)
    with torch.device("meta"):
        model = flowpp.FlowPlusPlus(config)
    with pytest.raises(ReleaseFormatError, match=f"config '{name}' has no release-format equivalent"):
        release_arrays(model)
    with pytest.raises(ConfigError, match="no release-format equivalent"):
        import_release(small[1], config)


# --- the command line and the library ---------------------------------------------------------


@needs_fixtures("cifar10-tiny")
def test_import_command_writes_an_export_with_a_card_naming_the_source(tmp_path, capsys, single_thread):
    sets = ["filters=8", "blocks=1", "components=2", "dequant_filters=8", "dequant_components=2", "dropout=0"]
    out = tmp_path / "model.safetensors"
    argv = ["import", str(OFFICIAL / "cifar10-tiny.npz"), "--config", "cifar10", "--out", str(out)]
    assert main(argv + [a for s in sets for a in ("--set", s)]) == 0
    printed = capsys.readouterr().out
    assert "read 377 variables of cifar10-tiny.npz" in printed and "371,400 parameters" in printed
    card = json.loads((tmp_path / "model.card.json").read_text())
    assert card["source"]["file"] == "cifar10-tiny.npz"
    assert card["source"]["sha256"] == file_sha256(OFFICIAL / "cifar10-tiny.npz")
    assert card["trained_by"].startswith("not flowpp") and card["parameters"] == 371_400
    assert card["reported"] == []  # a reduced model: the release's numbers are not its numbers
    # the export is an ordinary flowpp model: load, and the library import, agree exactly
    loaded = flowpp.load(out)
    direct = flowpp.import_release(OFFICIAL / "cifar10-tiny.npz", loaded.config)
    x = torch.from_numpy(np.load(OFFICIAL / "cifar10-tiny.expected.npz")["x"]).permute(0, 3, 1, 2).long()
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.log_prob(x, noise=eps), direct.log_prob(x, noise=eps))
    # and it writes back to the release format bit for bit
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "back.npz")]) == 0
    original, back = np.load(OFFICIAL / "cifar10-tiny.npz"), np.load(tmp_path / "back.npz")
    assert all(np.array_equal(original[k], back[k]) for k in original.files) and len(back.files) == 377


def test_import_command_errors_are_one_line_and_write_nothing(small, tmp_path, capsys):
    path = save(tmp_path / "tiny.npz", small[1])
    out = tmp_path / "model.safetensors"
    assert main(["import", str(path), "--config", "cifar10", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flowpp: error:") and "fits config 'tiny'" in err and "\n" not in err
    assert not out.exists() and not (tmp_path / "model.card.json").exists()


def test_full_size_import_card_quotes_the_release_numbers(tmp_path, capsys):
    torch.manual_seed(0)
    path, _ = write_release(flowpp.FlowPlusPlus(flowpp.get_config("cifar10")), tmp_path / "flowpp_cifar_model.npz")
    checkpoint = {k: v for k, v in np.load(path).items()}
    checkpoint.update({f"{k}/ExponentialMovingAverage": v for k, v in list(checkpoint.items())})
    save(path, checkpoint)
    assert main(["import", str(path), "--config", "cifar10", "--out", str(tmp_path / "c.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "using them, as the official code evaluates" in printed and "3.116 bits/dim" in printed
    card = json.loads((tmp_path / "c.card.json").read_text())
    assert card["reported"][0]["bpd"] == 3.116 and card["weights"] == "ema"
    assert card["source"]["ema_shadows_used"] is True and card["parameters"] == OFFICIAL_COUNTS["cifar10"]


def test_export_of_a_run_in_the_release_format(tmp_path, capsys):
    # a run of the `tiny` config (CIFAR-10 architecture), exported and read back
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, **{k: rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8) for k, n in
                      (("x_train", 32), ("x_valid", 8), ("x_test", 8))})  # fmt: skip
    run_dir = tmp_path / "run"
    train = ["train", "--config", "tiny", "--data", str(data), "--out", str(run_dir), "--max-steps", "2",
             "--no-progress", "--eval-images", "8", "--threads", "1"]  # fmt: skip
    assert main(train) == 0
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "tiny.npz")]) == 0
    assert "variables in the Flow++ release format" in capsys.readouterr().out
    model = RunDir(run_dir).load_model("cpu")[0]
    back, _ = import_release(tmp_path / "tiny.npz", "tiny")
    assert all(torch.equal(p, dict(back.named_parameters())[k]) for k, p in model.named_parameters())
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "x.bin"), "--format", "release"]) == 0

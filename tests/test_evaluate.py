"""The one evaluator: single-sample and importance-weighted bounds, noise fixed per image."""

import math

import numpy as np
import pytest
import torch

from flowpp.evaluate import EvalParts, evaluate_bpd, log_weights, noise_generator, weights_digest

pytestmark = pytest.mark.usefixtures("single_thread")


def _images(n, seed=0):
    return torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_numbers_do_not_depend_on_batching_or_on_which_images_are_scored_together(tiny_model):
    x = _images(6)
    a = evaluate_bpd(tiny_model, x, samples=4, batch_size=24, seed=3, per_image=True)
    b = evaluate_bpd(tiny_model, x, samples=4, batch_size=3, seed=3, per_image=True)  # 1 image x 3 + 1 sample
    np.testing.assert_allclose(a["per_image_iw_bpd"], b["per_image_iw_bpd"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(a["per_image_bpd"], b["per_image_bpd"], rtol=0, atol=1e-12)
    tail = evaluate_bpd(tiny_model, x[3:], samples=4, seed=3, per_image=True)
    # image i's noise comes from (seed, i): the same image at another index gets other noise
    assert tail["per_image_bpd"][0] != pytest.approx(a["per_image_bpd"][3], abs=1e-9)
    c = evaluate_bpd(tiny_model, x, samples=4, batch_size=24, seed=4)
    assert c["bpd"] != a["bpd"]


def test_bounds_agree_with_a_direct_computation(tiny_model):
    x = _images(3, seed=1)
    res = evaluate_bpd(tiny_model, x, samples=5, seed=0, per_image=True)
    d = tiny_model.config.nats_per_bpd
    for i in range(3):
        g = noise_generator(0, i)
        noise = torch.cat([tiny_model.dequantizer.sample_noise((1, 3, 8, 8), g, dtype=torch.float64) for _ in range(5)])
        r = tiny_model.log_prob(x[i : i + 1].expand(5, 3, 8, 8), noise=noise).double()
        assert res["per_image_bpd"][i] == pytest.approx(-r.mean().item() / d, rel=1e-12)
        iw = torch.logsumexp(r, 0).item() - math.log(5)
        assert res["per_image_iw_bpd"][i] == pytest.approx(-iw / d, rel=1e-12)
        assert res["per_image_iw_bpd"][i] <= res["per_image_bpd"][i]  # Jensen, image by image
    assert res["n_images"] == 3 and res["samples"] == 5
    assert res["bpd"] == pytest.approx(np.mean(res["per_image_bpd"]))
    assert res["bpd_se"] == pytest.approx(np.std(res["per_image_bpd"], ddof=1) / math.sqrt(3))


def test_single_sample_has_no_importance_weighted_entry_and_progress_counts_images(tiny_model):
    done = []
    res = evaluate_bpd(tiny_model, _images(5), batch_size=2, progress=done.append)
    assert "iw_bpd" not in res and sum(done) == 5 and res["n_images"] == 5


def test_log_weights_shape_and_bad_images(tiny_model):
    gens = [noise_generator(0, i) for i in range(2)]
    assert log_weights(tiny_model, _images(2), gens, 3).shape == (3, 2)
    with pytest.raises(ValueError, match="values in"):
        evaluate_bpd(tiny_model, _images(2) + 300)


def test_arrays_and_memory_maps_give_the_numbers_of_tensors(tiny_model, tmp_path):
    x = _images(5, seed=2)
    nhwc = x.permute(0, 2, 3, 1).numpy().astype(np.uint8)
    np.save(tmp_path / "x.npy", nhwc)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    a = evaluate_bpd(tiny_model, x, samples=3, batch_size=4, per_image=True)
    b = evaluate_bpd(tiny_model, mapped, samples=3, batch_size=4, per_image=True)
    assert a == b
    with pytest.raises(ValueError, match=r"shape \(B, 3, 8, 8\)"):
        evaluate_bpd(tiny_model, nhwc[:, :4])


def _parts(model, tmp_path, log=None, **changes):
    key = dict(dict(weights=weights_digest(model), samples=3, seed=0, chunk=2), **changes)
    return EvalParts(tmp_path / "parts", key, log=log)


def test_an_interrupted_evaluation_continues_to_the_same_numbers(tiny_model, tmp_path):
    x = _images(7, seed=4)
    run = dict(samples=3, batch_size=4)
    whole = evaluate_bpd(tiny_model, x, **run, per_image=True, parts=_parts(tiny_model, tmp_path / "a"))
    assert whole["resumed_images"] == 0 and len(list((tmp_path / "a" / "parts").glob("chunk-*.npy"))) == 4

    done = []

    def die_in_the_third_chunk(n):
        done.append(n)
        if sum(done) > 4:
            raise KeyboardInterrupt  # preemption, a crash, Ctrl-C

    with pytest.raises(KeyboardInterrupt):
        evaluate_bpd(tiny_model, x, **run, parts=_parts(tiny_model, tmp_path), progress=die_in_the_third_chunk)
    assert len(list((tmp_path / "parts").glob("chunk-*.npy"))) == 2
    resumed = evaluate_bpd(tiny_model, x, samples=3, batch_size=4, per_image=True, parts=_parts(tiny_model, tmp_path))
    assert resumed["resumed_images"] == 4
    assert {k: v for k, v in resumed.items() if k != "resumed_images"} == {
        k: v for k, v in whole.items() if k != "resumed_images"
    }
    # Parts of another evaluation (other S, seed or weights) are never mixed in.
    other = evaluate_bpd(tiny_model, x, samples=3, batch_size=4, parts=_parts(tiny_model, tmp_path, seed=1), seed=1)
    assert other["resumed_images"] == 0


def test_a_damaged_part_is_computed_again(tiny_model, tmp_path):
    x = _images(4, seed=5)
    whole = evaluate_bpd(tiny_model, x, samples=3, batch_size=4, parts=_parts(tiny_model, tmp_path))
    (chunk_one,) = (tmp_path / "parts").glob("chunk-0000001*.npy")
    chunk_one.write_bytes(b"not an array")
    again = evaluate_bpd(tiny_model, x, samples=3, batch_size=4, parts=_parts(tiny_model, tmp_path))
    assert again["resumed_images"] == 2 and again["bpd"] == whole["bpd"]


@pytest.mark.parametrize(
    "forged, why",
    [
        (np.zeros((2, 2)), "digest"),  # well-formed, plausible-looking, wrong
        (np.full((2, 2), np.nan), "non-finite"),
        (np.zeros((2, 3)), "shape"),
        (np.zeros((2, 2), dtype=np.float32), "dtype"),
    ],
)
def test_a_part_overwritten_with_well_formed_values_is_computed_again_and_said(tiny_model, tmp_path, forged, why):
    x = _images(4, seed=5)
    whole = evaluate_bpd(tiny_model, x, samples=3, batch_size=4, per_image=True, parts=_parts(tiny_model, tmp_path))
    (chunk_one,) = (tmp_path / "parts").glob("chunk-0000001*.npy")
    np.save(chunk_one, forged, allow_pickle=False)
    said = []
    again = evaluate_bpd(tiny_model, x, samples=3, batch_size=4, per_image=True,
                         parts=_parts(tiny_model, tmp_path, log=said.append))  # fmt: skip
    assert again["resumed_images"] == 2
    assert {k: v for k, v in again.items() if k != "resumed_images"} == {
        k: v for k, v in whole.items() if k != "resumed_images"
    }
    assert len(said) == 1 and "chunk 1 " in said[0] and why in said[0], said
    # Computed again, it is saved again: a third run takes both chunks as they are, silently.
    said.clear()
    third = evaluate_bpd(tiny_model, x, samples=3, batch_size=4, parts=_parts(tiny_model, tmp_path, log=said.append))
    assert third["resumed_images"] == 4 and third["bpd"] == whole["bpd"] and said == []


def test_a_part_of_another_evaluation_is_not_taken_for_one_of_this(tiny_model, tmp_path):
    x = _images(4, seed=5)
    evaluate_bpd(tiny_model, x, samples=3, batch_size=4, seed=1, parts=_parts(tiny_model, tmp_path / "other", seed=1))
    whole = evaluate_bpd(tiny_model, x, samples=3, batch_size=4, parts=_parts(tiny_model, tmp_path))
    for path in (tmp_path / "parts").glob("chunk-0000001*.npy"):
        path.unlink()
    for path in (tmp_path / "other" / "parts").glob("chunk-0000001*.npy"):  # its name and contents, copied
        (tmp_path / "parts" / path.name).write_bytes(path.read_bytes())
    said = []
    again = evaluate_bpd(tiny_model, x, samples=3, batch_size=4, parts=_parts(tiny_model, tmp_path, log=said.append))
    assert again["resumed_images"] == 2 and again["bpd"] == whole["bpd"]
    assert len(said) == 1 and "chunk 1 " in said[0], said

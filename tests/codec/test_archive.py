"""compress/decompress: exact round trips, the rate against the model's bound, and every refusal."""

import hashlib
import json
import math
import struct
import zlib

import numpy as np
import pytest
import torch

import flowpp
from flowpp.codec import CodecError, compress, decompress, read_header
from flowpp.codec.header import FORMAT_VERSION, MAGIC, pack


def _images(config, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 200, (n, config.image_shape[0], 1, 1), generator=g)
    return (base + torch.randint(0, 50, (n, *config.image_shape), generator=g)).clamp(0, config.num_levels - 1)


def _repack(data: bytes, change) -> bytes:
    """The archive with its header changed by ``change(header)``, digests made valid again."""
    header, words = read_header(data)
    change(header)
    return pack(header, words)


@pytest.fixture
def archive(tiny_model, single_thread):
    x = _images(tiny_model.config, 5)
    stats = {}
    return x, compress(tiny_model, x, stats=stats), stats


def test_images_come_back_exactly(tiny_model, archive):
    x, data, stats = archive
    out = decompress(data, tiny_model)
    assert np.array_equal(out.images, x.permute(0, 2, 3, 1).numpy()) and out.names is None
    header, words = read_header(data)
    assert 32 * len(words) == pytest.approx(sum(stats["image_bits"]) + stats["seed_bits"], abs=32)
    coder = header["coder"]
    assert 1 <= coder["lead_images"] < 5 and coder["batches"][0] == 1
    assert coder["lead_images"] + sum(coder["batches"]) == 5
    # The lead (with the checksums) holds what the first bits-back image borrows.
    assert 0 < stats["lead_bits"] < stats["seed_bits"] and stats["seed_bits"] >= stats["first_borrow_bits"]


def test_without_a_lead_every_image_is_coded_by_bits_back(tiny_model, single_thread):
    x = _images(tiny_model.config, 3)
    stats = {}
    data = compress(tiny_model, x, lead=False, stats=stats)
    coder = read_header(data)[0]["coder"]
    assert coder["lead_images"] == 0 and coder["lead_bytes"] == 0 and sum(coder["batches"]) == 3
    assert stats["seed_bits"] >= stats["first_borrow_bits"]
    assert np.array_equal(decompress(data, tiny_model).images, x.permute(0, 2, 3, 1).numpy())


def test_a_single_image_is_all_lead_and_costs_its_jpeg_xl(tiny_model, single_thread):
    from flowpp.codec.lead import encode_lead

    x = _images(tiny_model.config, 1)
    data = compress(tiny_model, x)
    header, words = read_header(data)
    assert header["coder"]["lead_images"] == 1 and header["coder"]["batches"] == []
    # digest, a 4-byte checksum, the JPEG XL bytes and the top word: nothing borrowed, nothing else
    assert 4 * len(words) == 32 + 4 + -(-len(encode_lead(x)) // 4) * 4 + 4
    assert np.array_equal(decompress(data, tiny_model).images, x.permute(0, 2, 3, 1).numpy())


def test_images_too_compressible_for_the_headers_check_are_padded(tiny_model, single_thread):
    """Constant images: JPEG XL makes almost nothing of them, below the bits per value that
    read_header demands of an archive; the seed is padded so that the archive still reads."""
    x = torch.zeros(40, *tiny_model.config.image_shape, dtype=torch.long)
    data = compress(tiny_model, x)
    assert np.array_equal(decompress(data, tiny_model).images, x.permute(0, 2, 3, 1).numpy())


def test_the_archive_costs_the_models_bound_at_the_noise_it_drew(tiny_config, perturb, single_thread):
    """Local bits-back is exact in the limit of a fine grid; on a smooth model (initialised on
    data, moved a little) its overhead is already a small fraction of a bit per value."""
    torch.manual_seed(0)
    model = flowpp.FlowPlusPlus(tiny_config).double()
    model.initialize(_images(tiny_config, 16, seed=1))
    perturb(model, 0.02, seed=2)
    x = _images(tiny_config, 8, seed=3)
    stats = {}
    compress(model, x, lead=False, stats=stats)
    with torch.no_grad():
        bound = -model.log_prob(x, noise=stats["noise"]).sum().item() / math.log(2)
    assert sum(stats["image_bits"]) == pytest.approx(bound, abs=0.02 * x.numel())


def test_arrays_names_and_a_single_image(tiny_model, single_thread):
    x = _images(tiny_model.config, 2, seed=3)
    nhwc = x.permute(0, 2, 3, 1).numpy().astype(np.uint8)
    out = decompress(compress(tiny_model, nhwc, ["a.png", "b.png"]), tiny_model)
    assert np.array_equal(out.images, nhwc) and out.names == ["a.png", "b.png"]
    one = compress(tiny_model, nhwc[:1])
    assert np.array_equal(decompress(one, tiny_model).images, nhwc[:1])


@pytest.mark.parametrize("changes", [{"dequantizer": "uniform"}, {"coupling": "affine", "pointwise": False}])
def test_ablation_models_compress_too(tiny_config, perturb, changes, single_thread):
    torch.manual_seed(0)
    model = flowpp.FlowPlusPlus(tiny_config.replace(**changes)).double()
    model.initialize(_images(model.config, 8))
    perturb(model, 0.1, seed=1)
    x = _images(model.config, 3, seed=2)
    assert torch.equal(torch.from_numpy(decompress(compress(model, x), model).images).permute(0, 3, 1, 2), x.byte())


def test_damaged_archives_are_refused_in_one_line(tiny_model, archive):
    _, data, _ = archive
    cases = {
        "not a flowpp archive": b"PNG" + data[3:],
        "format version": data[:8] + struct.pack("<H", 99) + data[10:],
        "truncated": data[: len(data) // 2],
        "truncated or altered": data[:-1],
        "altered": data[:40] + bytes([data[40] ^ 1]) + data[41:],
    }
    for reason, bad in cases.items():
        with pytest.raises(CodecError, match=reason) as e:
            decompress(bad, tiny_model)
        assert "\n" not in str(e.value)
    with pytest.raises(CodecError, match="altered"):
        decompress(data[:-40] + bytes([data[-40] ^ 0x80]) + data[-39:], tiny_model)


def test_headers_that_promise_more_than_the_file_holds_are_refused(tiny_model, archive):
    _, data, _ = archive

    def many(h):
        h["images"]["count"] = 10**6
        h["coder"]["batches"] = [64] * (10**6 // 64)

    for change, reason in [
        (many, "more than its"),
        (lambda h: h["images"].update(count=2**40), "impossible image set"),
        (lambda h: h["coder"].update(batches=[1] * 9), "lead and batch sizes"),
        (lambda h: h["coder"].update(lead_images=0), "lead and batch sizes"),
        (lambda h: h["coder"].update(lead_bytes=10**6), "coder settings"),
        (lambda h: h["coder"].update(check_bytes=3), "coder settings"),
        (lambda h: h["images"].update(names=["../x"] * 5), "plain file name"),
        (lambda h: h.update(stack_words=3), "stack should be"),
    ]:
        with pytest.raises(CodecError, match=reason):
            decompress(_repack(data, change), tiny_model)
    text = zlib.compress(b"[1, 2]")
    body = struct.pack("<8sHI", MAGIC, FORMAT_VERSION, len(text)) + text
    with pytest.raises(CodecError, match="unreadable"):
        read_header(body + hashlib.sha256(body).digest())


def _leaf_paths(node, path=()):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaf_paths(value, (*path, key))
    else:
        yield path


_REMOVE = object()


def test_every_header_field_forged_or_removed_is_refused_in_one_line_or_decodes_exactly(tiny_model, archive):
    """A header forged with valid digests, one field at a time: removed, or of another type or
    an absurd size. Decoding either refuses it in one line or, where it does not read the field,
    gives back the exact images; never another exception."""
    x, data, _ = archive
    header, _ = read_header(data)
    expected = x.permute(0, 2, 3, 1).numpy()
    wrong = [_REMOVE, None, True, -1, 0, 2**40, 1.5, "x", [], [True], [2**40], {}]
    paths = list(_leaf_paths(header))
    assert len(paths) > 20 and ("environment", "threads") in paths and ("coder", "batches") in paths
    refused = 0
    for path in paths:
        for value in wrong:

            def change(h, path=path, value=value):
                parent = h
                for key in path[:-1]:
                    parent = parent[key]
                if value is _REMOVE:
                    del parent[path[-1]]
                else:
                    parent[path[-1]] = value

            try:
                out = decompress(_repack(data, change), tiny_model)
            except CodecError as e:
                assert "\n" not in str(e), (path, value)
                refused += 1
            else:
                assert np.array_equal(out.images, expected), (path, value)
    assert refused > len(paths) * len(wrong) // 2


def test_another_model_or_environment_is_refused(tiny_model, archive, perturb):
    _, data, _ = archive
    other = flowpp.FlowPlusPlus(tiny_model.config).double()
    other.load_state_dict(tiny_model.state_dict())
    perturb(other, 1e-6, seed=9)
    with pytest.raises(CodecError, match="another model"):
        decompress(data, other)
    for key in ("torch", "flowpp", "device", "cpu_kernels", "constriction"):
        with pytest.raises(CodecError, match=f"written with {key}"):
            decompress(_repack(data, lambda h, key=key: h["environment"].update({key: "other"})), tiny_model)


def test_decoding_sets_the_encoders_thread_count(tiny_model, archive, monkeypatch):
    _, data, _ = archive
    assert read_header(data)[0]["environment"]["threads"] == 1
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    real(2)
    try:
        decompress(data, tiny_model)
    finally:
        real(1)
    assert calls == [1, 2]


def test_a_decode_that_diverges_is_caught_not_returned(tiny_model, archive, monkeypatch):
    """Another floating-point result anywhere (here: one weight moved after the identity check)
    changes the decoded values; the checksums in the seed catch it."""
    _, data, _ = archive
    from flowpp.codec import archive as archive_module

    real = archive_module.check_model

    def check_then_move(header, model):
        real(header, model)
        with torch.no_grad():
            model.flow.layers[2].biases[0].add_(1e-3)

    monkeypatch.setattr(archive_module, "check_model", check_then_move)
    with pytest.raises(CodecError, match="did not reproduce"):
        decompress(data, tiny_model)


@pytest.mark.parametrize("word, reason", [(0, "digest does not match"), (8, "image 0 does not match its checksum")])
def test_the_checksums_at_the_bottom_of_the_stack_are_checked(tiny_model, archive, word, reason):
    """A forged archive (digests made valid) whose seed disagrees with the decoded images."""
    _, data, _ = archive
    header, words = read_header(data)
    words = words.copy()
    words[word] ^= 0x10
    with pytest.raises(CodecError, match=reason):
        decompress(pack(header, words), tiny_model)


def test_a_model_of_more_than_256_levels_is_refused(tiny_config):
    model = flowpp.FlowPlusPlus(tiny_config.replace(num_levels=1024)).double()
    x = torch.randint(0, 1024, (1, *tiny_config.image_shape))
    with pytest.raises(CodecError, match="at most 256 levels; this model has 1024"):
        compress(model, x)


def test_bad_inputs_are_refused(tiny_model, single_thread):
    x = _images(tiny_model.config, 2)
    with pytest.raises(CodecError, match="no images"):
        compress(tiny_model, x[:0])
    with pytest.raises(CodecError, match="names"):
        compress(tiny_model, x, ["one.png"])
    with pytest.raises(flowpp.errors.InputError):
        compress(tiny_model, x[:, :, :4])
    with pytest.raises(CodecError, match="grid_bits"):
        compress(tiny_model, x, grid_bits=40)
    json.dumps(read_header(compress(tiny_model, x[:1]))[0])  # the header is plain JSON


def test_a_model_off_the_cpu_is_refused(tiny_model, archive, monkeypatch):
    _, data, _ = archive
    from flowpp.codec import archive as archive_module

    def not_cpu(device):
        real_check(torch.device("meta"))

    real_check = archive_module._check_cpu
    monkeypatch.setattr(archive_module, "_check_cpu", not_cpu)
    with pytest.raises(CodecError, match="runs on the CPU"):
        decompress(data, tiny_model)
    with pytest.raises(CodecError, match="runs on the CPU"):
        compress(tiny_model, _images(tiny_model.config, 1))


def test_a_damaged_lead_is_refused(tiny_model, archive):
    """A forged archive (digests made valid) whose lead images' JPEG XL bytes were changed."""
    _, data, _ = archive
    header, words = read_header(data)
    words = words.copy()
    first_lead_word = -(-(32 + header["coder"]["check_bytes"] * 5) // 4)
    words[first_lead_word + 3] ^= 0x00FF0000
    with pytest.raises(CodecError, match="did not reproduce the images exactly"):
        decompress(pack(header, words), tiny_model)


def test_a_batch_that_borrows_more_than_the_stack_holds_is_undone_and_coded_in_halves(
    tiny_model, single_thread, monkeypatch
):
    from flowpp.codec import bitsback
    from flowpp.codec.entropy import StackCoder

    monkeypatch.setattr(bitsback, "_SAFETY", 0.4)  # plan batches 2.5 times too large
    restores = []
    real = StackCoder.restore
    monkeypatch.setattr(StackCoder, "restore", lambda self, words: (restores.append(1), real(self, words))[1])
    x = _images(tiny_model.config, 12, seed=4)
    data = compress(tiny_model, x, lead=False)
    assert restores and sum(read_header(data)[0]["coder"]["batches"]) == 12
    assert np.array_equal(decompress(data, tiny_model).images, x.permute(0, 2, 3, 1).numpy())


def test_progress_counts_every_image_once_also_when_the_coder_starts_over(tiny_model, single_thread, monkeypatch):
    from flowpp.codec import archive as archive_module

    x = _images(tiny_model.config, 6, seed=5)
    seen = []
    compress(tiny_model, x, progress=seen.append)
    assert sum(seen) == 6
    monkeypatch.setattr(archive_module, "_first_borrow", lambda *a: 1.0)  # far too little: runs dry, starts over
    seen.clear()
    data = compress(tiny_model, x, lead=False, progress=seen.append)
    assert sum(seen) == 6 and all(n > 0 for n in seen)
    assert np.array_equal(decompress(data, tiny_model).images, x.permute(0, 2, 3, 1).numpy())

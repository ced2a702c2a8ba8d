"""The lead images: JPEG XL round trips for every channel count, and the choice of how many."""

import pytest
import torch

from flowpp.codec import CodecError
from flowpp.codec.lead import choose_lead, decode_lead, encode_lead


def _images(n, c, h=5, w=7, top=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, top, (n, c, h, w), generator=g)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_lead_images_come_back_exactly(channels):
    x = _images(3, channels)
    assert torch.equal(decode_lead(encode_lead(x), 3, (channels, 5, 7)), x)


def test_a_lead_of_another_shape_or_damaged_bytes_is_refused():
    data = encode_lead(_images(2, 3))
    with pytest.raises(CodecError, match=r"shape \(10, 7\), expected \(15, 7\)"):
        decode_lead(data, 3, (3, 5, 7))  # refused from the JPEG XL's own header, before decoding
    with pytest.raises(CodecError, match="shape None"):
        decode_lead(b"PNG" + data[3:], 2, (3, 5, 7))
    damaged = data[:14] + bytes(b ^ 0x5A for b in data[14:])
    with pytest.raises(CodecError, match="do not decode|decode to"):
        decode_lead(damaged, 2, (3, 5, 7))


@pytest.mark.parametrize("rows, columns", [(8, 8), (96, 32), (5, 7), (600, 28), (70000, 3), (64, 64), (90, 120)])
def test_the_declared_size_is_read_from_the_codestream(rows, columns):
    from flowpp.codec.lead import _declared_size

    image = torch.randint(0, 256, (1, 1, rows, columns), generator=torch.Generator().manual_seed(rows))
    assert _declared_size(encode_lead(image)) == (rows, columns)


def test_the_lead_is_the_fewest_images_that_hold_the_bits_asked_for():
    x = _images(12, 3, 8, 8, seed=1)
    bits = [8 * len(encode_lead(x[:k])) for k in range(1, 13)]
    need = bits[4] - 1  # five images hold it, four do not
    assert bits[3] < need
    k, data = choose_lead(x, need)
    assert k == 5 and data == encode_lead(x[:5])
    assert choose_lead(x, 10 * bits[-1])[0] == 12  # never more than all of them
    assert choose_lead(x, 1)[0] == 1


def test_small_level_counts_cost_little():
    """A model with 17 levels (the digits): JPEG XL makes use of the small range."""
    x = _images(4, 1, 8, 8, top=17, seed=2)
    assert 8 * len(encode_lead(x)) < 6 * x.numel()
    assert torch.equal(decode_lead(encode_lead(x), 4, (1, 8, 8)), x)


def test_a_jpeg_xl_whose_size_cannot_be_read_is_refused_when_compressing(monkeypatch):
    """A JPEG XL writer that wraps its codestream (a container) would make archives that
    decode_lead refuses: refused at once instead."""
    import imagecodecs

    real = imagecodecs.jpegxl_encode
    monkeypatch.setattr(imagecodecs, "jpegxl_encode", lambda *a, **k: b"\x00\x00\x00\x0cJXL " + real(*a, **k))
    with pytest.raises(CodecError, match="bare JPEG XL codestream"):
        encode_lead(_images(1, 3))

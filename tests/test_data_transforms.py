"""On-device transforms: exact uint8 round trip, per-sample flips, dequantisation range, generator control."""
import pytest
import torch

from phenoflow.data.transforms import augment, decode, encode


def test_encode_decode_round_trip_every_level():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    e = encode(x)
    assert e.min() == -1 and e.max() == 1 and torch.equal(decode(e), x)
    # decode adds 128 (not 127.5) and truncates: round to nearest, so offsets under half a level vanish.
    assert torch.equal(decode(e + 0.49 / 127.5), x) and torch.equal(decode(e - 0.49 / 127.5), x)
    with pytest.raises(TypeError):
        encode(e)


def test_augment_flips_per_sample_and_dequantises():
    g = torch.Generator().manual_seed(0)
    x = encode(torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g))
    y = augment(x, torch.Generator().manual_seed(1))
    noise_free = {"none": x, "h": x.flip(-1), "v": x.flip(-2), "hv": x.flip(-1).flip(-2)}
    kinds = []
    for i in range(64):
        d = {k: (y[i] - v[i]) for k, v in noise_free.items()}
        match = [k for k, v in d.items() if v.min() >= 0 and v.max() < 1 / 128]
        assert len(match) >= 1
        kinds.append(match[0])
    assert set(kinds) == {"none", "h", "v", "hv"}  # every combination occurs in 64 samples
    # The same generator state gives the same result; the flags switch each part off.
    assert torch.equal(y, augment(x, torch.Generator().manual_seed(1)))
    assert torch.equal(augment(x, g, hflip=False, vflip=False, dequantize=False), x)
    z = augment(x, torch.Generator().manual_seed(1), dequantize=False)
    assert ((y - z) >= 0).all() and ((y - z) < 1 / 128).all() and (y - z).std() > 0

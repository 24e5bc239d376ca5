"""The safetensors dtypes (dtypes.py): every dtype and bit pattern (NaN payloads, subnormals, ±0, F8 kinds,
complex, empty and scalar tensors) packed and unpacked bit for bit at every level."""

import numpy as np
import torch
from safetensors.torch import save_file

import weightpack
from conftest import sha256


def _all_dtypes_checkpoint(path):
    g = torch.Generator().manual_seed(0)
    t = {
        "f64": torch.randn(33, 17, generator=g, dtype=torch.float64),
        "f32": torch.randn(300, 70, generator=g),
        "f16": torch.randn(64, 129, generator=g).half(),
        "bf16": torch.randn(129, 64, generator=g).bfloat16(),
        "f8e4m3": torch.randn(50, 40, generator=g).to(torch.float8_e4m3fn),
        "f8e5m2": torch.randn(50, 40, generator=g).to(torch.float8_e5m2),
        "f8e4m3fnuz": torch.randn(30, 20, generator=g).to(torch.float8_e4m3fnuz),
        "f8e5m2fnuz": torch.randn(30, 20, generator=g).to(torch.float8_e5m2fnuz),
        "c64": torch.randn(17, 9, generator=g, dtype=torch.complex64),
        "i64": torch.arange(1000, dtype=torch.int64),
        "i32": torch.randint(-2**31, 2**31 - 1, (77,), generator=g, dtype=torch.int32),
        "i16": torch.randint(-300, 300, (5, 5), generator=g, dtype=torch.int16),
        "i8": torch.randint(-128, 127, (1000,), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (3, 3, 3), generator=g, dtype=torch.uint8),
        "bool": torch.rand(999, generator=g) > 0.3,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "specials": torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-45, 3.4e38]),
    }
    nan_payload = torch.from_numpy(np.array([0x7FC00001, 0xFFC12345, 0x7F800001], dtype=np.uint32).view(np.float32))
    t["nan_payloads"] = nan_payload
    t["bf16_specials"] = torch.from_numpy(np.array([0x7FC1, 0xFF81, 0x0001, 0x8000, 0x7F80], dtype=np.uint16).view(np.int16)).view(torch.bfloat16)
    save_file(t, str(path), metadata={"format": "pt", "note": "every dtype"})
    return t


def test_every_dtype_and_bit_pattern_round_trips(tmp_path):
    src = tmp_path / "all.safetensors"
    ref = _all_dtypes_checkpoint(src)
    for level in (1, 2, 3):
        wpk = tmp_path / f"all{level}.wpk"
        weightpack.pack(src, wpk, level=level)
        out = weightpack.unpack(wpk, tmp_path / f"out{level}.safetensors")
        assert sha256(out) == sha256(src)
    got = weightpack.load(tmp_path / "all2.wpk")
    for k, v in ref.items():
        assert got[k].shape == v.shape and got[k].dtype == v.dtype
        assert got[k].reshape(-1).view(torch.uint8).tolist() == v.reshape(-1).view(torch.uint8).tolist()

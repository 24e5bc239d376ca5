"""Containers written by an earlier release (weightpack 0.1.0, format 1.2, packed with constriction at commit
6840020 and stored in tests/data/v1.2) still load bit for bit, under every CPU decoder."""

import hashlib
import json
import pathlib

import pytest
import torch

import weightpack

from conftest import CPU_DECODERS, cpu_decoder

DATA = pathlib.Path(__file__).parent / "data" / "v1.2"
EXPECTED = json.loads((DATA / "expected.json").read_text())


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


@pytest.mark.parametrize("decoder", CPU_DECODERS)
@pytest.mark.parametrize("name", sorted(EXPECTED["containers"]))
def test_old_containers_load_bit_exactly(name, decoder):
    with cpu_decoder(decoder):
        got = weightpack.load(DATA / f"{name}.wpk", workers=2)
    assert {k: _digest(v) for k, v in got.items()} == EXPECTED["containers"][name]


@pytest.mark.parametrize("name", ["lossless-L1", "lossless-L2", "lossless-L3"])
def test_old_lossless_containers_unpack_to_their_source(tmp_path, name):
    out = weightpack.unpack(DATA / f"{name}.wpk", tmp_path / "restored.safetensors", workers=2)
    assert hashlib.sha256(pathlib.Path(out).read_bytes()).hexdigest() == EXPECTED["source_sha256"]
    assert weightpack.verify(DATA / f"{name}.wpk", against=DATA / "source.safetensors").ok

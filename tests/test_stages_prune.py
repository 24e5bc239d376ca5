"""The pruning stage (stages/prune.py): magnitude and n:m patterns, zeros kept exact by quantization, and the
pruned presets."""

import pytest
import torch
from safetensors.torch import load_file

import weightpack
from weightpack.stages import quantize as Q
from weightpack.stages.params import QuantParams

from conftest import sqnr


@pytest.mark.parametrize("shape", [[64, 100], [1000], [3, 5, 8]])
def test_pruning_patterns(shape):
    from weightpack.stages import prune
    from weightpack.stages.params import PruneParams

    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    x = prune.apply(w, PruneParams(sparsity=0.3))
    assert int((x == 0).sum()) == int(0.3 * w.numel())
    kept = x != 0
    assert torch.equal(x[kept], w[kept]) and w[~kept].abs().max() <= w[kept].abs().min()
    y = prune.apply(w, PruneParams(n=2, m=4))
    rows = shape[0] if len(shape) > 1 else 1
    flat = y.reshape(rows, -1)
    full = flat[:, : flat.shape[1] // 4 * 4].reshape(rows, -1, 4)
    assert int((full != 0).sum(dim=2).max()) <= 2
    for sym in (True, False):  # pruned zeros come back as exact zeros after quantization
        p = QuantParams(bits=4, symmetric=sym, granularity="group", group=32)
        back = Q.decode(Q.encode(y, p), p, shape)
        assert torch.all(back[y == 0] == 0)


@pytest.mark.parametrize("recipe, max_bpw", [("prune50-int4", 3.0), ("2of4-int4", 3.1)])
def test_pruned_presets_are_cheaper_than_dense(tmp_path, minilm, recipe, max_bpw):
    wpk = tmp_path / "p.wpk"
    weightpack.pack(minilm, wpk, recipe=recipe)
    assert weightpack.inspect(wpk).totals.bits_per_weight < max_bpw
    got, ref = weightpack.load(wpk), load_file(str(minilm))
    w = ref["encoder.layer.0.intermediate.dense.weight"]
    g = got["encoder.layer.0.intermediate.dense.weight"]
    assert abs(float((g == 0).double().mean()) - 0.5) < 0.01
    assert weightpack.verify(wpk, against=minilm).ok and sqnr(w, g) > 5

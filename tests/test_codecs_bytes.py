"""The bytes codec (coding/codecs/bytes/): wide integers and sub-byte types, round trip through the registry."""

import numpy as np

from weightpack.coding.codecs import registry
from weightpack.coding.codecs.fields import codec as fields

from test_codecs_fields import _round_trip


def test_bytes_codec_for_wide_integers_and_sub_byte_types():
    u = np.arange(5000, dtype=np.int64).view(np.uint64)
    plan, recs = _round_trip("I64", [5000], u, 2)
    assert plan.codec == "bytes" and sum(len(p) for _, p in recs) < 2000
    raw = np.random.default_rng(0).integers(0, 256, size=1001, dtype=np.uint8)
    plan = fields.make_plan("F4", [2002], None, 2)
    rec, payload = registry.encode_chunk(plan, 0, raw)
    back = registry.plan_from_record("F4", 2002, plan.params(), b"", "t")
    assert registry.decode_chunk(back, 0, rec, memoryview(payload), "t") == raw.tobytes()

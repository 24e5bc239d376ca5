"""Recipes (recipe.py): bad TOML files, unknown preset names, bad dicts and levels are RecipeErrors (one
line naming the key from the command), and nothing is written."""

from __future__ import annotations

import pytest

import weightpack
from weightpack import RecipeError, WeightpackError

from conftest import assert_error, cli


RECIPES = {
    "unknown-top-key": ('name = "r"\nlevel = 2\nturbo = true\n', "turbo"),
    "unknown-rule-key": ('name = "r"\n[[rules]]\nmatch = "*"\nbits = 4\n', "bits"),
    "level-wrong-type": ('name = "r"\nlevel = "high"\n', "level"),
    "level-float": ('name = "r"\nlevel = 2.0\n', "level"),
    "level-bool": ('name = "r"\nlevel = true\n', "level"),
    "level-out-of-range": ('name = "r"\nlevel = 9\n', "level"),
    "name-wrong-type": ('name = 5\n', "name"),
    "description-wrong-type": ('description = ["a"]\n', "description"),
    "rules-wrong-type": ('rules = "all"\n', "rules"),
    "rule-not-table": ('rules = [1, 2]\n', "rules"),
    "match-wrong-type": ('[[rules]]\nmatch = 5\n', "match"),
    "stages-wrong-type": ('[[rules]]\nmatch = "*"\nstages = "int4"\n', "stages"),
    "unknown-stage": ('[[rules]]\nmatch = "*"\nstages = ["int4"]\n', "int4"),
    "invalid-toml": ('name = "r\nlevel = \n', None),
    "not-utf8": (b"name = \"\xff\xfe\"\n", None),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_bad_recipe_file(base, tmp_path, outdir, case):
    text, key = RECIPES[case]
    rec = tmp_path / "r.toml"
    rec.write_bytes(text if isinstance(text, bytes) else text.encode())
    args = ["pack", base["single"], "-o", outdir / "m.wpk", "-r", rec]
    res = cli(*args)
    assert_error(res, 2, args)
    if key is not None:
        assert key in res.stderr, f"the message must name {key!r}: {res.stderr!r}"
    assert list(outdir.iterdir()) == []
    if not isinstance(text, bytes):
        with pytest.raises(RecipeError):
            weightpack.pack(base["single"], outdir / "m.wpk", recipe=str(rec), workers=1)


def test_unknown_recipe_name(base, outdir):
    for name in ("no-such-preset", "lossy9", "../configs/lossless"):
        args = ["pack", base["single"], "-o", outdir / "m.wpk", "-r", name]
        res = cli(*args)
        assert_error(res, 2, args)
        assert name in res.stderr
    assert_error(cli("pack", base["single"], "-o", outdir / "m.wpk", "-r", outdir / "missing.toml"), 2)
    assert list(outdir.iterdir()) == []
    with pytest.raises(RecipeError):
        weightpack.pack(base["single"], outdir / "m.wpk", recipe="no-such-preset")


@pytest.mark.parametrize("recipe", [{"turbo": 1}, {"level": "2"}, {"rules": [{"match": "*", "bits": 4}]},
                                    {"rules": [{"match": "*", "stages": ["int4"]}]}, {"level": 0}])
def test_bad_recipe_dict_api(base, outdir, recipe):
    with pytest.raises(RecipeError):
        weightpack.pack(base["single"], outdir / "m.wpk", recipe=recipe)
    assert list(outdir.iterdir()) == []


def test_bad_level_api(base, outdir):
    for level in (0, 4, "2", 2.5):
        with pytest.raises(WeightpackError):
            weightpack.pack(base["single"], outdir / "m.wpk", level=level)
    assert list(outdir.iterdir()) == []

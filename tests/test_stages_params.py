"""Stage parameters (stages/params.py) parsed from recipe data: bad values and bad chains are RecipeErrors
naming the key."""

import pytest

from weightpack.errors import RecipeError
from weightpack.recipe import load_recipe


@pytest.mark.parametrize("bad, key", [({"bits": 9}, "bits"), ({"bits": "4"}, "bits"), ({"granularity": "row"}, "granularity"),
                                      ({"group": 0}, "group"), ({"symmetric": 1}, "symmetric"), ({"bitz": 4}, "bitz")])
def test_stage_parameters_are_checked(bad, key):
    with pytest.raises(RecipeError, match=key):
        load_recipe({"rules": [{"match": "*", "stages": [{"name": "quantize", **bad}]}]})


def test_stage_chains_are_checked():
    with pytest.raises(RecipeError, match="prune, quantize"):
        load_recipe({"rules": [{"stages": [{"name": "quantize"}, {"name": "prune"}]}]})
    with pytest.raises(RecipeError, match="sparsity"):
        load_recipe({"rules": [{"stages": [{"name": "prune", "sparsity": 1.5}, {"name": "quantize"}]}]})
    with pytest.raises(RecipeError, match="'n' and 'm'"):
        load_recipe({"rules": [{"stages": [{"name": "prune", "n": 4, "m": 2}, {"name": "quantize"}]}]})

"""Recipes: TOML data saying how each tensor is packed. Presets live in configs/.

    name = "lossless"
    description = "..."
    level = 2                 # optional, 1 (fastest decode) .. 3 (smallest)
    [[rules]]                 # optional; the first rule whose pattern matches a tensor name applies
    match = "*.weight"        # shell-style pattern (fnmatch)
    min_dims = 2              # optional: only tensors with at least this many dimensions
    stages = [{name = "quantize", bits = 4, symmetric = false, granularity = "group", group = 128}]
    # or [{name = "prune", n = 2, m = 4}, {name = "quantize", ...}]: prune, then quantize

Stages apply to floating-point tensors only; a tensor no rule matches is packed losslessly.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .coding.levels import DEFAULT_LEVEL, LEVELS
from .errors import RecipeError
from .stages.params import parse_chain

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
_PACKAGED = Path(__file__).resolve().parent / "configs"


@dataclass
class Rule:
    match: str
    stages: list = field(default_factory=list)  # parsed stage parameters (QuantParams, ...)
    min_dims: int = 0


@dataclass
class Recipe:
    name: str
    description: str = ""
    level: int = DEFAULT_LEVEL
    rules: list[Rule] = field(default_factory=list)

    @property
    def lossy(self) -> bool:
        """Whether any rule applies lossy stages."""
        return any(r.stages for r in self.rules)

    def stages_for(self, tensor: str, ndim: int) -> list:
        for r in self.rules:
            if fnmatch.fnmatchcase(tensor, r.match) and ndim >= r.min_dims:
                return r.stages
        return []

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "level": self.level,
                "rules": [{"match": r.match, "min_dims": r.min_dims, "stages": [s.to_json() for s in r.stages]}
                          for r in self.rules]}


def _typed(d: dict, key: str, typ, where: str, default=None):
    if key not in d:
        return default
    v = d[key]
    if typ is int and (type(v) is not int):
        raise RecipeError(f"recipe {where}: {key!r} must be an integer")
    if typ is not int and not isinstance(v, typ):
        raise RecipeError(f"recipe {where}: {key!r} must be a {typ.__name__}")
    return v


def recipe_from_dict(d: dict, where: str) -> Recipe:
    unknown = sorted(set(d) - {"name", "description", "level", "rules"})
    if unknown:
        raise RecipeError(f"recipe {where}: unknown key {unknown[0]!r}")
    level = _typed(d, "level", int, where, DEFAULT_LEVEL)
    if level not in LEVELS:
        raise RecipeError(f"recipe {where}: 'level' must be one of {sorted(LEVELS)}")
    rules = []
    for i, r in enumerate(_typed(d, "rules", list, where, [])):
        w = f"{where} rules[{i}]"
        if not isinstance(r, dict):
            raise RecipeError(f"recipe {w}: must be a table")
        unknown = sorted(set(r) - {"match", "stages", "min_dims"})
        if unknown:
            raise RecipeError(f"recipe {w}: unknown key {unknown[0]!r}")
        match = _typed(r, "match", str, w, "*")
        min_dims = _typed(r, "min_dims", int, w, 0)
        stages = parse_chain(_typed(r, "stages", list, w, []), w)
        rules.append(Rule(match, stages, min_dims))
    return Recipe(_typed(d, "name", str, where, where), _typed(d, "description", str, where, ""), level, rules)


def preset_dirs() -> list[Path]:
    return [p for p in (CONFIGS, _PACKAGED) if p.is_dir()]


def presets() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for d in reversed(preset_dirs()):
        for p in sorted(d.glob("*.toml")):
            out[p.stem] = p
    return out


def load_recipe(spec: "str | Recipe | dict | None") -> Recipe:
    """A recipe from a preset name, a TOML file path, a dict, or a Recipe."""
    if spec is None:
        spec = "lossless"
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        return recipe_from_dict(spec, "<dict>")
    path = Path(spec)
    if not (spec.endswith(".toml") or path.is_file()):
        found = presets().get(spec)
        if found is None:
            raise RecipeError(f"unknown recipe {spec!r} (presets: {', '.join(sorted(presets()))})")
        path = found
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe file {path}: cannot read ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"recipe file {path}: invalid TOML ({e})") from None
    return recipe_from_dict(data, path.name)

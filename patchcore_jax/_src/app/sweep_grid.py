"""The sweep's grid: `KEY=V1,V2` specifications parsed, checked and expanded into cells, before any work.

A KEY is a `PatchCoreConfig` field (`coreset_fraction`, `patch_size`, `layers` with a value's layers
joined by `+`, `num_neighbors`, `anomaly_scorer_num_nn`, `sampler`, `resize`, `crop`, `backbone`, ...)
or `shots` (training images per category). The seed is not a grid key: `--seeds` gives the seeds every
cell runs with. Cells are the product of the keys' values, in the order the keys and values are given.
Every cell's configuration is built (and so validated) here; a bad key or value stops the sweep with
one line naming it.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from patchcore_jax._src.model.config import PatchCoreConfig

SHOTS = "shots"
_FLOATS = ("coreset_fraction", "sigma")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell: `values` as written in the grid (key -> text), `changes` the config fields it sets
    (typed), `shots` the training images per category (None: all)."""

    values: tuple[tuple[str, str], ...]
    changes: tuple[tuple[str, Any], ...]
    shots: int | None

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.values) or "base"

    def config(self, base: PatchCoreConfig, seed: int) -> PatchCoreConfig:
        return base.replace(**dict(self.changes), seed=seed)


def keys_allowed() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(PatchCoreConfig) if f.name != "seed") + (SHOTS,)


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """`"KEY=V1,V2"` -> `("KEY", ["V1", "V2"])`; ValueError naming the spec when malformed."""
    key, sep, values = spec.partition("=")
    key = key.strip()
    items = [v.strip() for v in values.split(",")] if sep else []
    if not key or not sep or not items or any(not v for v in items):
        raise ValueError(f"--grid {spec!r}: expected KEY=V1[,V2,...] with non-empty values")
    return key, items


def _text(key: str, value) -> str:
    if key == "layers" and isinstance(value, (list, tuple)):
        return "+".join(value)
    if value is None:
        return "none"
    return str(value)


def _typed(key: str, text: str):
    """A grid value as written -> the field's type (ValueError naming the key and value)."""
    if key == "layers":
        return tuple(part.strip() for part in text.split("+"))
    if key == "weights":
        return None if text.lower() == "none" else text
    default = {f.name: f.default for f in dataclasses.fields(PatchCoreConfig)}.get(key)
    try:
        if key == SHOTS or (isinstance(default, int) and not isinstance(default, bool) and key not in _FLOATS):
            return int(text)
        if key in _FLOATS:
            return float(text)
    except ValueError:
        raise ValueError(f"--grid {key}={text}: expected {'an integer' if key not in _FLOATS else 'a number'}") from None
    return text


def normalise_grid(grid) -> list[tuple[str, list[str]]]:
    """A grid as `[(key, [value text, ...]), ...]` from a mapping `{key: [values]}`, a sequence of
    `"KEY=V1,V2"` specifications, or pairs; unknown or repeated keys refused, naming them."""
    if isinstance(grid, dict):
        # Each key maps to a list of values; a `layers` value is "layer2+layer3" or ("layer2", "layer3").
        pairs = [(k, list(v) if isinstance(v, (list, tuple)) else [v]) for k, v in grid.items()]
    else:
        pairs = [parse_spec(s) if isinstance(s, str) else tuple(s) for s in (grid or [])]
    allowed = keys_allowed()
    seen = set()
    out = []
    for key, values in pairs:
        if key == "seed":
            raise ValueError("--grid seed: the seed is not a grid key; give the seeds with --seeds")
        if key not in allowed:
            raise ValueError(f"--grid {key}: unknown key; expected one of {', '.join(allowed)}")
        if key in seen:
            raise ValueError(f"--grid {key}: given twice; list all its values in one --grid {key}=V1,V2")
        seen.add(key)
        texts = [_text(key, v) for v in values]
        if not texts:
            raise ValueError(f"--grid {key}: no values")
        if len(set(texts)) != len(texts):
            raise ValueError(f"--grid {key}: repeated values {texts}")
        out.append((key, texts))
    return out


def expand(grid, base: PatchCoreConfig, seeds, *, adjust=lambda cfg: cfg) -> list[Cell]:
    """The cells of `grid` (see `normalise_grid`) over `base`, each built with every seed and checked
    (`adjust`: the data set's protocol, e.g. mSTC's squash). ValueError naming the key and value."""
    spec = normalise_grid(grid)
    cells = []
    for combo in itertools.product(*[[(k, t) for t in texts] for k, texts in spec]):
        changes, shots = [], None
        for key, text in combo:
            value = _typed(key, text)
            if key == SHOTS:
                if isinstance(value, bool) or value < 1:
                    raise ValueError(f"--grid shots={text}: expected a positive number of training images")
                shots = value
            else:
                changes.append((key, value))
        cell = Cell(tuple(combo), tuple(changes), shots)
        for seed in seeds:
            try:
                adjust(cell.config(base, seed))
            except ValueError as err:
                field, _, rest = str(err).partition(": ")
                named = [f"{k}={t}" for k, t in combo if k == field] or [cell.label]
                raise ValueError(f"--grid {named[0]}: {rest or err}") from None
        cells.append(cell)
    return cells


def check_seeds(seeds) -> tuple[int, ...]:
    """`"0,1,2"` or a sequence of ints -> a tuple of distinct seeds."""
    if isinstance(seeds, str):
        try:
            seeds = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds {seeds}: expected integers separated by commas") from None
    seeds = tuple(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"--seeds {seeds}: expected non-negative integers")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {seeds}: repeated")
    return seeds

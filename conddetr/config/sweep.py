"""Sweep files: a base spec, `common` overrides, a `grid` and/or `runs`, expanded into named override lists."""

from __future__ import annotations

import difflib
import hashlib
import itertools
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from conddetr.config.loading import load_config, read_yaml_mapping
from conddetr.config.schema import ConfigError, schema_paths

SWEEP_KEYS = ("base", "common", "grid", "runs")


def load_sweep(path: str | os.PathLike) -> tuple[str, list[list[str]]]:
    """Expand a sweep file into (base spec path, one override list per run); every run is validated.

    Order: for each entry of `runs` (file order), every `grid` point (cartesian product, first key slowest).
    `common` overrides come first in every run.
    """
    base_path, named = load_sweep_runs(path)
    return base_path, [overrides for _, overrides in named]


def load_sweep_runs(path: str | os.PathLike) -> tuple[str, list[tuple[str, list[str]]]]:
    """`load_sweep` with each run's name: `run_name_for` of its grid and run overrides (`common` ones are shared by
    every run, so they stay out of the names)."""
    path = Path(path)
    data = read_yaml_mapping(path)
    for key in data:
        if key not in SWEEP_KEYS:
            hint = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"unknown key '{key}' in sweep {path} (valid: {', '.join(SWEEP_KEYS)}){suggestion}")
    base = data.get("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"sweep {path} needs 'base': the spec path, relative to the sweep file")
    base_path = os.path.normpath(path.parent / base)
    common = data.get("common") or {}
    if not isinstance(common, dict):
        raise ConfigError(f"'common' in sweep {path} must be a mapping of overrides shared by every run")
    common = flatten_keys(common)
    grid = data.get("grid") or {}
    runs = data.get("runs")
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"'grid' in sweep {path} must map each key to a non-empty list of values")
    if runs is not None and not (isinstance(runs, list) and runs and all(isinstance(r, dict) for r in runs)):
        raise ConfigError(f"'runs' in sweep {path} must be a non-empty list of override mappings ({{}} = base)")
    if not grid and runs is None:
        raise ConfigError(f"sweep {path} defines no runs: give 'grid', 'runs' or both")

    points = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
    shared = [f"{k}={_format_value(v, path)}" for k, v in common.items()]
    expanded: list[tuple[str, list[str]]] = []
    names: dict[str, list[str]] = {}
    for index, run in enumerate(runs or [{}]):
        run = flatten_keys(run)
        for point in points:
            both = sorted(set(point) & set(run))
            if both:
                raise ConfigError(f"sweep {path}: runs[{index}] sets {', '.join(both)}, which 'grid' also sweeps")
            again = sorted(set(common) & (set(point) | set(run)))
            if again:
                raise ConfigError(f"sweep {path}: 'common' sets {', '.join(again)}, which 'grid' or 'runs' also set")
            own = [f"{k}={_format_value(v, path)}" for k, v in {**point, **run}.items()]
            overrides = shared + own
            try:
                load_config(base_path, overrides)
            except ConfigError as e:
                raise ConfigError(f"sweep {path}, run {overrides}: {e}") from e
            name = run_name_for(own)
            if name in names:
                raise ConfigError(f"sweep {path}: runs {names[name]} and {overrides} share the name '{name}'")
            names[name] = overrides
            expanded.append((name, overrides))
    return base_path, expanded


def run_name_for(overrides: Sequence[str]) -> str:
    """Readable, file-system-safe run name from overrides, e.g. `optim.lr=0.0002` -> `lr0.0002`; none -> `base`."""
    parts = []
    for item in overrides:
        key, _, value = item.partition("=")
        value = value.strip().strip("'\"")
        clean = re.sub(r"[^A-Za-z0-9.+-]+", "-", value)
        clean = (clean if value.startswith("-") else clean.lstrip("-")).rstrip("-") or "empty"
        joiner = "" if re.match(r"[-+.\d]", clean) else "-"  # numbers read well glued: lr0.0002, variant-detr
        parts.append(f"{_short_key(key.strip())}{joiner}{clean}")
    name = "_".join(parts) or "base"
    if len(name) > 120:  # file-system limits; the hash keeps long names unique
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def _short_key(key: str) -> str:
    """Shortest dotted suffix naming one schema key: `optim.lr` -> `lr`, but `optim.seed` stays (data has one too)."""
    parts = key.split(".")
    paths = schema_paths()
    for n in range(1, len(parts)):
        suffix = ".".join(parts[-n:])
        if sum(p == suffix or p.endswith(f".{suffix}") for p in paths) <= 1:
            return suffix
    return key


def flatten_keys(mapping: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested mappings ({model: {variant: detr}}) become dotted keys ({model.variant: detr})."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _format_value(value: Any, path: Path) -> str:
    """Override text that OmegaConf's dotlist parser reads back as the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_format_value(v, path) for v in value) + "]"
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_/][\w./:-]*", value)
        if plain and value.lower() not in ("null", "true", "false", "none", "nan", "inf"):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    raise ConfigError(f"sweep {path}: value {value!r} of type {type(value).__name__} cannot be an override")

"""Layering (schema <- spec YAML and its `base` chain <- command-line overrides), saving and restoring configs.

The only module in `conddetr` that parses YAML; errors name the key, the source and the closest valid key.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from conddetr.config.schema import Config, ConfigError, is_section, schema_paths
from conddetr.config.validation import validate

CONFIG_NAME = "config.yaml"  # resolved config saved in every run folder
COMMAND_LINE = "command line"  # source name used in errors about overrides


_Source = tuple[str, dict]  # (name used in messages, plain nested dict)


def load_config(spec_path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> DictConfig:
    """Schema defaults <- spec YAML (after its `base` chain) <- `key=value` overrides, then validated.

    Returns a structured, writable DictConfig (struct mode: assigning an unknown key or a wrong type still fails).
    When no source sets `name`, it defaults to the spec file's stem. Raises ConfigError naming key and source.
    """
    sources: list[_Source] = []
    if spec_path is not None:
        sources += _read_spec_chain(Path(spec_path), seen=())
    sources += [(f"{COMMAND_LINE} override '{item}'", _parse_override(item)) for item in overrides]
    cfg, provenance = _build(sources)
    if spec_path is not None and "name" not in provenance:
        cfg.name = Path(spec_path).stem
    validate(cfg, provenance)
    return cfg


def save_config(cfg: DictConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically); a folder gets `CONFIG_NAME` inside it. Returns the file."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_NAME
    text = OmegaConf.to_yaml(cfg, resolve=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # a preempted job never leaves a half-written config behind
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def run_dir_of(cfg: DictConfig) -> Path:
    """The run folder: `run_dir` when set, else `output_dir/<name>` (one rule for the launcher and the engine)."""
    return Path(cfg.run_dir) if cfg.run_dir else Path(cfg.output_dir) / cfg.name


def config_to_dict(cfg: DictConfig) -> dict:
    """Plain nested dict (str/int/float/bool/None/list/dict), safe in a `weights_only=True` checkpoint."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def config_from_dict(data: Mapping, overrides: Iterable[str] = (), source: str = "saved config") -> DictConfig:
    """Back from `config_to_dict` output (checkpoint, config.yaml) to a validated config, for resume and eval."""
    if isinstance(data, DictConfig):
        data = OmegaConf.to_container(data, resolve=False)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source} must be a mapping of config keys, got {type(data).__name__}")
    sources = [(source, dict(data))]
    sources += [(f"{COMMAND_LINE} override '{item}'", _parse_override(item)) for item in overrides]
    cfg, provenance = _build(sources)
    validate(cfg, provenance)
    return cfg


def read_yaml_mapping(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError and OmegaConf grammar errors
        raise ConfigError(f"cannot parse YAML in {path}: {e}") from e
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of keys, not a {type(node).__name__}")
    return OmegaConf.to_container(node, resolve=False)


def _read_spec_chain(path: Path, seen: tuple[Path, ...]) -> list[_Source]:
    """The spec and, first, the specs it names through `base:` (resolved relative to the naming file)."""
    resolved = path.resolve()
    if resolved in seen:
        raise ConfigError(f"'base' chain loops back to {path}")
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    chain: list[_Source] = []
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"'base' in {path} must be the path of another spec, relative to {path}")
        chain = _read_spec_chain(path.parent / base, seen + (resolved,))
    return chain + [(str(path), data)]


def _parse_override(item: str) -> dict:
    key, eq, _ = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"{COMMAND_LINE} override '{item}' is not of the form key=value")
    if key[0] in "+~":
        raise ConfigError(f"{COMMAND_LINE} override '{item}': adding or deleting keys is not allowed (fixed schema)")
    try:
        node = OmegaConf.from_dotlist([item])
    except Exception as e:
        raise ConfigError(f"cannot parse {COMMAND_LINE} override '{item}': {e}") from e
    return OmegaConf.to_container(node, resolve=False)


def _build(sources: Sequence[_Source]) -> tuple[DictConfig, dict[str, str]]:
    """Merge sources onto the schema; returns the config and, per leaf key set, the source that set it last."""
    cfg = OmegaConf.structured(Config)
    provenance: dict[str, str] = {}
    missing: dict[str, str] = {}  # keys whose latest value is "???", with the source that said so
    for source, data in sources:
        # Walk first: OmegaConf's own errors name neither the file nor the closest valid key.
        _check_keys(cfg, data, "", source, provenance, missing)
        try:
            cfg.merge_with(data)  # in place: OmegaConf.merge deep-copies the whole tree per source
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            reason = str(e).splitlines()[0]
            raise ConfigError(f"bad value for '{key}' in {source}: {reason}") from e
    try:
        OmegaConf.resolve(cfg)  # `${...}` interpolations in specs become plain values here
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        where = provenance.get(key, "the schema defaults")
        raise ConfigError(f"cannot resolve '{key}' in {where}: {str(e).splitlines()[0]}") from e
    if missing:
        key, source = next(iter(missing.items()))
        raise ConfigError(f"required value '{key}' is missing: {source} leaves it '???'; set it, e.g. {key}=...")
    return cfg, provenance


def _check_keys(node: DictConfig, data: dict, prefix: str, source: str, provenance: dict, missing: dict) -> None:
    valid = set(node.keys())
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in valid:
            raise ConfigError(f"unknown key '{full}' in {source}{_did_you_mean(full)}")
        child = node._get_node(key)
        if is_section(child):
            if not isinstance(value, dict):
                keys = ", ".join(str(k) for k in child.keys())
                raise ConfigError(f"'{full}' in {source} must be a section with keys ({keys}), got {value!r}")
            _check_keys(child, value, f"{full}.", source, provenance, missing)
            continue
        if isinstance(value, dict) and not isinstance(child, DictConfig):
            raise ConfigError(f"'{full}' in {source} is a single value, not a section; got {value!r}")
        provenance[full] = source
        if value == "???":
            missing[full] = source
        else:
            missing.pop(full, None)


def _did_you_mean(full: str) -> str:
    paths = schema_paths()
    by_leaf: dict[str, list[str]] = {}
    for p in paths:
        by_leaf.setdefault(p.rsplit(".", 1)[-1], []).append(p)
    leaf = full.rsplit(".", 1)[-1]
    # A right name under the wrong section (`lr=...`, `model.lr`) is found by its last part.
    close = by_leaf.get(leaf, [])
    if not close:
        ancestors = {full.rsplit(".", n)[0] for n in range(1, full.count(".") + 1)}
        close = difflib.get_close_matches(full, [p for p in paths if p not in ancestors], n=1, cutoff=0.6)
    if not close:
        leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = by_leaf[leaves[0]] if leaves else []
    if not close:
        return "; valid keys are listed in conddetr/config/schema.py"
    return "; did you mean " + " or ".join(f"'{c}'" for c in close) + "?"

"""A detector ready for inference from a run folder, one of our run checkpoints or a released checkpoint.

Ours carry `model_kwargs`, `config`, `label_to_category` (and `category_names`); released ones an `args` namespace
(COCO names from the published convention). Every failure is a `PredictError` naming the file.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from conddetr.data.coco_names import COCO_2017_CATEGORIES

log = logging.getLogger(__name__)

PUBLISHED_VAL_SCALE, PUBLISHED_MAX_SIZE = 800, 1333  # published evaluation resize: short side 800, long side <= 1333
_DEFORMABLE_ARGS = ("num_feature_levels", "with_box_refine", "two_stage")  # Deformable DETR's own args


class PredictError(ValueError):
    """Bad input to `predict`; the message names the file (or option) at fault."""


@dataclass
class Predictor:
    model: torch.nn.Module  # eval mode, on `device`
    variant: str  # "conditional" | "detr"
    label_to_category: dict[int, int]  # model label -> dataset category id (labels without one are never reported)
    category_names: dict[int, str]  # category id -> name
    val_scale: int  # short side of the evaluation resize
    max_size: int  # long-side cap of that resize
    device: torch.device
    description: str  # what was loaded, for the log

    def label_name(self, label: int) -> str:
        category = self.label_to_category.get(int(label))
        return self.category_names.get(category, f"class {category if category is not None else label}")


def _read(path: Path) -> dict:
    from conddetr.models.published import load_checkpoint_file

    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive; very old files are a bare pickle (protocol 2 starts with 0x80).
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise PredictError(f"{path} is not a checkpoint: not a torch.save file (starts with {magic!r})")
    try:
        return load_checkpoint_file(path)
    except ValueError as err:
        raise PredictError(f"{path} is not a usable checkpoint: {err}") from None
    except Exception as err:  # torch raises several types for damaged archives
        raise PredictError(f"{path} is not a checkpoint torch can read ({type(err).__name__}: {err})") from None


def resolve_checkpoint(path: str | Path) -> tuple[dict, Path]:
    """(checkpoint dict, file) of a run folder (its latest readable checkpoint) or of a checkpoint file."""
    from conddetr.engine.checkpoint import CHECKPOINT_NAME, load_latest_checkpoint

    path = Path(path)
    if path.is_dir():
        try:
            found = load_latest_checkpoint(path)
        except RuntimeError as err:
            raise PredictError(str(err)) from None
        if found is None:
            raise PredictError(f"run folder {path} holds no {CHECKPOINT_NAME}: train it or pass a checkpoint file")
        return found[0], found[1]
    if not path.is_file():
        raise PredictError(f"checkpoint {path} does not exist")
    return _read(path), path


def _names_from_config(config: dict, path: Path) -> dict[int, str]:
    """Old run checkpoints lack `category_names`: read them from the val annotation file their config names."""
    data = config.get("data", {})
    candidates = [data.get("val_annotations")]
    if data.get("root"):
        candidates.append(str(Path(data["root"]) / "annotations" / "instances_val2017.json"))
    for file in filter(None, candidates):
        try:
            return {int(c["id"]): str(c["name"]) for c in json.loads(Path(file).read_text())["categories"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue
    log.warning("%s has no category names and its val annotations are not readable here: labels show as ids", path)
    return {}


def _ours(ckpt: dict, path: Path) -> tuple[dict, dict[int, int], dict[int, str], int, int, str]:
    kwargs = dict(ckpt["model_kwargs"])
    label_to_category = {int(k): int(v) for k, v in (ckpt.get("label_to_category") or {}).items()}
    if not label_to_category:
        raise PredictError(f"{path}: run checkpoint without 'label_to_category': cannot name its classes")
    names = ckpt.get("category_names")
    names = {int(k): str(v) for k, v in names.items()} if names else _names_from_config(ckpt["config"], path)
    data = ckpt["config"].get("data", {})
    epochs = f"{int(ckpt['epoch']) + 1} epochs" if "epoch" in ckpt else "epochs unknown"
    what = f"conddetr run checkpoint {path} ({kwargs.get('variant')}, {epochs})"
    return kwargs, label_to_category, names, int(data.get("val_scale", 800)), int(data.get("max_size", 1333)), what


def _released(ckpt: dict, path: Path) -> tuple[dict, dict[int, int], dict[int, str], int, int, str]:
    from conddetr.models.published import model_kwargs_from_args

    args = ckpt["args"]
    a = dict(vars(args)) if hasattr(args, "__dict__") else dict(args)
    other = [k for k in _DEFORMABLE_ARGS if k in a]
    if other:
        raise PredictError(f"{path} is a checkpoint of another model (args {other}: Deformable DETR), not DETR or "
                           "Conditional DETR")  # fmt: skip
    try:
        kwargs = model_kwargs_from_args(a)
    except ValueError as err:
        raise PredictError(f"{path}: {err}") from None
    if kwargs["num_classes"] == 91:  # COCO, published convention: label = category id
        label_to_category = {cid: cid for cid in COCO_2017_CATEGORIES}
        names = dict(COCO_2017_CATEGORIES)
    else:
        label_to_category, names = {k: k for k in range(kwargs["num_classes"])}, {}
    what = f"released checkpoint {path} ({kwargs['variant']}, {kwargs['backbone']})"
    return kwargs, label_to_category, names, PUBLISHED_VAL_SCALE, PUBLISHED_MAX_SIZE, what


def load_predictor(path: str | Path, *, device: torch.device, max_size: int | None = None) -> Predictor:
    """Build and load the detector a checkpoint (or run folder) describes, in eval mode on `device`."""
    from conddetr.models import build_model
    from conddetr.models.published import load_published_state_dict

    ckpt, file = resolve_checkpoint(path)
    if not isinstance(ckpt.get("model"), dict):
        keys = ", ".join(sorted(map(str, ckpt))[:8])
        raise PredictError(f"{file} is not a detector checkpoint: no 'model' state dict (top-level keys: {keys})")
    if "model_kwargs" in ckpt and "config" in ckpt:
        kwargs, label_to_category, names, val_scale, cap, what = _ours(ckpt, file)
    elif "args" in ckpt:
        kwargs, label_to_category, names, val_scale, cap, what = _released(ckpt, file)
    else:
        raise PredictError(
            f"{file} holds weights but neither 'args' (a released DETR / Conditional DETR checkpoint) nor "
            "'model_kwargs' (a conddetr run checkpoint): cannot tell which model they belong to"
        )
    try:
        model = build_model(**kwargs)
        load_published_state_dict(model, ckpt)
    except (ValueError, TypeError) as err:
        raise PredictError(f"{file} does not hold the model its settings describe ({what}):\n{err}") from None
    model.to(device).eval()
    return Predictor(model, kwargs["variant"], label_to_category, names, val_scale, max_size or cap, device, what)

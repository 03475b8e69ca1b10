"""Released DETR / Conditional DETR checkpoints: safe loading, strict key checks with diagnoses, export.

Checkpoints are `{"model": state_dict, ...}` (training ones also hold optimizer, lr_scheduler, epoch and an
`argparse.Namespace` `args`); they load with `weights_only=True`, only `argparse.Namespace` allow-listed.
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn


def load_checkpoint_file(path: str | Path) -> dict:
    """torch.load(path, weights_only=True) with argparse.Namespace allowed; never unpickles arbitrary code."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refused by the safe (weights_only) loader, it holds objects other than "
            f"tensors, plain containers and argparse.Namespace: {err}"
        ) from err
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    return ckpt


def published_to_ours(key: str) -> str:
    """Map a published state-dict key to our module name. Identity: our modules use the published names.

    Kept as the single place to change if a module is ever renamed; a DDP `module.` prefix is dropped.
    """
    return key.removeprefix("module.")


def ours_to_published(key: str) -> str:
    """Inverse of `published_to_ours` (identity)."""
    return key


def _extract_state_dict(state_dict_or_path) -> tuple[dict, str]:
    """-> (state dict, name of its source for error messages)."""
    if isinstance(state_dict_or_path, (str, Path)):
        ckpt, source = load_checkpoint_file(state_dict_or_path), str(state_dict_or_path)
    else:
        ckpt, source = state_dict_or_path, "state dict"
    sd = ckpt["model"] if isinstance(ckpt.get("model"), dict) else ckpt
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: not a state dict (or {{'model': state_dict}}); non-tensor entries {bad[:5]}")
    return sd, source


def _layer_count(keys, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def diagnose_mismatch(ckpt: dict, ours: dict) -> list[str]:
    """Likely causes of a key/shape mismatch between a checkpoint state dict and our model's."""
    causes = []
    ck_cond = any(".sa_qcontent_proj." in k for k in ckpt)
    our_cond = any(".sa_qcontent_proj." in k for k in ours)
    ck_detr = any(".multihead_attn." in k for k in ckpt)
    if ck_detr and our_cond:
        causes.append(
            "a DETR checkpoint (multihead_attn keys) loaded into a Conditional DETR model: use variant='detr'"
        )
    if ck_cond and not our_cond:
        causes.append(
            "a Conditional DETR checkpoint (sa_qcontent_proj keys) loaded into a DETR model: use variant='conditional'"
        )
    for name in ("class_embed.weight", "query_embed.weight", "input_proj.weight"):
        if name in ckpt and name in ours and ckpt[name].shape != ours[name].shape:
            a, b = tuple(ckpt[name].shape), tuple(ours[name].shape)
            if name == "class_embed.weight":
                causes.append(
                    f"wrong class count: checkpoint has {a[0]} logits, model {b[0]} (class_embed {a} vs {b}; "
                    "DETR has num_classes + 1 logits)"
                )
            elif name == "query_embed.weight":
                causes.append(f"wrong num_queries or hidden_dim: query_embed {a} vs {b}")
            else:
                causes.append(
                    f"wrong backbone channels or hidden_dim: input_proj {a} vs {b} "
                    "(resnet18/34 give 512 channels, resnet50/101 2048)"
                )
    for stage in (1, 2, 3, 4):
        pat = rf"backbone\.0\.body\.layer{stage}\.(\d+)\."
        n_ck, n_our = _layer_count(ckpt, pat), _layer_count(ours, pat)
        if n_ck != n_our:
            causes.append(
                f"wrong backbone: layer{stage} has {n_ck} blocks in the checkpoint, {n_our} in the model "
                "(resnet18: 2, resnet34/50: 3/4/6/3, resnet101: 3/4/23/3)"
            )
            break
    if any(k.endswith(".conv3.weight") for k in ckpt) != any(k.endswith(".conv3.weight") for k in ours):
        causes.append("wrong backbone family: bottleneck (resnet50/101) vs basic blocks (resnet18/34)")
    for part in ("encoder", "decoder"):
        pat = rf"transformer\.{part}\.layers\.(\d+)\."
        n_ck, n_our = _layer_count(ckpt, pat), _layer_count(ours, pat)
        if n_ck != n_our:
            causes.append(f"wrong {part[:3]}_layers: checkpoint has {n_ck}, model {n_our}")
    if any(k.startswith("backbone.1.") for k in ckpt) != any(k.startswith("backbone.1.") for k in ours):
        causes.append("position_embedding differs: 'learned' has backbone.1.row_embed/col_embed, 'sine' has none")
    return causes


def load_published_state_dict(model: nn.Module, state_dict_or_path, strict: bool = True) -> dict:
    """Load a released checkpoint (path, `{"model": sd, ...}` dict or bare state dict) into `model`.

    strict=True: keys and shapes must match exactly, else a ValueError lists the first mismatches and the
    likely cause (backbone, class count, DETR vs Conditional, num_queries, layer counts).
    strict=False: loads every key present in both with equal shapes (e.g. fine-tuning with another class count)
    and returns {"missing": [...], "unexpected": [...], "mismatched": [...]}.
    """
    sd, source = _extract_state_dict(state_dict_or_path)
    mapped = OrderedDict((published_to_ours(k), v) for k, v in sd.items())
    ours = model.state_dict()
    missing = [k for k in ours if k not in mapped]
    unexpected = [k for k in mapped if k not in ours]
    mismatched = [k for k in ours if k in mapped and mapped[k].shape != ours[k].shape]
    report = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    if strict and (missing or unexpected or mismatched):
        lines = [
            f"{source} does not match the model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(mismatched)} shape-mismatched keys)."
        ]
        lines += [f"likely cause: {c}" for c in diagnose_mismatch(mapped, ours)]
        lines += [
            f"shape mismatch: {k} checkpoint {tuple(mapped[k].shape)} vs model {tuple(ours[k].shape)}"
            for k in mismatched[:5]
        ]
        lines += [f"missing: {k}" for k in missing[:5]] + [f"unexpected: {k}" for k in unexpected[:5]]
        raise ValueError("\n".join(lines))
    loadable = {k: v for k, v in mapped.items() if k in ours and k not in mismatched}
    model.load_state_dict(loadable, strict=strict)
    return report


def export_published_state_dict(model: nn.Module) -> OrderedDict:
    """Our state dict under the published key names (what a released checkpoint's "model" holds)."""
    return OrderedDict((ours_to_published(k), v.detach().clone()) for k, v in model.state_dict().items())


_PUBLISHED_MODEL_ARGS = (
    "backbone",
    "dilation",
    "hidden_dim",
    "nheads",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "num_queries",
    "dropout",
    "position_embedding",
    "aux_loss",
    "lr_backbone",
)
# Published main.py derives the class count from the dataset name instead of storing it.
_PUBLISHED_NUM_CLASSES = {"coco": 91, "coco_panoptic": 250}


def model_kwargs_from_args(args, variant: str | None = None) -> dict:
    """`build_model` kwargs (variant included) from a published `args` Namespace or dict.

    variant: given, or inferred ("conditional" when args has focal_alpha, published Conditional DETR only).
    num_classes: args.num_classes if present, else the published dataset default (coco: 91).
    """
    a = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    if a.get("masks"):
        raise ValueError("args.masks=True: segmentation models are not supported")
    if a.get("pre_norm"):
        raise ValueError("args.pre_norm=True: only the published post-norm transformer is implemented")
    kwargs = {k: a[k] for k in _PUBLISHED_MODEL_ARGS if k in a}
    if kwargs.get("position_embedding") in ("v2", "v3"):
        kwargs["position_embedding"] = {"v2": "sine", "v3": "learned"}[kwargs["position_embedding"]]
    if a.get("num_classes") is not None:
        kwargs["num_classes"] = int(a["num_classes"])
    elif a.get("dataset_file") in _PUBLISHED_NUM_CLASSES:
        kwargs["num_classes"] = _PUBLISHED_NUM_CLASSES[a["dataset_file"]]
    else:
        raise ValueError(f"args has no num_classes and dataset_file {a.get('dataset_file')!r} has no published default")
    kwargs["variant"] = variant or ("conditional" if "focal_alpha" in a else "detr")
    return kwargs

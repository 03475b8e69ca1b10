# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Cross-attention bands (the paper's Figure 1)
#
# Conditional DETR's spatial query lets each decoder cross-attention head attend to a band around one extremity of
# the object (left, right, top, bottom edge) or a region inside its box. For one query (the most confident) and one
# decoder layer, this notebook plots every head's spatial, content and combined attention over a synthetic val
# image, and scores how much of the in-box spatial attention lies on the box edges ("band" score, 1 = all of it).
#
# Run it with `.venv/bin/python analysis/attention_bands.py`, or convert it with
# `.venv/bin/jupytext --to ipynb analysis/attention_bands.py` and open it in Jupyter.

# %%
import os
import sys
from pathlib import Path

import torch

import conddetr
from conddetr.analysis import bands
from conddetr.config import config_from_dict, load_config
from conddetr.data import build_datasets, collate
from conddetr.engine.setup import model_kwargs_from_config
from conddetr.models import build_model
from conddetr.models.published import load_checkpoint_file, load_published_state_dict, model_kwargs_from_args

# %% tags=["parameters"]
checkpoint = "runs/demo_synthetic/checkpoint.pth"  # a run's checkpoint (or a released one); random init if absent
spec = "experiments/demo_synthetic.yaml"  # model and data settings used when the checkpoint carries no config
overrides = []  # key=value overrides of the config, e.g. "data.val_scale=256" for a finer attention grid
output_dir = "runs/analysis"  # PNGs go here (runs/ is git-ignored)
image_index = 0  # which synthetic val image
layer = -1  # decoder layer (negative counts from the last)
query = None  # None: the highest-scoring query
seed = 0  # initialisation seed of the random model

# %%
# Relative paths (here and inside the configs: run folders, the synthetic data cache) mean the same as for
# launch.py run from the repository root, wherever this notebook is executed from.
os.chdir(Path(conddetr.__file__).resolve().parents[1])
out = Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
cfg = load_config(spec, list(overrides))
ckpt_path = Path(checkpoint)
if ckpt_path.is_file():
    ckpt = load_checkpoint_file(ckpt_path)  # weights_only: plain data (argparse.Namespace allowed)
    if "model_kwargs" in ckpt:  # a conddetr run: its own model and synthetic data
        kwargs = dict(ckpt["model_kwargs"])
        cfg = config_from_dict(ckpt["config"], list(overrides), source=f"{ckpt_path} 'config'")
    elif "args" in ckpt:  # a released checkpoint: model from its args, image from `spec`'s data
        kwargs = model_kwargs_from_args(ckpt["args"])
    else:
        raise KeyError(f"{ckpt_path}: neither 'model_kwargs' (a conddetr run) nor 'args' (a released checkpoint)")
    _, val_ds, info = build_datasets(cfg.data)
    model = build_model(**kwargs)
    load_published_state_dict(model, ckpt)
    print(f"loaded {ckpt_path} ({ckpt['epoch'] + 1 if 'epoch' in ckpt else '?'} epochs trained)")
else:
    print(
        f"WARNING: no checkpoint at {ckpt_path}; using a randomly initialised model. Its attention maps show the "
        "mechanics only: the bands appear after training (e.g. `make demo`, then rerun this notebook)."
    )
    _, val_ds, info = build_datasets(cfg.data, num_classes=cfg.model.num_classes)
    torch.manual_seed(seed)
    num_classes = cfg.model.num_classes if cfg.model.num_classes is not None else info.num_classes
    kwargs = {"variant": cfg.model.variant, **model_kwargs_from_config(cfg, num_classes)}
    model = build_model(**kwargs)

# %%
images, mask, targets = collate([val_ds[image_index]])
qa = bands.query_attention(model, images, mask, kwargs["variant"], layer=layer, query=query)
print(f"query {qa.query} (score {qa.score:.3f}) at decoder layer {qa.layer}, predicted box (cxcywh) {qa.box.tolist()}")
for head in range(len(qa.stats["band_score"])):
    sides = {s: round(float(qa.stats[s][head]), 2) for s in bands.SIDES}
    score, flat = qa.stats["band_score"][head], qa.stats["edge_share_flat"][head]
    print(f"head {head}: band score {score:.2f} (a flat map: {flat:.2f}), edge mass {sides}")

# %%
fig = bands.plot_bands(images[0], qa)
fig.savefig(out / "attention_bands.png", dpi=120)
if "ipykernel" in sys.modules:  # inline in Jupyter; plain `python` only writes the file
    from IPython.display import Image, display

    display(Image(filename=out / "attention_bands.png"))
print("figure written to", out / "attention_bands.png")

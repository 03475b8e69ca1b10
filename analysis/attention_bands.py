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

import conddetr
from conddetr.analysis import bands
from conddetr.data import collate

# %% tags=["parameters"]
checkpoint = "runs/demo_synthetic/checkpoint.pth"  # a run's checkpoint (or a released one); random init if absent
spec = "experiments/demo_synthetic.yaml"  # model and data settings used when the checkpoint carries no config
overrides = []  # key=value overrides of the config, e.g. "data.val_scale=256" for a finer attention grid
output_dir = "runs/analysis"  # PNGs go here (runs/ is git-ignored)
image_index = 0  # which synthetic val image
layer = -1  # decoder layer (negative counts from the last)
query = None  # None: the highest-scoring query
seed = 0  # initialisation seed of the random model
compare_checkpoint = "runs/demo_synthetic_detr/checkpoint.pth"  # scored the same way (None: skip)
summary_images = 16  # val images whose most confident query is scored

# %%
# Relative paths (here and inside the configs: run folders, the synthetic data cache) mean the same as for
# launch.py run from the repository root, wherever this notebook is executed from.
os.chdir(Path(conddetr.__file__).resolve().parents[1])
out = Path(output_dir)
out.mkdir(parents=True, exist_ok=True)
model, val_ds, variant, description = bands.load_model_and_val_data(checkpoint, spec, overrides, seed)
if description == "randomly initialised":
    print(
        f"WARNING: no checkpoint at {checkpoint}; using a randomly initialised model. Its attention maps show the "
        "mechanics only: the bands appear after training (e.g. `make demo`, then rerun this notebook)."
    )
else:
    print(description)

# %%
images, mask, targets = collate([val_ds[image_index]])
qa = bands.query_attention(model, images, mask, variant, layer=layer, query=query)
print(f"query {qa.query} (score {qa.score:.3f}) at decoder layer {qa.layer}, predicted box (cxcywh) {qa.box.tolist()}")
for head in range(len(qa.stats["band_score"])):
    contrast = {s: round(float(qa.stats[f"contrast_{s}"][head]), 2) for s in bands.SIDES}
    side = max(contrast, key=contrast.get)
    print(f"head {head}: band score {qa.stats['band_score'][head]:.2f} on the {side} side (a flat map: 1.00), "
          f"per side {contrast}")  # fmt: skip

# %%
fig = bands.plot_bands(images[0], qa)
fig.savefig(out / "attention_bands.png", dpi=120)
if "ipykernel" in sys.modules:  # inline in Jupyter; plain `python` only writes the file
    from IPython.display import Image, display

    display(Image(filename=out / "attention_bands.png"))
print("figure written to", out / "attention_bands.png")

# %% [markdown]
# ## Band scores over many images, against a flat map and against another model
# One image can mislead: the score of every head for the most confident query of the first `summary_images` val
# images, summarised by its median. A flat map scores 1.00; `compare_checkpoint` (e.g. the DETR run) is scored the
# same way, so the two models' spatial attention can be compared head for head.

# %%
for name, path in (("this model", checkpoint), ("compared model", compare_checkpoint)):
    if path is None or not Path(path).is_file():
        print(f"{name}: no checkpoint at {path}, skipped")
        continue
    report = bands.attention_report(path, images=summary_images, layer=layer, spec=spec, overrides=overrides)
    print(f"{name} ({report.variant}, {path}): {report.summary}")

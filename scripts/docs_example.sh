#!/usr/bin/env bash
# Regenerates docs/predictions_example.png: `python -m conddetr predict` on a trained synthetic run's val images.
# Usage: scripts/docs_example.sh [RUN_DIR] [IMAGE_NAME] [THRESHOLD]
#   defaults: runs/demo_synthetic (train it with `make demo`), 000022 (a val image), 0.3: what made the committed one.
# All drawn val images stay in runs/docs_example/ to choose from; PY (default .venv/bin/python) runs Python.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/demo_synthetic}
NAME=${2:-000022}
THRESHOLD=${3:-0.3}
PY=${PY:-.venv/bin/python}
OUT=runs/docs_example
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's package, whatever the venv points at

# The run's own val split, as its config.yaml names it: annotation file and image folder.
read -r ANNOTATIONS IMAGES < <("$PY" - "$RUN" <<'PYTHON'
import sys

from conddetr.config import load_config
from conddetr.data import build_datasets

_, val, _ = build_datasets(load_config(f"{sys.argv[1]}/config.yaml").data)
print(val.annotation_file, val.images_dir)
PYTHON
)
"$PY" -m conddetr predict "$RUN" "$ANNOTATIONS" "$IMAGES" --out "$OUT" --threshold "$THRESHOLD"
cp "$OUT/$NAME.png" docs/predictions_example.png
echo "docs/predictions_example.png <- $OUT/$NAME.png ($RUN, threshold $THRESHOLD)"

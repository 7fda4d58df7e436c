#!/usr/bin/env bash
# The export issue's ResNet50@224 acceptance: no ImageNet weights offline, so every BatchNorm layer
# is recalibrated on real photos (CIFAR-10 upscaled) first; every mode converts and runs; the
# int8_full cascade's per-stage profile and its cost run to the final exit against the plain model.
# Usage: bench/acceptance_resnet50.sh [WORKDIR]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/ee-acceptance-resnet50}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" EE_THREADS="${EE_THREADS:-2}"
ee="$repo/.venv/bin/ee"
python="$repo/.venv/bin/python"
mkdir -p "$work" && cd "$work"
[ -d photos ] || "$python" - <<'PY'
from pathlib import Path
from PIL import Image
from datasets import cifar10
data = cifar10.load()
for folder, images in (("photos", data["x_train"][:300]), ("check", data["x_test"][:100])):
    Path(folder).mkdir(exist_ok=True)
    for index, image in enumerate(images):
        Image.fromarray(image).save(f"{folder}/{index:04d}.png")
PY
"$ee" attach --backbone resnet50 --weights none --input-size 224 --exits 0.25,0.5,0.75 --out r50 --exist-ok --json > attach.json
"$ee" personalise --bundle r50 --data photos --adapt-bn 53 --exit-target 0 --epochs 3 --views 1 --holdout 0.1 --out r50-recalibrated --exist-ok --quiet --json > personalise.json
for quant in none fp16 dynamic int8 int8_full; do
  "$ee" export --tflite --bundle r50-recalibrated --quant "$quant" --calibration photos --calibration-photos 100 --validate check --validation-photos 100 --max-accuracy-drop 100 --out "r50-$quant" --exist-ok --quiet --json > "export-$quant.json"
done
"$ee" run --export r50-int8_full --data check --limit 30 --threads 1 --json > run-int8_full.json
echo "done: results in $work"

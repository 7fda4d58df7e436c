#!/usr/bin/env bash
# The evaluate and export issues' acceptance on the personalise issue's CIFAR-10 user (seed 0):
# 3 classes, colour cast, 1,500 unlabelled photos, 1,000 more held out for label-free calibration,
# all 3,000 test photos. Usage: bench/acceptance_cifar.sh [WORKDIR] (needs models/train_cifar.py's model).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/ee-acceptance-cifar}"
generic="${EE_GENERIC:-$HOME/.cache/ee/models/cifar_resnet9.h5}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" EE_THREADS="${EE_THREADS:-2}"
ee="$repo/.venv/bin/ee"
python="$repo/.venv/bin/python"
mkdir -p "$work" && cd "$work"
[ -d user ] || "$python" -m datasets.scenarios --seed 0 --k 3 --condition colour_cast --unlabelled 1500 --held-out 1000 --out user
classes=airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck
"$ee" attach --backbone "$generic" --classes "$classes" --exits 0.2,0.4,0.8 --out attached --exist-ok --json > attach.json
"$ee" personalise --bundle attached --data user/unlabelled --out personal --exist-ok --quiet --json > personalise.json
for point in match-generic keep; do
  "$ee" evaluate --bundle personal --data user/test --use "$point" --out "calibrated-$point" --exist-ok --quiet --json > "evaluate-$point.json"
done
"$ee" evaluate --bundle personal --data user/test --unlabelled user/heldout --use label-free --out calibrated-label-free --exist-ok --quiet --json > evaluate-label-free.json
for quant in none fp16 dynamic int8 int8_full; do
  "$ee" export --tflite --bundle calibrated-match-generic --quant "$quant" --validate user/test --validation-photos 3000 --out "export-$quant" --exist-ok --quiet --json > "export-$quant.json"
done
for quant in none int8_full; do
  "$ee" run --export "export-$quant" --data user/test --threads 1 --json > "run-match-generic-$quant.json"
  "$ee" export --tflite --bundle calibrated-keep --quant "$quant" --validate user/test --validation-photos 3000 --out "export-keep-$quant" --exist-ok --quiet --json > "export-keep-$quant.json"
  "$ee" run --export "export-keep-$quant" --data user/test --threads 1 --json > "run-keep-$quant.json"
done
echo "done: results in $work"

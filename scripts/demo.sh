#!/usr/bin/env bash
# `make demo`: the whole idea on real photos, offline. The shipped generic model (Fashion-MNIST,
# grey) meets a demo user whose photos carry a colour cast: graft exits, personalise on the user's
# unlabelled photos, evaluate on their labelled test photos, export int8 TFLite, run the cascade.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
ee="$repo/.venv/bin/ee"
work="${EE_DEMO_DIR:-$repo/build/demo}"
rm -rf "$work" && mkdir -p "$work" && cd "$work"
export EE_THREADS="${EE_THREADS:-2}"
demo="$repo/datasets/demo"
set -x
"$ee" attach --backbone "$repo/models/fashion_resnet9.h5" --classes "$repo/models/fashion_classes.txt" --exits 0.2,0.4,0.8 --out bundles/generic
"$ee" personalise --data "$demo/unlabelled"
"$ee" evaluate --data "$demo/test" --use keep --json > evaluate.json
# 300 test photos: one photo is 0.33 points, so the int8 bound is 3 points (1 point is the default).
"$ee" export --tflite --quant int8_full --validate "$demo/test" --max-accuracy-drop 3 --out exports/int8_full
"$ee" run --export exports/int8_full --data "$demo/test" --json > run-int8.json
# Float32 too: at 32x32 on a CPU, int8's full-resolution first layers take most of its latency,
# so the cascade's saving shows in float and the table states both.
"$ee" export --tflite --quant none --validate "$demo/test" --out exports/float32
"$ee" run --export exports/float32 --data "$demo/test" --json > run-float32.json
set +x
"$repo/.venv/bin/python" "$repo/scripts/demo_summary.py" evaluate.json run-float32.json run-int8.json

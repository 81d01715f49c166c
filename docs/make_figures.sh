#!/usr/bin/env bash
# Regenerates the README's figures in docs/figures/ from the two offline demos and the benchmark
# results: weight distributions, the cost/accuracy chart and screenshots of the retrieval and
# question-answering case pages. Needs the package with its examples extras and, for the
# screenshots, a headless Chromium (Debian: apt-get install chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=$(mktemp -d)
out=docs/figures
mkdir -p "$out"

python examples/retrieval.py --output-dir "$runs/retrieval" --cases 6
python examples/vqa.py --output-dir "$runs/vqa"

python -m peft_cp.blip.plot weights --base "$runs/retrieval/base_model" \
    --adapter "$runs/retrieval/best_adapter" --out "$runs/weights"
cp "$runs/weights/weights_vision.png" "$runs/weights/relative_update.png" "$out/"

python -m peft_cp.blip.plot chart "$runs/retrieval/results.json" "$runs"/vqa/*/results.json \
    --benchmark benchmarks/results/results.json --out "$out/cost_accuracy.png"

screenshot() {
    chromium --headless --no-sandbox --disable-gpu --no-first-run --disable-sync \
        --disable-background-networking --disable-component-update --hide-scrollbars \
        --window-size=1100,900 --screenshot="$2" "file://$1"
}
screenshot "$runs/retrieval/cases.html" "$out/retrieval_cases.png"
screenshot "$runs/vqa/msrvtt_qa/cases.html" "$out/qa_cases.png"
echo "figures in $out; runs in $runs"

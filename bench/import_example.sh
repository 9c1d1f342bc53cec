#!/usr/bin/env bash
# The import's loss report on a real example (issue 21), on the toy base, about 2 minutes on 2 cores:
# a plain LoRA of the astronaut photo trained alone and exported as a kohya file, then imported at
# rank 2 into a bank that already holds <chelsea> and <coffee>.   bash bench/import_example.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
D=${1:-out/import_example}
rm -rf "$D"; mkdir -p "$D"
PY=${PY:-.venv/bin/python}
"$PY" -c "from pathlib import Path; from seqlora_core.app.demo import write_photos; write_photos(Path('$D/photos'))"
T=(--base toy --steps 30 --bilevel-iters 3 --lr-a 2e-3 --lr-b 2e-3 --lr-embedding 1e-2)
"$PY" -m seqlora_core train --bank "$D/alone.safetensors" --images "$D/photos/astronaut" --token "<astronaut>" \
    --init-word person --method lora "${T[@]}" 2>/dev/null
"$PY" -m seqlora_core export "$D/alone.safetensors" --out "$D/astronaut_lora.safetensors"
"$PY" -m seqlora_core train --bank "$D/bank.safetensors" --images "$D/photos/chelsea" --token "<chelsea>" --init-word cat "${T[@]}" 2>/dev/null
"$PY" -m seqlora_core train --bank "$D/bank.safetensors" --images "$D/photos/coffee" --token "<coffee>" --init-word cup "${T[@]}" 2>/dev/null
"$PY" -m seqlora_core bank import "$D/bank.safetensors" "$D/astronaut_lora.safetensors" --token "<astro>" --trigger person \
    --base toy --rank 2 --layers --embedding "$D/astronaut_lora_embeddings/astronaut.safetensors"

"""Write a local Hugging Face cache entry for ``openai/clip-vit-large-patch14`` (no weights).

Why: A1111 builds SD-1.5's text encoder with ``CLIPTextModel.from_pretrained`` and
``CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")``; it skips the weights (they come
from the checkpoint) but still needs the config and tokenizer files. Offline, this cache entry
serves them: the config from the SD-1.5 text-encoder config SeqLoRA ships, the tokenizer from the
CLIP BPE data it ships. Run A1111 with HF_HOME=<home> HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1.

    python tests/integration/hf_clip_cache.py HF_HOME
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPO = "openai/clip-vit-large-patch14"
REVISION = "0" * 40  # any 40-hex name; refs/main points at it

VISION = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
          "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
          "hidden_act": "quick_gelu", "projection_dim": 768, "layer_norm_eps": 1e-05}
SPECIAL = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
           "pad_token": "<|endoftext|>"}


def write_cache(hf_home: str | Path) -> Path:
    """Write the entry under ``hf_home/hub``; returns the snapshot folder."""
    sys.path.insert(0, str(ROOT))
    from seqlora_core.hosts.tokenizer_data import tokenizer_files

    hub = Path(hf_home) / "hub"
    entry = hub / f"models--{REPO.replace('/', '--')}"
    snapshot = entry / "snapshots" / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(REVISION)
    (hub / "version.txt").write_text("1")
    text = json.loads((ROOT / "seqlora_core/hosts/configs/sd15/text_encoder/config.json").read_text())
    text.pop("architectures", None)
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
              "logit_scale_init_value": 2.6592, "text_config": text, "vision_config": VISION}
    (snapshot / "config.json").write_text(json.dumps(config, indent=1))
    vocab, merges = tokenizer_files()
    shutil.copyfile(vocab, snapshot / "vocab.json")
    shutil.copyfile(merges, snapshot / "merges.txt")
    (snapshot / "special_tokens_map.json").write_text(json.dumps(SPECIAL))
    (snapshot / "tokenizer_config.json").write_text(json.dumps(
        {**SPECIAL, "model_max_length": 77, "do_lower_case": True, "errors": "replace",
         "add_prefix_space": False, "tokenizer_class": "CLIPTokenizer"}))
    return snapshot


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(write_cache(sys.argv[1]))

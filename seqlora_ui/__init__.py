"""The SeqLoRA tab (gradio): one UI for the standalone app and for A1111, over the core.

Kept outside ``seqlora_core`` so that the core never imports gradio."""

"""SeqLoRA core: continual multi-concept LoRA with exactly orthogonal, learned bases.

Host-agnostic (torch, safetensors, numpy; diffusers/transformers only in the standalone host).
Never imports ComfyUI, A1111 or gradio.
"""
__version__ = "0.1.0"

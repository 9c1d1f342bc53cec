"""A1111 install hook. Inside A1111 SeqLoRA needs only what A1111 already has (torch, numpy,
safetensors, Pillow, gradio); this installs safetensors if it is somehow missing and never
touches torch, gradio or transformers (A1111 pins its own versions)."""
import launch

for package in ("safetensors",):
    if not launch.is_installed(package):
        launch.run_pip(f"install {package}", f"{package} for SeqLoRA")

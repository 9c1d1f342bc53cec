"""The method (DESIGN §3): null-space projector, LoRA hooks, the bilevel step and the training loop.

Read in this order: ``projector`` (it lives in ``seqlora_core.linalg.projector``, below both this
package and ``bank/``) → ``lora`` → ``bilevel`` → ``trainer``; ``targets`` chooses the adapted layers."""

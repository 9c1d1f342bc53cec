"""The canonical ↔ CompVis mapping covers exactly the diffusers SD-1.5 attention layers."""

from seqlora_core.hosts.naming import text_canonical, unet_canonical_to_compvis, unet_compvis_to_canonical


def test_every_tiny_unet_attention_layer_maps_and_round_trips(host):
    names = [n for n in host.linear_layers() if n.startswith("unet.") and ".attentions." in n]
    assert len(names) > 100
    compvis = {unet_canonical_to_compvis(n) for n in names}
    assert len(compvis) == len(names)  # injective
    for n in names:
        assert unet_compvis_to_canonical(unet_canonical_to_compvis(n)) == n


def test_known_pairs():
    assert unet_canonical_to_compvis("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k") == \
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    assert unet_canonical_to_compvis("unet.down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0") == \
        "input_blocks.8.1.transformer_blocks.0.attn1.to_out.0"
    assert unet_canonical_to_compvis("unet.mid_block.attentions.0.proj_in") == "middle_block.1.proj_in"
    assert unet_canonical_to_compvis("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v") == \
        "output_blocks.3.1.transformer_blocks.0.attn2.to_v"
    assert unet_canonical_to_compvis("unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2") == \
        "output_blocks.11.1.transformer_blocks.0.ff.net.2"
    assert unet_compvis_to_canonical("input_blocks.0.0.weight") is None
    assert text_canonical("clip_l.transformer.text_model.encoder.layers.3.self_attn.q_proj") == \
        "text_encoder.text_model.encoder.layers.3.self_attn.q_proj"

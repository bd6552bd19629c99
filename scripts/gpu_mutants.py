"""Device-only mutants, checked on a CUDA machine (`python scripts/gpu_mutants.py`).

Mutants that build a tensor on the CPU instead of the data's device behave identically on a
CPU, so the CPU mutation run (`scripts/mutation.py`) cannot kill them. Here each one is written
into its module in turn (the same edit mutmut 3.8.1 makes; names as mutmut gives them) and the
CUDA tests of the step and kernels run: every mutant must make them fail. Prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (module, mutmut's name, code, mutated code)
MUTANTS = [
    ("sae.sparse", "x__concept_sorted__mutmut_11", "dtype=torch.long, device=cols.device)",
     "dtype=torch.long, device=None)"),
    ("sae.sparse", "x__concept_sorted__mutmut_14", "dtype=torch.long, device=cols.device)",
     "dtype=torch.long, )"),
    ("sae.sparse", "xǁConceptOrderǁweight_grad__mutmut_5", "arange(idx.shape[0], device=idx.device)",
     "arange(idx.shape[0], device=None)"),
    ("sae.sparse", "xǁConceptOrderǁweight_grad__mutmut_7", "arange(idx.shape[0], device=idx.device)",
     "arange(idx.shape[0], )"),
    ("sae.step", "x_fired_mask__mutmut_14", "dtype=torch.bool, device=indices_nk.device)",
     "dtype=torch.bool, device=None)"),
    ("sae.step", "x_fired_mask__mutmut_17", "dtype=torch.bool, device=indices_nk.device)",
     "dtype=torch.bool, )"),
    ("analysis.evaluate", "x__stream__mutmut_18", "device = sae.device_of()", "device = None"),
    ("analysis.evaluate", "x__stream__mutmut_43", ".reshape(-1, store.dims[j]).to(device)",
     ".reshape(-1, store.dims[j]).to(None)"),
]
TESTS = ["tests/sae/test_sparse.py", "tests/sae/test_step.py",
         "tests/analysis/test_evaluate.py", "-k", "cuda"]


def _pytest(extra: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *extra, *TESTS], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def main() -> int:
    """Run the CUDA tests unmutated (they must pass), then under each mutant."""
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs a CUDA device"}))
        return 2
    clean = _pytest([])
    result = {"device": torch.cuda.get_device_name(), "clean_passes": clean.returncode == 0,
              "clean_tail": clean.stdout.strip().splitlines()[-1:], "killed": [], "survived": []}
    for module, name, code, mutated in MUTANTS:
        path = ROOT / "src" / "usae" / (module.replace(".", "/") + ".py")
        original = path.read_text()
        assert original.count(code) == 1, (name, code)
        try:
            path.write_text(original.replace(code, mutated))
            failed = _pytest(["-x"]).returncode != 0
        finally:
            path.write_text(original)
        result["killed" if failed else "survived"].append(f"usae.{module}.{name}")
    print(json.dumps(result))
    return 0 if result["clean_passes"] and not result["survived"] else 1


if __name__ == "__main__":
    sys.exit(main())

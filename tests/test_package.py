"""The package itself: `import usae` is cheap, its lazy names resolve to the real objects,
and `python -m usae` is the CLI."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import usae


@pytest.mark.parametrize("name, module", [
    ("UniversalSAE", "usae.sae.model"), ("SAEConfig", "usae.config"),
    ("TrainConfig", "usae.config"), ("Trainer", "usae.sae.trainer"),
    ("ArraySource", "usae.data.sources"), ("UsaeError", "usae.errors"),
])
def test_each_lazy_name_is_the_modules_own_object(name, module):
    assert getattr(usae, name) is getattr(importlib.import_module(module), name)


def test_the_version_is_the_projects():
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    assert usae.__version__ == tomllib.loads(pyproject.read_text())["project"]["version"]


def test_all_lists_the_lazy_names_sorted():
    assert usae.__all__ == ["ArraySource", "SAEConfig", "TrainConfig", "Trainer",
                            "UniversalSAE", "UsaeError"]


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError) as info:
        usae.Encoder  # noqa: B018 - the access is the test
    assert str(info.value) == "module 'usae' has no attribute 'Encoder'"
    assert not hasattr(usae, "trainer_config")


def test_import_usae_imports_no_torch_and_python_m_usae_is_the_cli():
    code = "import sys, usae; print('torch' in sys.modules, usae.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out[0] == "False" and out[1] == usae.__version__
    help_text = subprocess.run([sys.executable, "-m", "usae", "--help"], capture_output=True,
                               text=True, check=True, timeout=120).stdout
    assert help_text.startswith("usage: usae ") and "train" in help_text

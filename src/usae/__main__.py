"""``python -m usae`` (and ``torchrun ... -m usae``): the same CLI as ``usae``."""

from usae.cli import entry

entry()

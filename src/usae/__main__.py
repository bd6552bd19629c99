"""``python -m usae`` (and ``torchrun ... -m usae``): the same CLI as ``usae``."""

import sys

from usae.cli import main

sys.exit(main())

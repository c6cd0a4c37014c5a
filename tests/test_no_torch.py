"""`import autoround_jax` must never import torch (torch is a test oracle only)."""

import subprocess
import sys


def test_import_does_not_import_torch():
    code = "import sys, autoround_jax, autoround_jax.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)

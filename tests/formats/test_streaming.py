"""Streaming export (low_cpu_mem_usage): each block written as soon as it is done, byte-identical to a write at the
end, with peak host memory below the size of the model's weights."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys

import numpy as np
import pytest

from autoround_jax.tuning.autoround import AutoRound
from tests.random_checkpoint import write_random_qwen3
from tests.tiny_models import build_model, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_model(build_model("qwen3_tune", num_layers=3), str(tmp_path_factory.mktemp("s") / "m"))


@pytest.mark.parametrize("kw, fmt", [
    (dict(iters=3), "auto_round"),
    (dict(iters=0, disable_opt_rtn=True, sym=False), "auto_round"),
    (dict(iters=0, disable_opt_rtn=False), "auto_gptq"),
])
def test_streamed_export_equals_write_at_the_end(tiny, tmp_path, kw, fmt):
    ids = np.random.default_rng(0).integers(3, 300, (8, 24)).astype(np.int32)
    common = dict(nsamples=8, seqlen=24, batch_size=4, dataset=ids, progress=False, **kw)
    at_end = AutoRound(tiny, **common)
    at_end.quantize()
    a = at_end.save_quantized(str(tmp_path / "a"), fmt)
    streamed = AutoRound(tiny, **common)
    b = streamed.quantize_and_save(str(tmp_path / "b"), fmt)
    assert streamed.quantized == {}  # every block's codes left memory once written
    files = sorted(os.listdir(a))
    assert files == sorted(os.listdir(b))
    differ = [f for f in files if f != "report.md" and f != "loss.png"
              and not filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False)]
    assert differ == []
    with pytest.raises(ValueError, match="streamed to"):
        streamed.model()


def test_interrupted_stream_leaves_no_output(tiny, tmp_path, monkeypatch):
    ar = AutoRound(tiny, iters=0, disable_opt_rtn=True, progress=False)
    calls, original = [], ar._rtn_block

    def fail_at_second_block(i, *args):
        calls.append(i)
        if i == 1:
            raise KeyboardInterrupt  # block 0 is already in the temporary folder by now
        original(i, *args)

    monkeypatch.setattr(ar, "_rtn_block", fail_at_second_block)
    with pytest.raises(KeyboardInterrupt):
        ar.quantize_and_save(str(tmp_path / "out"))
    assert calls == [0, 1] and os.listdir(tmp_path) == []


# Peak RSS from /proc/self/status VmHWM, the high-water mark of this process's own memory: getrusage's ru_maxrss
# also counts the forking parent's RSS (Linux carries it across exec), i.e. the pytest process's.
_RSS = """
import sys
from autoround_jax.tuning.autoround import AutoRound
AutoRound(sys.argv[1], iters=0, disable_opt_rtn=True, progress=False).quantize_and_save(sys.argv[2])
hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
print("PEAK", int(hwm.split()[1]) * 1024)
"""


def test_streaming_rtn_peak_memory_below_weights_on_disk(tmp_path):
    """RTN of a 10-block model (0.86 GB of fp32 weights) peaks below its size on disk: one block at a time."""
    weights = write_random_qwen3(str(tmp_path / "big"), num_layers=10, hidden=1024, intermediate=5632, heads=8,
                                 kv_heads=8, head_dim=128)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _RSS, str(tmp_path / "big"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = int(proc.stdout.split("PEAK")[-1])
    assert os.path.isfile(tmp_path / "out" / "config.json")
    assert peak < weights, f"peak RSS {peak / 1e9:.2f} GB >= weights {weights / 1e9:.2f} GB"

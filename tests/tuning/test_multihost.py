"""The same tuning run under jax.distributed: two CPU processes of 4 simulated devices each on localhost (gloo),
one mesh over all 8; process 0 writes an export that reproduces the one-device run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

from autoround_jax.io.safetensors_io import load_file
from autoround_jax.quant.pack import unpack_rows
from autoround_jax.tuning.autoround import AutoRound
from tests.tiny_models import build_model, save_model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_reproduce_one_device_export(tmp_path):
    model = save_model(build_model("qwen3_tune", num_layers=2), str(tmp_path / "m"))
    ids = np.random.default_rng(0).integers(3, 300, (16, 24)).astype(np.int32)
    one = AutoRound(model, iters=4, nsamples=16, seqlen=24, batch_size=8, dataset=ids, progress=False)
    assert one.mesh is None
    single = one.quantize_and_save(str(tmp_path / "one"))

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port, out = str(_free_port()), str(tmp_path / "multi")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(k), port, model, out],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (so, se) in zip(procs, outputs):
        assert p.returncode == 0 and "DONE" in so, se[-3000:]
    losses = [[float(v) for v in so.split("DONE")[1].split()[1:]] for so, _ in outputs]
    assert losses[0] == losses[1]  # one run, seen from both processes
    np.testing.assert_allclose(losses[0], [r.loss_best for r in one.reports], rtol=1e-4)

    # One writer: the one folder, no temporary siblings from the other process.
    assert sorted(os.listdir(tmp_path)) == ["m", "multi", "one"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(single))
    a, b = load_file(os.path.join(single, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert sorted(a) == sorted(b)
    same = total = 0
    for name in a:
        if name.endswith(".qweight"):
            ca, cb = unpack_rows(a[name], 4), unpack_rows(b[name], 4)
            same, total = same + int(np.sum(ca == cb)), total + ca.size
        elif a[name].dtype.kind == "f":
            np.testing.assert_allclose(b[name].astype(np.float32), a[name].astype(np.float32), rtol=1e-3, atol=1e-6)
        else:
            np.testing.assert_array_equal(a[name], b[name])
    assert total and same / total >= 0.999

"""Mesh tuning on 8 simulated CPU devices against the one-device run, shard shapes, and mesh input errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.tiny_models import build_model, save_model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh")
    q3 = save_model(build_model("qwen3_tune", num_layers=2), str(root / "qwen3"))
    q2 = save_model(build_model("qwen2_tune", num_layers=2), str(root / "qwen2"))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "mesh_worker.py"), q3, q2], env=_env(8),
                          capture_output=True, text=True, timeout=900)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[0][len("RESULT "):])


@pytest.mark.parametrize("run", ["qwen3 data=8", "qwen3 data=4,fsdp=2", "qwen3 data=2+low", "qwen2 data=4,fsdp=2",
                                 "qwen3 data=4 masked", "qwen3 data=2+low masked"])
def test_sharded_run_reproduces_one_device(mesh_results, run):
    r = mesh_results[run]
    assert r["codes_equal"] >= 0.999, r
    assert r["scale_rel"] <= 1e-3, r
    assert r["loss_rel"] <= 1e-4, r


@pytest.mark.parametrize("model", ["qwen3", "qwen2"])
def test_arrays_are_sharded_as_asked(mesh_results, model):
    """data=4,fsdp=2: each device holds 1/4 of the activation rows and 1/2 of the weight, V and clip-scale rows."""
    s = mesh_results[f"{model} shards"]
    assert s["x_shards"] == [s["x_rows"] // 4], s
    assert s["w_shards"] == [s["w_rows"] // 2], s
    assert s["v_shards"] == [s["v_rows"] // 2], s
    assert s["scale_shards"] == [s["v_rows"] // 2], s


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    return save_model(build_model("qwen3_tune", num_layers=1), str(tmp_path_factory.mktemp("one") / "m"))


def _args(folder, out, *extra):
    return ["--model", folder, "--iters", "2", "--nsamples", "8", "--seqlen", "16", "--output_dir", str(out), *extra]


def test_batch_that_does_not_split_over_data_is_one_line(one_layer, tmp_path):
    """On 4 simulated devices (a subprocess: the device count is fixed when jax starts)."""
    code = "import sys; from autoround_jax.cli import run; sys.exit(run(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, *_args(one_layer, tmp_path / "out", "--mesh", "data=3",
                                                            "--batch_size", "4")],
                          env=_env(4), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "batch_size 4 does not split over data=3" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]) == 1, proc.stderr


@pytest.mark.parametrize("extra, message", [
    (["--mesh", "data=8"], "needs 8 devices but 1 are available"),
    (["--mesh", "model=2"], "unknown axis 'model'"),
    (["--mesh", "data2"], "write axes as name=size"),
    (["--device_map", "0,7"], "this machine has 1 devices"),
])
def test_mesh_input_errors_are_one_line(one_layer, tmp_path, capsys, extra, message):
    from autoround_jax.cli import run

    assert run(_args(one_layer, tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("autoround-jax: error:") and message in err[0], err
    assert not os.path.exists(tmp_path / "out")


def test_bf16_rows_are_gathered_without_upcasting_the_cache():
    """take_rows on one device: bit-exact rows of a bf16 cache, and the compiled gather never converts the whole
    cache to f32 (XLA:CPU's float normalisation did that in every tuning iteration)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from autoround_jax.tuning.mesh import take_rows

    rng = np.random.default_rng(0)
    cache = jnp.asarray(rng.standard_normal((16, 8, 32)), jnp.bfloat16)
    idx = jnp.asarray([3, 0, 15, 3], jnp.int32)
    f = jax.jit(lambda c, i: take_rows(c, i, None))
    got = f(cache, idx)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), np.asarray(cache.astype(jnp.float32))[[3, 0, 15, 3]])
    hlo = f.lower(cache, idx).compile().as_text()
    assert "f32[16,8,32]" not in hlo

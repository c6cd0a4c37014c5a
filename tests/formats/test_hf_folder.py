"""Writing folders: nothing non-finite reaches disk, nothing existing is lost, output paths are checked before any
work, and temporary folders left by a killed run are cleaned up by the next run into the same folder."""

import os
import time

import numpy as np
import pytest

from autoround_jax.io.hf_folder import (OutputExistsError, atomic_folder, check_output_path, remove_leftovers,
                                             write_sharded)
from autoround_jax.validation import NonFiniteError


def _dead_pid() -> int:
    with open("/proc/sys/kernel/pid_max") as f:
        return int(f.read()) + 1  # above pid_max: never a live process


def test_nonfinite_tensor_is_never_written_and_the_old_folder_survives(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous export")
    bad = np.ones((4, 4), np.float16)
    bad[1, 2] = np.inf
    tensors = [("model.embed_tokens.weight", np.ones((4, 4), np.float32)),
               ("model.layers.7.mlp.up_proj.scales", bad)]
    with pytest.raises(NonFiniteError, match=r"model\.layers\.7\.mlp\.up_proj\.scales \(block 7\): 0 NaN, 1 inf"):
        with atomic_folder(str(out), overwrite=True) as tmp:
            write_sharded(iter(tensors), tmp)
    assert os.listdir(out) == ["model.safetensors"] and (out / "model.safetensors").read_bytes() == b"previous export"
    assert os.listdir(tmp_path) == ["out"]  # the temporary folder is gone


def test_folders_created_above_the_output_are_removed_on_failure(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with atomic_folder(str(out)):
            raise RuntimeError("killed by a bug")
    assert os.listdir(tmp_path) == []


def test_output_path_checks(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        check_output_path(str(f))
    with pytest.raises(OutputExistsError, match=f"lies under {f}, which is a file"):
        check_output_path(str(f / "sub" / "out"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(OutputExistsError, match="not empty"):
        check_output_path(str(full))
    assert check_output_path(str(full), overwrite=True) == str(full)
    assert check_output_path(str(tmp_path / "new" / "deeper")) == str(tmp_path / "new" / "deeper")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputExistsError, match="permission denied"):
            check_output_path(str(ro / "out"))


def test_leftovers_of_a_killed_run_are_removed_by_the_next_run(tmp_path, capsys):
    out = tmp_path / "model-w4g128"
    dead = tmp_path / f"model-w4g128.tmp-{_dead_pid()}-abc123"
    legacy = tmp_path / "model-w4g128.tmp-x1y2z3"  # an older version's name, without a pid
    live = tmp_path / f"model-w4g128.tmp-{os.getppid()}-def456"  # a concurrent run still writing
    other = tmp_path / f"other.tmp-{_dead_pid()}-abc123"  # another output folder's business
    for d in (dead, legacy, live, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    old = time.time() - 3600
    os.utime(legacy, (old, old))
    with atomic_folder(str(out)) as tmp:
        open(os.path.join(tmp, "config.json"), "w").write("{}")
    err = capsys.readouterr().err
    assert not dead.exists() and not legacy.exists() and live.exists() and other.exists()
    assert f"removed {dead}, left by an interrupted run" in err and f"removed {legacy}" in err
    assert os.listdir(out) == ["config.json"]


def test_an_interrupted_overwrite_keeps_the_only_copy_and_names_the_commands(tmp_path, capsys):
    out = tmp_path / "m"
    held = tmp_path / f"m.old-{_dead_pid()}-q1w2e3"  # killed between the two renames: out is gone
    (held / "x").mkdir(parents=True)
    (held / "x" / "model.safetensors").write_bytes(b"previous")
    assert remove_leftovers(str(out)) == []
    err = capsys.readouterr().err
    assert held.exists() and f"mv {held / 'x'} {out}" in err and f"rm -r {held}" in err
    out.mkdir()  # once the folder exists again, the held copy is a plain leftover
    assert remove_leftovers(str(out)) == [str(held)] and not held.exists()

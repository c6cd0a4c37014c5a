"""Resume after kill -9 (tuning/resume.py): a tuning subprocess is SIGKILLed when it starts block 2 (its blocks 0
and 1 checkpointed); the same command again resumes there, tunes only blocks 2-5, and exports the same bytes as an
uninterrupted run. A changed setting, a corrupted checkpoint and a half-written one are handled as documented.

The kill comes from the test's own driver (it wraps AutoRound._load_block, which runs once per tuned block, and
SIGKILLs its own process on entering block 2, once block 1's checkpoint is on disk): a real kill -9 at a known
point, with no hook in the package."""

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from autoround_jax import cli
from autoround_jax.io.safetensors_io import SafetensorsFile
from autoround_jax.tuning import autoround
from tests.tiny_models import build_model, save_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYERS = 6
DRIVER = """
import os, signal, sys
from autoround_jax import cli
from autoround_jax.tuning import autoround
load = autoround.AutoRound._load_block
def traced(self, i):
    if i == int(os.environ["KILL_AT_BLOCK"]):
        self._resume.wait()  # block 1's activations are written in the background while block 2 starts
        os.kill(os.getpid(), signal.SIGKILL)
    return load(self, i)
autoround.AutoRound._load_block = traced
sys.exit(cli.run(sys.argv[1:]))
"""


def _argv(folder, out, resume_dir, *extra):
    return [folder, "--iters", "4", "--nsamples", "8", "--seqlen", "32", "--batch_size", "4", "--group_size", "32",
            "--dataset", "self", "--model_dtype", "fp32", "--output_dir", out, "--resume_dir", resume_dir, *extra]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_model(build_model("qwen3_tune", num_layers=LAYERS), str(tmp_path_factory.mktemp("tiny6")))


@pytest.fixture(scope="module")
def killed(folder, tmp_path_factory):
    """The resume folder a run left when kill -9 hit it on entering block 2."""
    base = tmp_path_factory.mktemp("killed")
    resume_dir = str(base / "resume")
    env = {**os.environ, "KILL_AT_BLOCK": "2", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", DRIVER, *_argv(folder, str(base / "out"), resume_dir)], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(resume_dir, "state"))) == ["2"]  # blocks 0 and 1 finished
    # Nothing exported: at most the streaming export's temporary sibling (the next run into the folder removes it).
    left = os.listdir(base / "out") if os.path.exists(base / "out") else []
    assert all(".tmp-" in name for name in left), left
    return resume_dir


@pytest.fixture
def tuned_blocks(monkeypatch):
    """The blocks a run in this process loads for quantizing."""
    seen = []
    load = autoround.AutoRound._load_block

    def traced(self, i):
        seen.append(i)
        return load(self, i)

    monkeypatch.setattr(autoround.AutoRound, "_load_block", traced)
    return seen


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _export(out):
    (name,) = os.listdir(out)
    return os.path.join(out, name)


def _files(folder):
    """Every exported file's bytes except report.md and loss.png, which hold wall-clock times."""
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
            if f not in ("report.md", "loss.png")}


def _tensors(folder):
    out = {}
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            sf = SafetensorsFile(os.path.join(folder, f))
            out.update({k: sf.get(k) for k in sf.keys()})
    return out


@pytest.fixture(scope="module")
def uninterrupted(folder, tmp_path_factory):
    base = tmp_path_factory.mktemp("plain")
    assert cli.run(_argv(folder, str(base / "out"), str(base / "resume"), "--no_resume")) == 0
    assert not os.path.exists(base / "resume")  # removed after the export
    return _export(str(base / "out"))


def test_resume_after_kill_matches_uninterrupted_run(folder, killed, uninterrupted, tuned_blocks, tmp_path, capfd):
    resume_dir = _copy(killed, tmp_path / "resume")
    assert cli.run(_argv(folder, str(tmp_path / "out"), resume_dir)) == 0
    err = capfd.readouterr().err
    assert f"resuming from block 2 of {LAYERS} (checkpoint {resume_dir})" in err
    assert tuned_blocks == [2, 3, 4, 5]  # blocks 0 and 1 were not tuned again
    resumed = _export(str(tmp_path / "out"))
    assert _files(resumed) == _files(uninterrupted)  # byte for byte (config, shards, index, tokenizer files)
    # no double write (intel/auto-round#2350): exactly the uninterrupted run's tensors, packed only, same total size
    a, b = _tensors(resumed), _tensors(uninterrupted)
    assert sorted(a) == sorted(b) and not any(k.endswith(".weight") and "proj" in k for k in a)
    assert sum(v.nbytes for v in a.values()) == sum(v.nbytes for v in b.values())
    assert not os.path.exists(resume_dir)  # a successful export removes the checkpoint
    report = open(os.path.join(resumed, "report.md")).read()
    assert report.count("| ") >= LAYERS  # the restored blocks' reports are in the run's report


def test_changed_setting_starts_fresh(folder, killed, tuned_blocks, tmp_path, capfd):
    resume_dir = _copy(killed, tmp_path / "resume")
    assert cli.run(_argv(folder, str(tmp_path / "out"), resume_dir, "--seed", "43")) == 0
    err = capfd.readouterr().err
    assert f"resume checkpoint {resume_dir} is from a different run (seed changed: 42 -> 43" in err
    assert "resuming" not in err and tuned_blocks == list(range(LAYERS))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's coroutines after a failed read
@pytest.mark.parametrize("what", ["meta", "arrays", "codes"])
def test_corrupted_checkpoint_gives_one_line_and_fresh_start(folder, killed, uninterrupted, tuned_blocks, tmp_path,
                                                             capfd, what):
    resume_dir = _copy(killed, tmp_path / "resume")
    if what == "meta":
        with open(os.path.join(resume_dir, "state", "2", "meta", "metadata"), "w") as f:
            f.write('{"format_version": 1, "signature": ')  # truncated JSON
    else:
        top = os.path.join(resume_dir, "state", "2", "arrays") if what == "arrays" else os.path.join(resume_dir,
                                                                                                     "blocks", "1")
        data = [os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs if os.sep + "d" + os.sep in
                os.path.join(d, f) + os.sep or os.path.basename(d) == "d"]
        biggest = max(data, key=os.path.getsize)
        raw = bytearray(open(biggest, "rb").read())
        raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)  # zero out a stretch in the middle of the data
        open(biggest, "wb").write(bytes(raw))
    assert cli.run(_argv(folder, str(tmp_path / "out"), resume_dir)) == 0
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "resume checkpoint" in ln]
    assert len(lines) == 1 and f"resume checkpoint {resume_dir} is unreadable (" in lines[0], lines
    assert lines[0].endswith("starting fresh")
    assert tuned_blocks == list(range(LAYERS))
    assert _files(_export(str(tmp_path / "out"))) == _files(uninterrupted)  # never a silently wrong model


def test_half_written_checkpoint_leaves_previous_usable(folder, killed, tuned_blocks, tmp_path, capfd):
    """A kill while step 3 is being written leaves orbax's temporary folder beside step 2: step 2 is used."""
    resume_dir = _copy(killed, tmp_path / "resume")
    partial = os.path.join(resume_dir, "state", "3.orbax-checkpoint-tmp-1234567")
    shutil.copytree(os.path.join(resume_dir, "state", "2"), partial)
    os.remove(os.path.join(partial, "meta", "metadata"))
    assert cli.run(_argv(folder, str(tmp_path / "out"), resume_dir)) == 0
    assert f"resuming from block 2 of {LAYERS}" in capfd.readouterr().err
    assert tuned_blocks == [2, 3, 4, 5]


def test_cli_default_location_beside_the_output(folder, uninterrupted, tuned_blocks, tmp_path, monkeypatch, capfd):
    """Without --resume_dir or AR_RESUME_DIR the CLI checkpoints into .<output name>.autoround-resume beside the
    output folder (here after a crash on entering block 4), resumes from it, and removes it after the export."""
    import threading

    monkeypatch.delenv("AR_RESUME_DIR", raising=False)
    argv = [a for a in _argv(folder, str(tmp_path / "out"), "") if a not in ("--resume_dir", "")]
    load = autoround.AutoRound._load_block

    def crash(self, i):
        if i == 4:
            raise RuntimeError("preempted")
        return load(self, i)

    monkeypatch.setattr(autoround.AutoRound, "_load_block", crash)
    with pytest.raises(RuntimeError, match="preempted"):
        cli.run(argv)
    for t in threading.enumerate():  # the background writer of block 3's checkpoint
        if t.name == "autoround-resume":
            t.join()
    name = os.path.basename(uninterrupted)
    hidden = tmp_path / "out" / f".{name}.autoround-resume"
    assert sorted(os.listdir(hidden / "state")) == ["4"]
    monkeypatch.setattr(autoround.AutoRound, "_load_block", load)
    tuned_blocks.clear()
    assert cli.run(argv) == 0
    assert f"resuming from block 4 of {LAYERS} (checkpoint {hidden})" in capfd.readouterr().err
    assert tuned_blocks == [4, 5] and sorted(os.listdir(tmp_path / "out")) == [name]  # checkpoint gone
    assert _files(_export(str(tmp_path / "out"))) == _files(uninterrupted)


def test_opt_rtn_resumes_through_the_python_api_and_env(folder, tuned_blocks, tmp_path, monkeypatch, capfd):
    """iters=0 (opt-RTN, the default below 8 bits) checkpoints too; AR_RESUME_DIR chooses the folder for the API.
    A crash (an exception on entering block 3) then a second run: the codes and imatrix equal an uninterrupted run's."""
    from autoround_jax.tuning.autoround import AutoRound

    ids = np.random.default_rng(0).integers(3, 301, size=(8, 32)).astype(np.int32)
    kw = dict(iters=0, nsamples=8, seqlen=32, batch_size=4, group_size=32, dataset=ids, model_dtype="fp32",
              progress=False)
    plain = AutoRound(folder, **kw)
    plain.quantize()
    assert not plain._resume.enabled  # no folder given: no checkpoints
    monkeypatch.setenv("AR_RESUME_DIR", str(tmp_path / "resume"))
    load = autoround.AutoRound._load_block

    def crash(self, i):
        if i == 3:
            raise RuntimeError("preempted")
        return load(self, i)

    first = AutoRound(folder, **kw)
    monkeypatch.setattr(autoround.AutoRound, "_load_block", crash)
    with pytest.raises(RuntimeError, match="preempted"):
        first.quantize()
    first._resume.wait()
    monkeypatch.setattr(autoround.AutoRound, "_load_block", load)
    tuned_blocks.clear()
    second = AutoRound(folder, **kw)
    second.quantize()
    assert f"resuming from block 3 of {LAYERS}" in capfd.readouterr().err
    assert sorted(second.quantized) == sorted(plain.quantized) and sorted(second.imatrix) == sorted(plain.imatrix)
    for name, qw in plain.quantized.items():
        for k in ("codes", "scales", "zeros"):
            np.testing.assert_array_equal(getattr(second.quantized[name], k), getattr(qw, k), err_msg=name)
    for name, v in plain.imatrix.items():
        np.testing.assert_array_equal(second.imatrix[name], v, err_msg=name)

"""scripts/gpu_suite.py: the one-command GPU suite, proven here by its --dry_run (tiny shapes on the CPU: Pallas in
interpret mode, the reference on torch CPU without compile) and by its wheel-install planner on synthetic wheels."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_suite  # noqa: E402


def _rows(md: str) -> list[list[str]]:
    """Data rows of every markdown table in md, as stripped cells."""
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines()
            if ln.startswith("| ") and not ln.startswith("|---") and "---" not in ln]


def test_dry_run_end_to_end(tmp_path):
    has_reference = importlib.util.find_spec("auto_round") is not None and importlib.util.find_spec("torch") is not None
    sections = "tuning,kernels,decode"
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_suite.py"), "--dry_run", "--out", str(out),
                        "--work", str(work), "--wheels", str(tmp_path / "no_wheels"), "--sections", sections,
                        "--budget_s", "400"], capture_output=True, text=True, timeout=420, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert {p.name for p in out.iterdir()} == {"summary.md", "tuning.md", "kernels.md", "decode.md", "logs.txt"}
    assert "DRY RUN" in summary and "no wheel folder" in summary
    for step in ("tuning_ours", "kernels", "decode"):
        assert re.search(rf"- {step}: ok in \d+ s", summary), summary
    if has_reference:
        assert re.search(r"- tuning_ref: ok in \d+ s", summary), summary

    tuning = _rows((out / "tuning.md").read_text())
    ours = next(row for row in tuning[1:] if row[0] == "autoround-jax")
    assert float(ours[3]) > 0 and float(ours[4]) > 0  # first block and steady seconds
    if has_reference:
        ref = next(row for row in tuning[1:] if row[0] == "auto-round 0.16.1")
        assert "torch.compile=False" in ref[2] and float(ref[3]) > 0 and float(ref[4]) > 0
        assert "reference / ours, steady s/block" in (out / "tuning.md").read_text()

    kernels = (out / "kernels.md").read_text()
    rows = [row for row in _rows(kernels) if re.fullmatch(r"\d+x\d+", row[0])]
    defaults = [row for row in rows if len(row) == 12]
    variants = [row for row in rows if len(row) == 13]
    assert [row[1] for row in defaults] == ["1", "4"]
    assert len(variants) >= 3 and "default" not in [row[2] for row in variants]
    for row in rows:  # every timed configuration computed the product (bf16 output vs an f32 product)
        assert float(row[-3]) < 1e-2, row

    decode = _rows((out / "decode.md").read_text())
    assert len(decode) == 2 and float(decode[1][4]) > 0  # header + one row; decode tok/s


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)


def test_install_plan_takes_only_what_the_machine_lacks(tmp_path):
    _wheel(tmp_path, "auto-round", "0.16.1", ["torch", "datasets", "pydantic", "transformers>=4.38",
                                              'numba; extra == "cpu"'])
    _wheel(tmp_path, "datasets", "5.2.0", ["fsspec<=2026.9.0,>=2023.1.0", "dill<0.4.2,>=0.3.0", "pyarrow>=24.0.0"])
    _wheel(tmp_path, "dill", "0.4.1", [])
    _wheel(tmp_path, "fsspec", "2026.9.0", [])
    _wheel(tmp_path, "pydantic", "2.14.4", ["typing-extensions>=4.16.0"])
    _wheel(tmp_path, "typing-extensions", "4.16.0", [])
    wheels = gpu_suite.read_wheels(tmp_path)
    assert wheels["auto-round"]["version"] == "0.16.1" and len(wheels["datasets"]["requires"]) == 3

    # The GPU image: torch, transformers, a too-new fsspec, an old typing-extensions, an old pyarrow, no datasets.
    installed = {"torch": "2.11.0", "transformers": "5.17.0", "fsspec": "2027.1.0", "typing-extensions": "4.12.2",
                 "pyarrow": "19.0.0"}
    files, notes = gpu_suite.plan_install(wheels, installed)
    names = sorted(Path(f).name.split("-")[0] for f in files)
    assert names == ["auto_round", "datasets", "dill", "fsspec", "pydantic", "typing_extensions"]
    assert any("pyarrow>=24.0.0" in n and "installed 19.0.0" in n for n in notes), notes
    assert not any("numba" in n for n in notes)  # extras are not followed

    # Where the reference is already there, nothing is installed.
    files, notes = gpu_suite.plan_install(wheels, dict(installed, **{"auto-round": "0.16.1"}))
    assert files == [] and notes == ["auto-round 0.16.1 already installed"]


def test_fetched_wheels_cover_the_reference_on_the_gpu_image():
    """Against the GPU image's package list (the device notes' KINDS.md: versions where it gives them, else a recent
    one assumed): every requirement of what gets installed is met, and the missing projects come from the wheels.
    `scripts/setup.sh --test` fetches them (scripts/fetch_gpu_wheels.sh)."""
    assert (ROOT / ".gpu_wheels").is_dir(), "no .gpu_wheels/: run bash scripts/fetch_gpu_wheels.sh"
    wheels = gpu_suite.read_wheels(ROOT / ".gpu_wheels")
    image = {"torch": "2.11.0", "numpy": "2.5.2", "transformers": "5.17.0", "accelerate": "1.15.0",
             "huggingface-hub": "1.33.0", "tqdm": "4.67.1", "py-cpuinfo": "9.0.0", "requests": "2.32.5",
             "filelock": "3.20.0", "pandas": "2.3.3", "xxhash": "3.6.0", "packaging": "25.0", "pyyaml": "6.0.3",
             "pyarrow": "24.0.0"}  # no datasets, dill, multiprocess, pydantic (+ core, annotated-types, inspection)
    files, notes = gpu_suite.plan_install(wheels, image)
    assert not [n for n in notes if n.startswith("unmet")], notes
    got = {Path(f).name.split("-")[0] for f in files}
    assert {"auto_round", "datasets", "dill", "multiprocess", "pydantic", "pydantic_core", "annotated_types",
            "typing_inspection"} <= got


def test_tuning_table_ratios_and_a_cut_short_reference(tmp_path):
    """The tuning table from the children's JSON: ratios when both finished; the reference's finished blocks when
    its time box ended it (partial file), never a figure that was not measured."""
    import argparse
    import json

    a = argparse.Namespace(dry_run=False, tune_shape="qwen3-8b", tune_layers=2)
    ours = dict(impl="autoround-jax", device="gpu", precision="bf16", blocks=[30.0, 4.0], wall=40.0,
                peak_bytes=8 * 2**30)
    (tmp_path / "tuning_ours.json").write_text(json.dumps(ours))
    (tmp_path / "tuning_ref.partial.json").write_text(json.dumps(dict(blocks=[90.0], peak_bytes=12 * 2**30)))
    text = "\n".join(gpu_suite.tuning_table(tmp_path, a))
    assert "| autoround-jax | gpu | bf16 | 30.00 | 4.00 | 40.0 | 8.00 |" in text
    assert "cut short" in text and "| 90.00 | n/a |" in text
    assert "steady s/block" not in text  # no steady reference block: no ratio
    assert "first block incl. compile: 3.00x" in text and "peak memory ours / reference: 0.67" in text

    ref = dict(impl="auto-round 0.16.1", device="gpu", precision="bf16, compile", blocks=[90.0, 10.0], wall=100.0,
               peak_bytes=16 * 2**30)
    (tmp_path / "tuning_ref.json").write_text(json.dumps(ref))
    text = "\n".join(gpu_suite.tuning_table(tmp_path, a))
    assert "reference / ours, steady s/block: 2.50x (goal >= 2x)" in text and "cut short" not in text

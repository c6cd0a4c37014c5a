"""Every runtime import is a declared dependency (CI also proves it in a venv without the test extra), the package
metadata builds without setuptools' deprecation warning, and the CLI keeps transformers' noise out."""

import ast
import importlib.metadata
import logging
import os
import re
import sys
import tomllib

ROOT = os.path.join(os.path.dirname(__file__), "..")
OWN = {"autoround_jax", "kernels"}  # kernels/ installs as autoround_jax.kernels
# Imported only where missing is handled: lm_eval (the `eval` extra; a one-line install hint), datasets (used when
# present, else huggingface_hub downloads the files), torch (never).
OPTIONAL = {"lm_eval", "datasets"}


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports() -> set[str]:
    found = set()
    for pkg in OWN:
        for root, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    tree = ast.parse(open(os.path.join(root, f)).read())
                    for node in ast.walk(tree):
                        if isinstance(node, ast.Import):
                            found |= {a.name.split(".")[0] for a in node.names}
                        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - OWN - {"__future__"}


def test_every_runtime_import_is_a_declared_dependency():
    meta = _pyproject()["project"]
    declared = {_norm(re.split(r"[<>=!~\[; ]", d)[0]) for d in meta["dependencies"]}
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for mod in sorted(_imports() - OPTIONAL):
        names = {_norm(d) for d in dists.get(mod, [mod])}
        if not names & declared:
            missing[mod] = sorted(names)
    assert not missing, f"imported but not in [project].dependencies: {missing}"
    assert "jinja2" in declared  # transformers' apply_chat_template needs it without declaring it
    assert "torch" not in declared
    assert any(_norm(d).startswith("lm-eval") for d in meta["optional-dependencies"]["eval"])


def test_license_is_an_spdx_string_for_setuptools_77():
    meta = _pyproject()
    assert meta["project"]["license"] == "Apache-2.0"
    (req,) = [r for r in meta["build-system"]["requires"] if r.startswith("setuptools")]
    assert int(re.search(r">=(\d+)", req).group(1)) >= 77


def test_ci_runs_the_readme_tests_and_a_runtime_only_smoke():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    test_cmd = "bash scripts/setup.sh --test && HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q tests"
    assert test_cmd in readme and test_cmd in ci
    assert "scripts/setup.sh --runtime" in ci and ".ci/smoke_runtime.sh" in ci
    smoke = open(os.path.join(ROOT, ".ci", "smoke_runtime.sh")).read()
    for step in ("convert-gguf", "generate", "--iters 0 --disable_opt_rtn", "perplexity", "import torch"):
        assert step in smoke
    assert ".venv-runtime" in open(os.path.join(ROOT, ".gitignore")).read()


def test_cli_silences_transformers_noise_but_not_other_warnings(capfd, monkeypatch):
    from autoround_jax.cli import quiet_transformers

    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", raising=False)
    quiet_transformers()
    assert os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] == "1"  # "PyTorch was not found" is an advisory warning
    log = logging.getLogger("transformers.tokenization_utils_base")
    handler = logging.StreamHandler(sys.stderr)
    log.addHandler(handler)
    try:
        log.warning("Token indices sequence length is longer than the specified maximum sequence length (9 > 8)")
        log.warning("some other tokenizer warning")
    finally:
        log.removeHandler(handler)
    err = capfd.readouterr().err
    assert "Token indices" not in err and "some other tokenizer warning" in err


def test_the_listed_packages_are_every_package_folder():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    folders = {"autoround_jax." + os.path.relpath(d, os.path.join(ROOT, "autoround_jax")).replace(os.sep, ".")
               for d, _, files in os.walk(os.path.join(ROOT, "autoround_jax")) if "__init__.py" in files}
    folders = {f.replace("autoround_jax..", "autoround_jax") for f in folders} | {"autoround_jax.kernels"}
    assert listed == folders


def test_the_wheel_installs_kernels_inside_our_namespace(tmp_path):
    """kernels/ is a top-level folder of the checkout, but `pip install .` must not put a top-level `kernels` package
    into site-packages: the PyPI package of that name (used by recent transformers) would collide with it."""
    import subprocess
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), ROOT], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"autoround_jax"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "autoround_jax/kernels/int_matmul.py" in names and "autoround_jax/kernels/api.py" in names


def test_a_source_tree_without_install_finds_the_kernels_too():
    import autoround_jax

    spec = autoround_jax._SourceTreeKernels().find_spec("autoround_jax.kernels")
    assert spec is not None and list(spec.submodule_search_locations) == [os.path.join(os.path.abspath(ROOT), "kernels")]
    assert autoround_jax._SourceTreeKernels().find_spec("kernels") is None


def test_the_checkout_does_not_shadow_an_installed_kernels_package(tmp_path):
    """With the checkout root first on sys.path (as `python -m pytest` puts it), `import kernels` still finds an
    installed package of that name (recent transformers imports the PyPI `kernels`): kernels/ has no __init__.py."""
    import subprocess

    site = tmp_path / "site" / "kernels"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("WHO = 'installed'\n")
    code = "import sys; sys.path.insert(1, sys.argv[1]); import kernels; print(kernels.WHO)"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "installed", out.stderr[-2000:]
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))

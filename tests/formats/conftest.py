"""Session fixtures for the packed-format tests: tiny fp32 models and the reference's exports of them (each made
once, on first use)."""

import pytest

from tests.formats import reference


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory):
    """family -> an fp32 HF folder of that tiny model (2 blocks)."""
    pytest.importorskip("torch")
    from tests.tiny_models import build_model, save_model

    cache = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = save_model(build_model(family, num_layers=2), str(tmp_path_factory.mktemp(family)))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def reference_folder(tmp_path_factory, tiny_src):
    """case name (reference.CASES, or "tuned") -> the folder the reference exported."""
    pytest.importorskip("auto_round")
    cache = {}

    def get(case: str) -> str:
        if case not in cache:
            out = str(tmp_path_factory.mktemp(f"ref-{case}"))
            if case == "tuned":
                cache[case] = reference.reference_export(tiny_src("qwen2_tune"), out, "auto_round", bits=4,
                                                         group_size=32, sym=True, **reference.TUNED)
            else:
                family, scheme, fmt = reference.CASES[case]
                cache[case] = reference.reference_export(tiny_src(family), out, fmt, **scheme)
        return cache[case]

    return get

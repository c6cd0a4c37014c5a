"""Calibration dataset specs: hub ids routed to the hub loader (datasets, else the dataset's files through
huggingface_hub), the offline fallback naming the hub, and option values checked before any work."""

import os
import sys

import pytest

from autoround_jax.data import calibration
from autoround_jax.data.calibration import DatasetError, calibration_ids, check_dataset, is_hub_id


class WordTokenizer:
    """One id per character: enough for the selection rules, no files needed."""

    eos_token = None

    def __call__(self, text, truncation=False, max_length=None, add_special_tokens=True):
        ids = [3 + ord(c) % 200 for c in text]
        return {"input_ids": ids[:max_length] if truncation else ids}


def test_hub_ids_are_not_local_paths(tmp_path):
    assert is_hub_id("NeelNanda/pile-10k") and is_hub_id("mit-han-lab/pile-val-backup")
    assert not is_hub_id("./data/calib.jsonl") and not is_hub_id("data/calib.jsonl") and not is_hub_id("/abs/x")
    assert not is_hub_id("fortunes")
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").write_text("x")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert not is_hub_id("org/name")  # an existing path stays a path
    finally:
        os.chdir(cwd)


def test_org_name_goes_to_the_hub_loader(monkeypatch):
    calls = []

    def fake_hub(name, split):
        calls.append((name, split))
        return ["abcdefghijklmnopqrstuvwxyz" * 2] * 8

    monkeypatch.setattr(calibration, "_read_hub", fake_hub)
    ids = calibration_ids("someorg/some-data:num=3:split=validation", WordTokenizer(), nsamples=3, seqlen=16)
    assert ids.shape == (3, 16) and calls == [("someorg/some-data", "validation")]


def test_default_dataset_offline_falls_back_naming_the_hub():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.warns(UserWarning) as w:
        ids = calibration_ids(None, WordTokenizer(), nsamples=2, seqlen=16)
    msg = str(w[0].message)
    assert "NeelNanda/pile-10k" in msg and "Hugging Face hub" in msg and "falling back to the offline 'fortunes'" in msg
    assert "not found" not in msg and ids.shape == (2, 16)


def test_without_datasets_the_hub_files_are_read(monkeypatch, tmp_path):
    """No `datasets` package: huggingface_hub fetches the dataset's data files; the split's files are read."""
    import huggingface_hub

    snap = tmp_path / "snapshot"
    (snap / "data").mkdir(parents=True)
    (snap / "data" / "train-00000-of-00001.jsonl").write_text('{"text": "train text"}\n' * 3)
    (snap / "data" / "test-00000-of-00001.jsonl").write_text('{"text": "test text"}\n')
    (snap / "dataset_infos.json").write_text("{}")
    seen = {}

    def fake_download(repo_id, repo_type=None, allow_patterns=None, **kw):
        seen.update(repo_id=repo_id, repo_type=repo_type)
        return str(snap)

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert calibration._read_hub("org/name", "train") == ["train text"] * 3
    assert seen == {"repo_id": "org/name", "repo_type": "dataset"}

    def offline(*a, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DatasetError, match=r"cannot load dataset org/name from the Hugging Face hub \(offline"):
        calibration._read_hub("org/name", "train")


@pytest.mark.parametrize("spec, match", [
    ("fortunes:num=abc", "num=abc .* is not a positive integer"),
    ("fortunes:num=0", "num=0 .* is not a positive integer"),
    ("fortunes:concat=maybe", "concat=maybe .* must be True or False"),
    ("fortunes:nmu=3", "unknown dataset option 'nmu'"),
    (":num=3", "no dataset name"),
    ("/no/such/calib.jsonl", "not found"),
])
def test_dataset_specs_are_checked_up_front(spec, match):
    with pytest.raises(DatasetError, match=match):
        check_dataset(spec)


def test_good_specs_pass_the_early_check(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "x"}\n')
    for spec in (None, "self", "fortunes", "fortunes:num=8:concat=True", "NeelNanda/pile-10k", f"{f},fortunes"):
        check_dataset(spec)


def test_valid_token_mask_follows_the_reference_calibrator():
    """auto-round's LLMCalibrator marks pad tokens (or, without a pad id, each sample's trailing repeats of its last
    token) and every last position with -100; the loss counts the rest. All-but-last everywhere -> None."""
    import numpy as np

    from autoround_jax.data.calibration import valid_token_mask

    ids = np.array([[5, 2, 7, 8, 2, 9],    # pad id 2 inside
                    [5, 6, 7, 8, 9, 9],    # trailing repeat: only counted without a pad id
                    [3, 4, 4, 4, 4, 4]])
    np.testing.assert_array_equal(valid_token_mask(ids, 2), [[1, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0],
                                                             [1, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(valid_token_mask(ids, None), [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0],
                                                                [1, 0, 0, 0, 0, 0]])
    assert valid_token_mask(np.array([[5, 6, 7], [1, 2, 3]]), 0) is None  # the tuner's fixed mask serves

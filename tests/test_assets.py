import pytest
import torch

from lords import assets


def test_calibration_and_heldout_documents_are_disjoint():
    calibration = assets.documents("calibration")
    heldout = assets.documents("heldout")
    assert len(calibration) == assets.CALIBRATION_DOCUMENTS and len(heldout) > 50
    assert not set(calibration) & set(heldout)
    assert sum(len(d.split()) for d in heldout) > 10_000  # tens of thousands of tokens, real prose


def test_text_dir_override(tmp_path, monkeypatch):
    (tmp_path / "lee_background.cor").write_text("\n".join(f"doc {i}" for i in range(250)), encoding="latin-1")
    (tmp_path / "lee.cor").write_text("extra one\nextra two", encoding="latin-1")
    monkeypatch.setenv("LORDS_TEXT_DIR", str(tmp_path))
    assert assets.documents("heldout") == [f"doc {i}" for i in range(240, 250)] + ["extra one", "extra two"]
    with pytest.raises(ValueError, match="split must be"):
        assets.documents("train")


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 for c in text]}


def test_calibration_windows_come_from_the_calibration_stream():
    windows = assets.calibration_tokens(CharTokenizer(), n_samples=5, seq_len=32, seed=1)
    stream = assets.token_stream(CharTokenizer(), assets.documents("calibration"))
    assert windows.shape == (5, 32) and windows.dtype == torch.long
    text = stream.tolist()
    for window in windows.tolist():
        assert any(text[i : i + 32] == window for i in range(len(text) - 31))
    assert torch.equal(windows, assets.calibration_tokens(CharTokenizer(), 5, 32, seed=1))


def test_missing_package_names_the_install_command():
    with pytest.raises(FileNotFoundError, match="pip install nothing-here"):
        assets.package_dir("lords_no_such_package", "pip install nothing-here")


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        assets.load_pretrained(tmp_path / "nope")

"""The real-data gate: tests that need ../shared/data skip without it, and fail where it exists but lacks their file."""

import conftest
import pytest


def test_missing_shared_data_skips(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path / "absent")
    with pytest.raises(pytest.skip.Exception, match="real data lives only in"):
        conftest.shared("glas")


def test_a_missing_file_in_present_shared_data_fails(monkeypatch, tmp_path):
    monkeypatch.setattr(conftest, "SHARED_DATA", tmp_path)
    (tmp_path / "glas").mkdir()
    assert conftest.shared("glas") == tmp_path / "glas"
    with pytest.raises(pytest.fail.Exception, match="not present although"):
        conftest.shared("glas", "train_1.png")

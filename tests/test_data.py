"""interp.data: locating the shared data directory."""

import pytest

from interp import data


def test_default_points_at_shared_data_beside_the_project():
    readme = data.data_file("README.md")
    assert readme.parent == data.data_dir()
    assert "ioi" in {p.name for p in data.data_dir().iterdir()}


def test_env_override_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_DATA_DIR", str(tmp_path))
    (tmp_path / "a.json").write_text("[]")
    assert data.data_file("a.json") == tmp_path / "a.json"
    with pytest.raises(FileNotFoundError, match=r"b\.json not found.*holds: a\.json"):
        data.data_file("b.json")
    monkeypatch.setenv("INTERP_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="set INTERP_DATA_DIR"):
        data.data_dir()

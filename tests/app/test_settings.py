import re
from pathlib import Path

import pytest

from app.settings import Settings, settings_table_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_bind_loopback_with_sqlite_in_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("DATABASE_URL", raising=False)
    s = Settings(data_dir=tmp_path)
    assert s.host == "127.0.0.1"
    assert s.resolved_database_url == f"sqlite:///{tmp_path.resolve() / 'tuneboard.db'}"
    assert s.upload_max_bytes == 2 * 1024**3


def test_environment_variables_use_the_tuneboard_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEBOARD_PORT", "9123")
    monkeypatch.setenv("TUNEBOARD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://db/tuneboard")
    s = Settings()
    assert s.port == 9123
    assert s.resolved_data_dir == tmp_path.resolve()
    assert s.resolved_database_url == "postgresql+psycopg://db/tuneboard"


def test_binding_beyond_loopback_without_a_token_is_refused():
    with pytest.raises(ValueError, match="TUNEBOARD_TOKEN"):
        Settings(host="0.0.0.0")
    assert Settings(host="0.0.0.0", token="x" * 32).host == "0.0.0.0"
    assert Settings(host="::1").binds_loopback


def test_a_short_token_is_refused():
    with pytest.raises(ValueError, match="16 characters"):
        Settings(host="0.0.0.0", token="short")


def test_every_setting_is_documented_and_the_readme_table_is_current():
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no docstring"
    table = settings_table_markdown()
    readme = README.read_text()
    assert table in readme, "README's settings table is stale: run `tuneboard settings --markdown`"
    assert len(re.findall(r"^\| `TUNEBOARD_", table, re.M)) == len(Settings.model_fields)


def test_the_side_task_stall_window_comes_from_the_environment_and_must_be_positive(monkeypatch):
    assert Settings().side_task_stall_seconds == 15 * 60
    monkeypatch.setenv("TUNEBOARD_SIDE_TASK_STALL_SECONDS", "3600")
    assert Settings().side_task_stall_seconds == 3600
    for bad in ("0", "-5"):
        monkeypatch.setenv("TUNEBOARD_SIDE_TASK_STALL_SECONDS", bad)
        with pytest.raises(ValueError, match="side_task_stall_seconds"):
            Settings()

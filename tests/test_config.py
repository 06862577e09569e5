"""Settings: defaults, the TOML file, PHI_ overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import Settings, load_settings, write_settings
from appliance.errors import OperatorError


def test_defaults_without_a_file(tmp_path: Path) -> None:
    settings = load_settings(tmp_path, environ={})
    assert settings.server.port == 8080 and settings.server.host == "0.0.0.0"
    assert settings.server.limits.max_body_bytes == 4 * 1024 * 1024


def test_file_then_environment(tmp_path: Path) -> None:
    write_settings(tmp_path, Settings(site="stmarys-main"))
    (tmp_path / "gateway.toml").write_text(
        (tmp_path / "gateway.toml").read_text() + "\n[server.limits]\nmax_body_bytes = 1024\n"
    )
    env = {"PHI_SERVER__PORT": "9090", "PHI_SERVER__LIMITS__HEADER_TIMEOUT_S": "2.5", "PHI_HOME": "/x"}
    settings = load_settings(tmp_path, environ=env)
    assert settings.site == "stmarys-main"
    assert settings.server.port == 9090 and settings.server.limits.header_timeout_s == 2.5
    assert settings.server.limits.max_body_bytes == 1024


def test_unrelated_phi_variables_are_ignored(tmp_path: Path) -> None:
    assert load_settings(tmp_path, environ={"PHI_TOKEN": "x", "PHI_DEMO": "1"}).site == "unset"


def test_invalid_values_name_the_setting(tmp_path: Path) -> None:
    with pytest.raises(OperatorError, match=r"server\.port"):
        load_settings(tmp_path, environ={"PHI_SERVER__PORT": "eighty"})
    with pytest.raises(OperatorError, match=r"server\.typo"):
        load_settings(tmp_path, environ={"PHI_SERVER__TYPO": "1"})
    (tmp_path / "gateway.toml").write_text("site = [")
    with pytest.raises(OperatorError, match="not valid TOML"):
        load_settings(tmp_path, environ={})

"""Settings: sources, precedence, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.settings import SettingsError, load_settings


def test_defaults_env_file_and_flags_in_order_of_precedence(tmp_path: Path) -> None:
    config = tmp_path / "airgate.toml"
    config.write_text('port = 9000\nhost = "0.0.0.0"\nflush_interval_s = 2.5\n')
    settings = load_settings(
        {"port": 9100},
        environ={"AIRGATE_HOST": "127.0.0.2", "AIRGATE_ACCESS_LOG": "off"},
        config_file=str(config),
    )
    assert settings.port == 9100  # flag beats env and file
    assert settings.host == "127.0.0.2"  # env beats file
    assert settings.flush_interval_s == 2.5  # file beats default
    assert settings.access_log is False
    assert settings.max_attempts == 3  # default


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"AIRGATE_PROT": "1"}, "unknown environment variable AIRGATE_PROT"),
        ({"AIRGATE_PORT": "eighty"}, "port: cannot read"),
        ({"AIRGATE_PORT": "70000"}, "port must be within"),
        ({"AIRGATE_FLUSH_INTERVAL_S": "0"}, "flush_interval_s must be positive"),
        ({"AIRGATE_ADMIN_EMAIL": "a@b.c"}, "admin_email and admin_password go together"),
        ({"AIRGATE_DATABASE_URL": "mysql://x"}, "postgresql://"),
        ({"AIRGATE_LOG_LEVEL": "loud"}, "log_level"),
        ({"AIRGATE_ACCESS_LOG": "maybe"}, "access_log: cannot read"),
        ({"AIRGATE_REFUSAL_HOLD_MS": "-1"}, "refusal_hold_ms must be within"),
        ({"AIRGATE_REFUSAL_HOLD_MS": "60000"}, "refusal_hold_ms must be within"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=environ)


def test_unknown_key_in_the_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "airgate.toml"
    config.write_text("colour = 'blue'\n")
    with pytest.raises(SettingsError, match="unknown setting 'colour'"):
        load_settings(environ={}, config_file=str(config))


def test_variables_of_other_components_are_not_settings() -> None:
    settings = load_settings(environ={"AIRGATE_TEST_DATABASE_URL": "x", "AIRGATE_PG_BIN": "/x",
                                      "AIRGATE_WXPAY_MCHID": "1", "PATH": "/bin"})
    assert settings.port == 8080

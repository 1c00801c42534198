"""Settings come from the environment; a bad value stops start-up naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowgate.shared.settings import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)


def test_defaults_work_for_the_local_stack() -> None:
    settings = load_settings()
    assert settings.camunda_base_url == "http://127.0.0.1:8080/engine-rest"
    assert settings.sync_timeout_ms == 25_000
    assert settings.camunda_max_tasks == 10
    assert settings.camunda_lock_duration_ms == 20_000
    assert settings.camunda_async_response_timeout_ms == 30_000
    assert settings.complete_token is None
    assert settings.api_keys == ()


def test_seed_names_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMUNDA_BASE_URL", "http://engine:8080/engine-rest/")
    monkeypatch.setenv("SYNC_TIMEOUT_MS", "1500")
    monkeypatch.setenv("API_KEYS", " k1 , k2,, ")
    monkeypatch.setenv("COMPLETE_TOKEN", "s3cret")
    settings = load_settings()
    assert settings.camunda_base_url == "http://engine:8080/engine-rest"
    assert settings.sync_timeout_ms == 1500
    assert [key.get_secret_value() for key in settings.api_keys] == ["k1", "k2"]
    assert settings.complete_token is not None
    assert settings.complete_token.get_secret_value() == "s3cret"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SYNC_TIMEOUT_MS", "soon"),
        ("SYNC_TIMEOUT_MS", "-1"),
        ("CAMUNDA_MAX_TASKS", "0"),
        ("CAMUNDA_ASYNC_RESPONSE_TIMEOUT_MS", "1800001"),
        ("REDIS_PREFIX", "has space"),
        ("LOG_LEVEL", "loud"),
        ("WRITEBEHIND_BATCH", "10000"),  # past what one acknowledging script can take
    ],
)
def test_a_bad_value_stops_start_up_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert name in message
    assert repr(value) in message


def test_the_readme_documents_every_setting() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in readme]
    assert not missing, f"README.md's configuration table lacks {missing}"


def test_a_bad_setting_never_prints_a_credential(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAMUNDA_USERNAME", "demo")
    monkeypatch.setenv("CAMUNDA_PASSWORD", "pw-s3cr3t")
    monkeypatch.setenv("CAMUNDA_TOKEN", "tok-s3cr3t")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert "CAMUNDA_TOKEN or CAMUNDA_USERNAME/CAMUNDA_PASSWORD, not both" in message
    assert "s3cr3t" not in message

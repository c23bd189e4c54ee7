"""config.json: the original format works unchanged; every mistake gets one clear line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ingestion
from errors import ConfigError
from settings import IngestionSettings, api_token, load_settings
from conftest import build_workspace, write_config


def test_original_format_config_resolves_paths_against_its_own_folder(tmp_path, monkeypatch):
    config_path = build_workspace(tmp_path / "ws")
    monkeypatch.chdir(tmp_path)  # cron runs from elsewhere; paths must not depend on the cwd

    settings = load_settings(config_path)

    assert settings.input_folder == (tmp_path / "ws" / "sourcedata").resolve()
    assert settings.finaldata_path == (tmp_path / "ws" / "ingesteddata" / "finaldata.csv").resolve()
    assert settings.model_path.parent == (tmp_path / "ws" / "models").resolve()
    assert settings.schema.target == "exited"
    assert "corporation" not in settings.schema.features


def test_optional_sections_override_defaults(tmp_path):
    build_workspace(tmp_path)
    config_path = write_config(tmp_path, model={"C": 0.5}, drift={"tolerance": 0.01})

    settings = load_settings(config_path)

    assert settings.model.C == 0.5
    assert settings.drift.tolerance == 0.01
    assert settings.scoring.bootstrap_samples == 1000


def test_custom_schema_with_categorical_feature(tmp_path):
    build_workspace(tmp_path)
    schema = {"numeric_features": ["lastmonth_activity"], "categorical_features": ["region"]}
    settings = load_settings(write_config(tmp_path, schema=schema))

    assert settings.schema.features == ("lastmonth_activity", "region")
    assert settings.schema.count_columns == ("lastmonth_activity",)


def _broken_configs(root: Path) -> dict[str, tuple[str, str]]:
    """name -> (config text, words the error must contain)"""
    good = json.loads((root / "config.json").read_text())
    without_key = {k: v for k, v in good.items() if k != "output_model_path"}
    return {
        "malformed json": ('{"input_folder_path": "sourcedata",', "not valid JSON"),
        "missing key": (json.dumps(without_key), "output_model_path"),
        "missing input folder": (
            json.dumps({**good, "input_folder_path": "nowhere"}), "input_folder_path"
        ),
        "wrong type": (json.dumps({**good, "model": {"C": "big"}}), "model.C"),
        "unknown section key": (json.dumps({**good, "scoring": {"samples": 3}}), "samples"),
        "id used as feature": (
            json.dumps({**good, "schema": {"numeric_features": ["corporation"]}}), "twice"
        ),
        "not an object": ("[1, 2]", "JSON object"),
        "negative drift tolerance": (
            json.dumps({**good, "drift": {"tolerance": -0.1}}), "drift.tolerance"
        ),
        "misspelt section": (
            json.dumps({**good, "modle": {"C": 0.5}}), "unknown config section 'modle' .*'model'"
        ),
        "misspelt key in a section": (
            json.dumps({**good, "scoring": {"bootstrap_sample": 3}}),
            "did you mean 'bootstrap_samples'",
        ),
        "misspelt path key": (
            json.dumps({**good, "log_pth": "x.log"}), "unknown config key 'log_pth'.*'log_path'"
        ),
        "unknown section": (
            json.dumps({**good, "monitoring": {}}), "unknown config section 'monitoring' .*api"
        ),
        "port out of range": (json.dumps({**good, "api": {"port": 70000}}), "api.port"),
    }


@pytest.mark.parametrize(
    "case",
    ["malformed json", "missing key", "missing input folder", "wrong type",
     "unknown section key", "id used as feature", "not an object", "negative drift tolerance",
     "misspelt section", "misspelt key in a section", "misspelt path key", "unknown section",
     "port out of range"],
)
def test_bad_config_is_one_clear_line_and_exit_code_2(tmp_path, capsys, case):
    build_workspace(tmp_path)
    text, expected_words = _broken_configs(tmp_path)[case]
    (tmp_path / "config.json").write_text(text)

    with pytest.raises(ConfigError, match=expected_words):
        load_settings(tmp_path / "config.json")

    from errors import run_cli

    exit_code = run_cli(ingestion.main, ["--config", str(tmp_path / "config.json")])
    error_output = capsys.readouterr().err.strip().splitlines()
    assert exit_code == 2
    assert error_output[-1].startswith("error: ")
    assert "Traceback" not in "\n".join(error_output)


def test_missing_config_file_names_the_path(tmp_path, capsys):
    from errors import run_cli

    exit_code = run_cli(ingestion.main, ["--config", str(tmp_path / "absent.json")])

    assert exit_code == 2
    assert "absent.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("section", "expected_words"),
    [({"ingestion": {"chunk_rows": 0}}, "ingestion.chunk_rows must be at least 1"),
     ({"ingestion": {"settle_seconds": -1}}, "ingestion.settle_seconds must not be negative"),
     ({"lock": {"wait_seconds": -0.5}}, "lock.wait_seconds must not be negative")],
    ids=["no-rows-a-chunk", "negative-settle-time", "negative-lock-wait"],
)
def test_bad_ingestion_and_lock_settings_are_a_clear_config_error(
    tmp_path, section, expected_words
):
    build_workspace(tmp_path)

    with pytest.raises(ConfigError, match=expected_words):
        load_settings(write_config(tmp_path, **section))


def test_ingestion_and_lock_settings_have_small_defaults(tmp_path):
    build_workspace(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({
        key: value for key, value in json.loads((tmp_path / "config.json").read_text()).items()
        if key != "ingestion"
    }))

    settings = load_settings(tmp_path / "config.json")

    assert settings.ingestion == IngestionSettings(chunk_rows=200_000, settle_seconds=5.0)
    assert settings.lock.wait_seconds == 10.0


def test_unknown_top_level_key_unlike_any_section_is_ignored(tmp_path, caplog):
    build_workspace(tmp_path)

    settings = load_settings(write_config(tmp_path, comment="made by hand"))

    assert settings.model.C == 1.0
    assert "ignoring unknown config key 'comment'" in caplog.text


# --- The API token ------------------------------------------------------------------------------


@pytest.fixture
def token_settings(tmp_path, monkeypatch):
    """Settings whose api.token_file is secret.txt beside config.json; no token variable set."""
    monkeypatch.delenv("RISK_API_TOKEN", raising=False)
    build_workspace(tmp_path)
    return load_settings(write_config(tmp_path, api={"token_file": "secret.txt"}))


def write_token(settings, text: str, mode: int) -> None:
    path = settings.base_dir / "secret.txt"
    path.write_text(text)
    path.chmod(mode)


def test_token_comes_from_a_file_only_its_owner_can_read(token_settings):
    write_token(token_settings, "s3cret-token\n", 0o600)

    assert api_token(token_settings) == "s3cret-token"


def test_token_variable_takes_precedence_over_the_token_file(token_settings, monkeypatch):
    write_token(token_settings, "from-the-file", 0o600)
    monkeypatch.setenv("RISK_API_TOKEN", "from-the-variable")

    assert api_token(token_settings) == "from-the-variable"


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ("s3cret", 0o640, "can be read or changed by other users .*chmod 600"),
        ("s3cret", 0o604, "can be read or changed by other users"),
        ("  \n", 0o600, "is empty"),
        (None, None, "cannot be read"),
    ],
    ids=["group-readable", "world-readable", "empty", "absent"],
)
def test_bad_token_file_is_a_config_error(token_settings, text, mode, message):
    if text is not None:
        write_token(token_settings, text, mode)

    with pytest.raises(ConfigError, match=message):
        api_token(token_settings)


def test_empty_token_variable_is_a_config_error_not_no_token(token_settings, monkeypatch):
    monkeypatch.setenv("RISK_API_TOKEN", "")

    with pytest.raises(ConfigError, match="RISK_API_TOKEN is set but empty"):
        api_token(token_settings)

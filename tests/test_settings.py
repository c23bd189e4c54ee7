"""config.json: the original format works unchanged; every mistake gets one clear line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ingestion
from errors import ConfigError
from settings import IngestionSettings, load_settings
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
    }


@pytest.mark.parametrize(
    "case",
    ["malformed json", "missing key", "missing input folder", "wrong type",
     "unknown section key", "id used as feature", "not an object", "negative drift tolerance"],
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

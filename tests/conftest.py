"""Shared fixtures: complete workspaces in tmp_path, built from the project's own data generator.

No test touches the shipped folders. Building and deploying a model takes a few seconds, so one
deployed workspace is built per session and each test gets its own copy of it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import generate_data
from settings import Settings, load_settings

PROJECT_DIR = Path(__file__).resolve().parent.parent

SOURCE_ROWS = 600
TEST_ROWS = 400


def write_config(root: Path, **overrides) -> Path:
    """A config.json in `root` in the original format, plus any optional sections given."""
    config = {
        "input_folder_path": "sourcedata",
        "output_folder_path": "ingesteddata",
        "test_data_path": "testdata",
        "output_model_path": "models",
        "prod_deployment_path": "production_deployment",
        **overrides,
    }
    path = root / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def build_workspace(root: Path) -> Path:
    """Source data (two files), test data and a config; returns the config path."""
    root.mkdir(parents=True, exist_ok=True)
    generate_data.write_csv(
        generate_data.make_clients(SOURCE_ROWS, seed=11, id_offset=0),
        root / "sourcedata" / "batch1.csv",
    )
    generate_data.write_csv(
        generate_data.make_clients(SOURCE_ROWS, seed=12, id_offset=100_000),
        root / "sourcedata" / "batch2.csv",
    )
    generate_data.write_csv(
        generate_data.make_clients(TEST_ROWS, seed=13, id_offset=200_000),
        root / "testdata" / "testdata.csv",
    )
    return write_config(root)


def deploy_workspace(settings: Settings) -> None:
    """Run the pipeline core in-process: ingest, train, score, deploy."""
    from deployment import deploy
    from ingestion import ingest
    from scoring import score
    from training import train

    ingest(settings)
    train(settings)
    score(settings)
    deploy(settings)


def as_older_release(settings: Settings) -> None:
    """Make the current release look like one deployed before releases held model.json."""
    import atomicio
    from deployment import RELEASE_MANIFEST_NAME, current_release

    release = current_release(settings)
    (release.folder / "model.json").unlink()
    manifest = atomicio.read_json(release.folder / RELEASE_MANIFEST_NAME)
    del manifest["files"]["model.json"]
    atomicio.write_json(release.folder / RELEASE_MANIFEST_NAME, manifest)


@pytest.fixture
def workspace(tmp_path: Path) -> Settings:
    """A fresh workspace with source and test data, nothing ingested yet."""
    return load_settings(build_workspace(tmp_path / "workspace"))


@pytest.fixture(scope="session")
def _deployed_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("template") / "workspace"
    deploy_workspace(load_settings(build_workspace(root)))
    return root


@pytest.fixture
def deployed(_deployed_template: Path, tmp_path: Path) -> Settings:
    """A workspace whose data is ingested and whose model is trained, scored and deployed."""
    root = tmp_path / "workspace"
    shutil.copytree(_deployed_template, root)
    return load_settings(root / "config.json")

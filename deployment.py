"""Deployment: put the trained model, its score and the ingest record into production as one release.

Each release is a folder of its own under releases/, filled under a temporary name and renamed into
place whole. production_deployment/manifest.json names the current release and is written last, in
one atomic rename, so a reader that follows the manifest sees the old release or the new one, never a
mix. Earlier releases are kept for --rollback; loading a deployed model checks its checksum.

Deploying and rolling back hold the pipeline lock, and each starts by tidying after runs that were
killed: staging folders and temporary files are removed, and a switch of the manifest that was
never recorded is recorded. Running either again after a crash ends as an uninterrupted run would.
The report, risk list and diagnostics made from a release say which one (outputs.json), so that any
cycle can notice, cheaply, when they describe another release than the one served.

Importing this module is cheap (no pandas or scikit-learn), because fullprocess.py asks it whether
anything is deployed on its every-10-minutes fast path.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import atomicio
import records
from errors import DataError, DeploymentError, ModelNotDeployedError, run_cli
from locks import held_since, pipeline_lock
from settings import Settings, add_config_argument, load_settings

if TYPE_CHECKING:
    import argparse

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
RELEASE_MANIFEST_NAME = "release.json"
RELEASES_FOLDER = "releases"
MODEL_FILE = "trainedmodel.pkl"
# The same model as plain data; absent for a model that is not linear.
MODEL_JSON_FILE = "model.json"
METADATA_FILE = "trainedmodel.json"
SCORE_FILE = "latestscore.txt"
INGESTED_FILE = "ingestedfiles.txt"
TRAINING_SAMPLE_FILE = "trainingsample.csv"
OUTPUTS_FILE = "outputs.json"
# Release folders being filled or being removed; hidden, so no listing takes them for releases.
STAGING_PREFIX = ".staging-"
REMOVING_PREFIX = ".removing-"


class Release(NamedTuple):
    """One deployed (or deployable) set of model, metadata, score and ingest record."""

    version: str
    folder: Path
    created_at: str
    files: dict[str, str]  # file name -> sha256
    f1: float | None
    is_current: bool = False

    @property
    def model_path(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def metadata_path(self) -> Path:
        return self.folder / METADATA_FILE

    @property
    def score_path(self) -> Path:
        return self.folder / SCORE_FILE

    @property
    def ingested_files_path(self) -> Path:
        return self.folder / INGESTED_FILE

    @property
    def training_sample_path(self) -> Path:
        return self.folder / TRAINING_SAMPLE_FILE

    def metadata(self) -> dict[str, Any]:
        return atomicio.read_json(self.metadata_path)


def manifest_path(settings: Settings) -> Path:
    return settings.deployment_folder / MANIFEST_NAME


def releases_folder(settings: Settings) -> Path:
    return settings.deployment_folder / RELEASES_FOLDER


def read_manifest(settings: Settings) -> dict[str, Any] | None:
    """The production manifest, or None when nothing has been deployed."""
    path = manifest_path(settings)
    if not path.exists():
        return None
    try:
        return atomicio.read_json(path)
    except ValueError as error:
        raise DeploymentError(f"production manifest {path} is unreadable: {error}") from None


def current_release(settings: Settings) -> Release:
    """The release production serves now."""
    manifest = read_manifest(settings)
    if manifest is None:
        raise ModelNotDeployedError(
            f"no model is deployed in {settings.deployment_folder}: run ingestion.py, training.py, "
            "scoring.py and deployment.py (or fullprocess.py) first"
        )
    return _release_from_manifest(releases_folder(settings) / manifest["current"], is_current=True)


def is_deployed(settings: Settings) -> bool:
    return manifest_path(settings).exists()


def load_deployed_model(settings: Settings) -> tuple[Any, Release]:
    """The current release's model, after checking the pickle against the release's checksum."""
    from scoring import load_model  # pandas and the model's libraries only when one is loaded

    release = current_release(settings)
    verify_release(release)
    return load_model(release.model_path, release.files[MODEL_FILE]), release


def verify_release(release: Release) -> None:
    """Raise DeploymentError unless every file of the release matches its recorded checksum."""
    for name, expected in release.files.items():
        path = release.folder / name
        if not path.is_file():
            raise DeploymentError(f"release {release.version} lacks {name} in {release.folder}")
        if atomicio.sha256_of(path) != expected:
            raise DeploymentError(
                f"{path} does not match the checksum recorded for release {release.version}: "
                "redeploy or roll back"
            )


def _release_from_manifest(folder: Path, is_current: bool = False) -> Release:
    path = folder / RELEASE_MANIFEST_NAME
    if not path.is_file():
        raise DeploymentError(f"release folder {folder} has no {RELEASE_MANIFEST_NAME}")
    data = atomicio.read_json(path)
    return Release(
        version=data["version"],
        folder=folder,
        created_at=data["created_at"],
        files=data["files"],
        f1=data.get("f1"),
        is_current=is_current,
    )


def deploy(settings: Settings) -> Release:
    """Make the trained model, its score and the ingest record the current production release."""
    with pipeline_lock(settings, "deployment"):
        _tidy(settings)
        return _deploy(settings)


def _deploy(settings: Settings) -> Release:
    started = time.perf_counter()
    sources = {
        MODEL_FILE: settings.model_path,
        METADATA_FILE: settings.model_metadata_path,
        SCORE_FILE: settings.score_path,
        INGESTED_FILE: settings.ingested_files_path,
        TRAINING_SAMPLE_FILE: settings.training_sample_path,
    }
    if settings.model_json_path.is_file():
        sources[MODEL_JSON_FILE] = settings.model_json_path
    absent = [str(path) for path in sources.values() if not path.is_file()]
    if absent:
        raise DeploymentError(
            f"cannot deploy: {', '.join(absent)} missing; run ingestion.py, training.py and "
            "scoring.py first"
        )
    metadata = atomicio.read_json(settings.model_metadata_path)
    model_checksum = atomicio.sha256_of(settings.model_path)
    if metadata.get("model_sha256") not in (None, model_checksum):
        raise DeploymentError(
            f"{settings.model_path} does not match the checksum in {settings.model_metadata_path}: "
            "train again before deploying"
        )
    from scoring import read_score_file

    try:
        f1 = read_score_file(settings.score_path)
    except DataError as error:
        raise DeploymentError(f"cannot deploy: {error}") from None
    version = metadata["version"]
    release = _stage_release(settings, version, sources, f1)
    _switch_to(settings, release, action="deploy")
    records.add_stage_run(settings.records_path, "deployment", time.perf_counter() - started)
    return release


def _stage_release(
    settings: Settings, version: str, sources: dict[str, Path], f1: float
) -> Release:
    """Copy the files into a new release folder, complete before it gets its final name."""
    folder = releases_folder(settings)
    folder.mkdir(parents=True, exist_ok=True)
    checksums = {name: atomicio.sha256_of(path) for name, path in sources.items()}
    final = folder / version
    if final.exists():
        existing = _release_from_manifest(final)
        if existing.files == checksums:
            return existing
        version = f"{version}-{os.urandom(2).hex()}"
        final = folder / version
    import shutil  # here, not at the top: this module is on the cron fast path

    staging = folder / f"{STAGING_PREFIX}{version}-{os.urandom(3).hex()}"
    staging.mkdir()
    try:
        for name, path in sources.items():
            shutil.copyfile(path, staging / name)
        copied = {name: atomicio.sha256_of(staging / name) for name in sources}
        if copied != checksums:
            raise DeploymentError("a source file changed while it was being deployed; try again")
        release_manifest = {
            "version": version,
            "created_at": records.utc_now(),
            "files": checksums,
            "f1": f1,
        }
        atomicio.write_json(staging / RELEASE_MANIFEST_NAME, release_manifest)
        os.rename(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return _release_from_manifest(final)


def _switch_to(settings: Settings, release: Release, action: str) -> None:
    """Point production at `release` (the manifest is the one file readers follow) and record it."""
    manifest = read_manifest(settings) or {"history": []}
    previous = manifest.get("current")
    if previous == release.version and manifest.get("files") == release.files:
        log.info("%s: release %s is current already", action, release.version)
        place_course_files(settings, release)
        _prune(settings, manifest.get("history", []))
        return
    now = records.utc_now()
    history = manifest.get("history", []) + [
        {"version": release.version, "time": now, "action": action}
    ]
    atomicio.write_json(
        manifest_path(settings),
        {
            "current": release.version,
            "deployed_at": now,
            "f1": release.f1,
            "files": release.files,
            "history": history,
        },
    )
    records.add(
        settings.records_path,
        "deployments",
        {
            "time": now,
            "action": action,
            "version": release.version,
            "previous_version": previous,
            "f1": release.f1,
        },
    )
    log.info("%s: production now serves release %s (was %s)", action, release.version, previous)
    place_course_files(settings, release)
    _prune(settings, history)


# The files the original course's deployment step leaves directly in production_deployment/.
COURSE_FILES = (MODEL_FILE, SCORE_FILE, INGESTED_FILE)


def place_course_files(settings: Settings, release: Release) -> None:
    """Copy the served release's model, score and ingest record beside releases/, as the course
    lays them out, each replaced atomically after the manifest has switched.

    The manifest stays the truth our own readers follow; these copies are for readers written for
    the course, and always describe the release being served (rollback included).
    """
    for name in COURSE_FILES:
        source = release.folder / name
        if source.is_file():
            atomicio.copy_file(source, settings.deployment_folder / name)


def _prune(settings: Settings, history: list[dict[str, Any]]) -> None:
    """Keep the newest releases (by when they were last current), delete older ones."""
    keep = max(settings.deployment.keep_releases, 1)
    recent: list[str] = []
    for entry in reversed(history):
        if entry["version"] not in recent:
            recent.append(entry["version"])
    kept = set(recent[:keep])
    for release in list_releases(settings):
        if release.version not in kept and not release.is_current:
            _remove_release_folder(release.folder)
            log.info("removed old release %s", release.version)


def _remove_release_folder(folder: Path) -> None:
    """Hide the folder in one rename, then delete it: a run killed halfway leaves a hidden folder
    for the next one to finish, never a release that lacks files."""
    import shutil

    hidden = folder.with_name(f"{REMOVING_PREFIX}{folder.name}-{os.urandom(3).hex()}")
    os.rename(folder, hidden)
    shutil.rmtree(hidden)


def _tidy(settings: Settings) -> None:
    """Clear up after deployments and rollbacks that were killed (the caller holds the lock).

    Staging folders, half-removed releases and temporary files go when older than this run's hold
    of the lock; a manifest switch that was never recorded is recorded.
    """
    import shutil

    since = held_since(settings) or 0.0
    folder = releases_folder(settings)
    if folder.is_dir():
        for leftover in folder.iterdir():
            if (
                leftover.name.startswith((STAGING_PREFIX, REMOVING_PREFIX))
                and leftover.stat().st_mtime < since
            ):
                shutil.rmtree(leftover)
                log.info("removed %s, left by a deployment that was stopped", leftover.name)
    if settings.deployment_folder.is_dir():
        for leftover in atomicio.remove_leftovers(settings.deployment_folder, since):
            log.info("removed %s, left by a run that was stopped", leftover.name)
    _record_unrecorded_switch(settings)


def _record_unrecorded_switch(settings: Settings) -> None:
    """Record the manifest's last switch if a run was stopped between making and recording it."""
    manifest = read_manifest(settings)
    if manifest is None or not manifest.get("history"):
        return
    last = records.query(
        settings.records_path, "SELECT version FROM deployments ORDER BY id DESC LIMIT 1"
    )
    if last and last[0]["version"] == manifest["current"]:
        return
    history = manifest["history"]
    switch = history[-1]
    records.add(
        settings.records_path,
        "deployments",
        {
            "time": switch["time"],
            "action": switch["action"],
            "version": switch["version"],
            "previous_version": history[-2]["version"] if len(history) > 1 else None,
            "f1": manifest.get("f1"),
        },
    )
    log.warning(
        "recorded the %s of release %s: the run that made it was stopped before recording it",
        switch["action"], switch["version"],
    )


def list_releases(settings: Settings) -> list[Release]:
    """Every kept release, oldest first, the current one marked."""
    folder = releases_folder(settings)
    if not folder.is_dir():
        return []
    manifest = read_manifest(settings) or {}
    current = manifest.get("current")
    releases = [
        _release_from_manifest(path, is_current=path.name == current)
        for path in folder.iterdir()
        if path.is_dir() and not path.name.startswith(".")
    ]
    return sorted(releases, key=lambda r: (r.created_at, r.version))


def rollback(settings: Settings, version: str | None = None) -> Release:
    """Make an earlier release current again: `version`, or the one served before the current."""
    with pipeline_lock(settings, "rollback"):
        _tidy(settings)
        return _rollback(settings, version)


def _rollback(settings: Settings, version: str | None) -> Release:
    manifest = read_manifest(settings)
    if manifest is None:
        raise ModelNotDeployedError("nothing is deployed, so there is nothing to roll back")
    current = manifest["current"]
    available = {r.version: r for r in list_releases(settings)}
    if version is None:
        earlier = [
            e["version"] for e in reversed(manifest.get("history", []))
            if e["version"] != current and e["version"] in available
        ]
        if not earlier:
            raise DeploymentError("no earlier release is kept to roll back to")
        version = earlier[0]
    if version not in available:
        raise DeploymentError(
            f"no release {version!r}; kept releases: {', '.join(sorted(available)) or 'none'}"
        )
    release = available[version]
    verify_release(release)
    _switch_to(settings, release, action="rollback")
    return release


def served_version(settings: Settings) -> str | None:
    """The version production serves, or None when nothing is deployed."""
    manifest = read_manifest(settings)
    return None if manifest is None else manifest["current"]


def derived_outputs(settings: Settings) -> dict[str, Path | None]:
    """What is made from the served release, by name: reporting.py's files, and the recorded
    diagnostics (no file) that the report includes."""
    return {
        settings.report_path.name: settings.report_path,
        settings.confusion_matrix_path.name: settings.confusion_matrix_path,
        settings.risk_scores_path.name: settings.risk_scores_path,
        "diagnostics": None,
    }


def record_outputs(settings: Settings, version: str) -> None:
    """Note that the derived outputs now describe release `version` (reporting.py, once it has
    written them all)."""
    atomicio.write_json(
        settings.deployment_folder / OUTPUTS_FILE,
        {
            "release": version,
            "time": records.utc_now(),
            "outputs": dict.fromkeys(derived_outputs(settings), version),
        },
    )


def outputs_out_of_step(settings: Settings) -> dict[str, str | None]:
    """The derived outputs that do not describe the served release, each with the release it
    describes (None: missing, or unknown). Empty when all match, or when nothing is deployed.

    A stat of each output and two small JSON reads: cheap enough for the cron no-op cycle.
    """
    if not is_deployed(settings):
        return {}
    served = served_version(settings)
    described = described_outputs(settings)
    out_of_step = {}
    for name, path in derived_outputs(settings).items():
        version = described.get(name) if path is None or path.exists() else None
        if version != served:
            out_of_step[name] = version
    return out_of_step


def described_outputs(settings: Settings) -> dict[str, str]:
    """The release each derived output was last made for, by output name (outputs.json); empty
    when none was recorded or the file is unreadable."""
    try:
        return dict(atomicio.read_json(settings.deployment_folder / OUTPUTS_FILE)["outputs"])
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError) as error:
        log.warning("%s is unreadable (%s): every output is out of step", OUTPUTS_FILE, error)
        return {}


# The cycle decisions that deploy a release (fullprocess.py), by which the report and the pages find
# the cycle that put a release in production.
DEPLOYING_DECISIONS = ("first-deployment", "drift-redeployed", "forced-redeploy")

def last_deployment(settings: Settings, version: str) -> dict[str, Any] | None:
    """The newest record of `version` being deployed or rolled back to (its action says which)."""
    rows = records.query(
        settings.records_path,
        "SELECT * FROM deployments WHERE version = ? ORDER BY id DESC LIMIT 1", (version,),
    )
    return rows[0] if rows else None


def deploying_cycle(settings: Settings, version: str) -> dict[str, Any] | None:
    """The newest cycle that deployed `version`; None if it was deployed by hand."""
    rows = records.query(
        settings.records_path,
        f"SELECT * FROM cycles WHERE release = ? AND decision IN "
        f"({', '.join('?' * len(DEPLOYING_DECISIONS))}) ORDER BY id DESC LIMIT 1",
        (version, *DEPLOYING_DECISIONS),
    )
    return rows[0] if rows else None


# What each recorded score purpose was measured on, in the words people read.
MEASURED_ON = {
    "test": "the test data",
    "drift-holdout": "held-out new rows",
    "drift-check": "the new batch",
}


def release_score(settings: Settings, version: str) -> dict[str, Any] | None:
    """The score a release was deployed with: its held-out figure, or else its test data one."""
    rows = records.query(
        settings.records_path,
        "SELECT * FROM scores WHERE model_version = ? AND purpose IN ('test', 'drift-holdout') "
        "ORDER BY purpose = 'drift-holdout' DESC, id DESC LIMIT 1",
        (version,),
    )
    return rows[0] if rows else None


def describe_release_score(score: dict[str, Any] | None, f1: float | None = None) -> str:
    """'0.370 on held-out new rows (600 rows; interval 0.31 to 0.43)': F1 as people read it."""
    if score is None:
        return "-" if f1 is None else f"{f1:.3f}"
    interval = (
        "" if score.get("f1_low") is None
        else f"; interval {score['f1_low']:.3f} to {score['f1_high']:.3f}"
    )
    return (
        f"{score['f1']:.3f} on {MEASURED_ON.get(score['purpose'], score['purpose'])} "
        f"({score['rows']:,} rows{interval})"
    )


def describe_releases(releases: list[Release], settings: Settings | None = None) -> str:
    """The kept releases, one a line, each F1 with what it was measured on."""
    if not releases:
        return "No releases deployed yet."
    lines = [f"{'':2}{'version':<32} {'created (UTC)':<26} F1 at release"]
    for release in releases:
        score = release_score(settings, release.version) if settings else None
        marker = "* " if release.is_current else "  "
        lines.append(
            f"{marker}{release.version:<32} {release.created_at:<26} "
            f"{describe_release_score(score, release.f1)}"
        )
    lines.append("(* = current)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    import argparse  # here, not at the top: fullprocess.py imports this module on its fast path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_argument(parser)
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--list", action="store_true", help="list the kept releases")
    action.add_argument(
        "--rollback", nargs="?", const="", metavar="VERSION",
        help="make an earlier release current (default: the one before the current)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings(args.config)
    if args.list:
        print(describe_releases(list_releases(settings), settings))
    elif args.rollback is not None:
        import reporting  # the risk list and the report follow the release served

        with pipeline_lock(settings, "rollback"):  # one hold: no cycle runs between the two
            release = rollback(settings, args.rollback or None)
            print(
                f"Rolled back: production now serves release {release.version} (F1 "
                f"{describe_release_score(release_score(settings, release.version), release.f1)})"
            )
            print(reporting.build_report(settings).summary())
    else:
        release = deploy(settings)
        print(
            f"Deployed release {release.version} (F1 "
            f"{describe_release_score(release_score(settings, release.version), release.f1)}) to "
            f"{release.folder}; manifest {manifest_path(settings)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

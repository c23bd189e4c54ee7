"""How long ranking the current clients with reasons takes, and how much memory: the risk list.

    python benchmarks/call_list.py [--clients 10000 1000000] [--runs 3]

For each size it builds a workspace in a temporary folder: a model deployed from a small labeled
batch, then a labeled batch of N clients and a roster of those who stayed plus new clients, so
that exactly N clients are current. It then times, each in a fresh process (a cycle has pandas and
scikit-learn imported already, so imports are not counted):

- first list: rebuild_call_list with no earlier list;
- next list: a labeled batch with the outcomes of a tenth of the roster arrives; the rebuild
  compares with the earlier list and records that list's track record.

Wall and CPU seconds are medians of --runs (CPU time counts every thread, so it can exceed the
wall time; on a busy machine it is the steadier figure); peak memory is the child's maximum
resident size, imports included. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

MEASURE = """
import json, resource, sys, time
sys.path.insert(0, {project!r})
import calllist, dataset, deployment, scoring, settings, training  # a cycle has them imported
chosen = settings.load_settings({config!r})
started, cpu = time.perf_counter(), time.process_time()
result = calllist.rebuild_call_list(chosen)
print(json.dumps({{"seconds": time.perf_counter() - started, "ranked": result.ranked,
                  "cpu_seconds": time.process_time() - cpu,
                  "results": len(result.results),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def build(root: Path, clients: int) -> tuple[Path, object]:
    """A deployed workspace whose data makes `clients` current clients; returns its config."""
    import generate_data
    from deployment import deploy
    from ingestion import ingest
    from scoring import score
    from settings import load_settings
    from training import train

    first = generate_data.make_clients(2000, seed=1)
    generate_data.write_csv(first, root / "source" / "a.csv")
    generate_data.write_csv(generate_data.make_clients(1000, seed=2, id_offset=10_000),
                            root / "test" / "test.csv")
    config = root / "config.json"
    config.write_text(json.dumps({
        "input_folder_path": "source", "output_folder_path": "ingested",
        "test_data_path": "test", "output_model_path": "models",
        "prod_deployment_path": "production",
        # Each file is written whole before ingestion reads it: nothing to wait for.
        "ingestion": {"settle_seconds": 0},
    }))
    chosen = load_settings(config)
    ingest(chosen)
    train(chosen)
    score(chosen)
    deploy(chosen)
    batch = generate_data.make_clients(clients, seed=3, id_offset=100_000)
    # The stayers of both batches are current; new clients on the roster make up the rest.
    stayers = int((batch["exited"] == 0).sum() + (first["exited"] == 0).sum())
    roster = generate_data.make_roster(
        batch, seed=4, new_clients=clients - stayers, id_offset=100_000 + clients
    )
    generate_data.write_csv(batch, root / "source" / "b.csv")
    generate_data.write_csv(roster.frame, root / "source" / "c_roster.csv")
    ingest(chosen)
    return config, roster


def add_outcomes(root: Path, roster) -> None:
    import generate_data

    outcomes = generate_data.make_outcomes(roster, seed=5)
    generate_data.write_csv(outcomes.iloc[: len(outcomes) // 10], root / "source" / "d.csv")
    from ingestion import ingest
    from settings import load_settings

    ingest(load_settings(root / "config.json"))


def measure(config: Path) -> dict:
    started = time.perf_counter()
    answer = subprocess.run(
        [sys.executable, "-c", MEASURE.format(project=str(PROJECT_DIR), config=str(config))],
        check=True, capture_output=True, text=True,
    )
    figures = json.loads(answer.stdout.strip().splitlines()[-1])
    figures["process_seconds"] = time.perf_counter() - started
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for clients in sorted(args.clients):
        first, following = [], []
        for _ in range(args.runs):
            root = Path(tempfile.mkdtemp(prefix="calllist-bench-"))
            try:
                config, roster = build(root, clients)
                first.append(measure(config))
                add_outcomes(root, roster)
                following.append(measure(config))
            finally:
                shutil.rmtree(root)
        for label, runs in (("first list", first), ("next list", following)):
            seconds = statistics.median(run["seconds"] for run in runs)
            cpu = statistics.median(run["cpu_seconds"] for run in runs)
            process = statistics.median(run["process_seconds"] for run in runs)
            print(
                f"{clients:>9,} clients, {label}: {seconds:.2f} s in the function ({cpu:.2f} s "
                f"of CPU; process {process:.2f} s), peak "
                f"{max(run['peak_mb'] for run in runs):.0f} MB, "
                f"{runs[0]['ranked']:,} ranked, {runs[0]['results']} track record(s)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of the pages: latency of the call list and of a client's page, by size of the list.

    .venv/bin/python benchmarks/pages.py [--sizes 10000,1000000] [--requests 200]

For each size it makes a workspace of that many clients in a scratch folder, runs the stages as a
user does (ingestion, training, scoring, deployment, diagnostics, reporting), serves it with
gunicorn (2 workers) on 127.0.0.1, opens every kind of page once per worker so that each has
indexed the list, then times requests: `/` at random pages of the whole list, `/clients/<id>` of
random clients, a search by the start of an id, and `/model`. Prints p50 and p95 in milliseconds;
the targets are `/` and `/clients/<id>` under 50 ms p50 at 10,000 clients and under 200 ms at
1,000,000. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

import generate_data  # noqa: E402

PYTHON = sys.executable
STAGES = [
    ["ingestion.py"], ["training.py"], ["scoring.py"], ["deployment.py"],
    ["diagnostics.py", "--no-dependencies"], ["reporting.py"],
]
TARGET_P50_MS = {10_000: 50.0, 1_000_000: 200.0}
WARM_UP_REQUESTS = 8  # per kind of page: enough for both workers to index the list


def make_workspace(root: Path, clients: int) -> Path:
    """Data of `clients` clients, test data and a config; then every stage, as a user runs it."""
    generate_data.write_csv(generate_data.make_clients(clients, seed=1),
                            root / "sourcedata" / "clients.csv")
    generate_data.write_csv(
        generate_data.make_clients(max(clients // 5, 2000), seed=3, id_offset=50_000_000),
        root / "testdata" / "testdata.csv",
    )
    config = root / "config.json"
    config.write_text(json.dumps({
        "input_folder_path": "sourcedata",
        "output_folder_path": "ingesteddata",
        "test_data_path": "testdata",
        "output_model_path": "models",
        "prod_deployment_path": "production_deployment",
    }))
    for stage in STAGES:
        subprocess.run([PYTHON, str(PROJECT_DIR / stage[0]), "--config", str(config), *stage[1:]],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return config


def get(port: int, path: str) -> float:
    """GET a page; the milliseconds it took to answer in full."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        started = time.perf_counter()
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        elapsed = (time.perf_counter() - started) * 1000
    finally:
        connection.close()
    if response.status not in (200, 302):
        raise RuntimeError(f"GET {path} answered {response.status}")
    return elapsed


def percentiles(timings: list[float]) -> dict[str, float]:
    timings = sorted(timings)
    return {"p50_ms": round(statistics.median(timings), 1),
            "p95_ms": round(timings[int(0.95 * (len(timings) - 1))], 1)}


def bench_size(clients: int, requests: int, scratch: Path) -> dict[str, dict[str, float]]:
    root = scratch / f"pages-{clients}"
    config = make_workspace(root, clients)
    ids = [line.split(",")[1] for line in
           (root / "production_deployment" / "riskscores.csv").read_text().splitlines()[1:]]
    pages_count = -(-len(ids) // 100)
    rng = random.Random(0)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RISK_CONFIG": str(config)}
    env.pop("RISK_API_TOKEN", None)
    server = subprocess.Popen(
        [PYTHON, "-m", "gunicorn", "--workers", "2", "--bind", f"127.0.0.1:{port}",
         "--timeout", "300", "--log-level", "warning", "wsgi:app"],
        cwd=PROJECT_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    kinds = {
        "/ (a random page)": lambda: f"/?page={rng.randint(1, pages_count)}",
        "/clients/<id>": lambda: f"/clients/{quote(rng.choice(ids))}",
        "/?q= (start of an id)": lambda: f"/?q={rng.choice(ids)[:3]}",
        "/model": lambda: "/model",
    }
    try:
        for _ in range(600):
            try:
                get(port, "/health")
                break
            except OSError:
                time.sleep(0.1)
        first = {kind: get(port, path()) for kind, path in kinds.items()}
        for path in kinds.values():
            for _ in range(WARM_UP_REQUESTS):
                get(port, path())
        results = {kind: {**percentiles([get(port, path()) for _ in range(requests)]),
                          "first_ms": round(first[kind], 1)}
                   for kind, path in kinds.items()}
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,1000000")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pages-benchmark-") as scratch:
        for clients in (int(size) for size in args.sizes.split(",")):
            results = bench_size(clients, args.requests, Path(scratch))
            target = TARGET_P50_MS.get(clients)
            print(f"\n{clients:,} clients (gunicorn, 2 workers, 127.0.0.1; "
                  f"target p50 {target or '-'} ms for / and /clients/<id>):")
            for kind, figures in results.items():
                print(f"  {kind:<24} p50 {figures['p50_ms']:>7.1f} ms   "
                      f"p95 {figures['p95_ms']:>7.1f} ms   "
                      f"first request {figures['first_ms']:>8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())

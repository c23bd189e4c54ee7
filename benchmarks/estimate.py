"""How long estimating the served model's performance on a roster adds to a cycle.

    python benchmarks/estimate.py [--clients 10000] [--runs 5]

Builds a workspace in a temporary folder (a model deployed from a small labeled batch), then times
what the cycle does for a roster of N clients, in process (a cycle has pandas and scikit-learn
imported already): the estimate alone (scoring.estimate_performance on the probabilities) and the
whole step (estimation.estimate_roster: predictions, estimate, covariate drift, records). Medians
of --runs. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import generate_data  # noqa: E402
from settings import load_settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)

    from deployment import deploy
    from estimation import estimate_roster
    from ingestion import ingest
    from scoring import estimate_performance, linear_scorer, predict_frame, score
    from training import train

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        generate_data.write_csv(generate_data.make_clients(5000, 1), root / "in" / "batch.csv")
        generate_data.write_csv(generate_data.make_clients(1000, 2, id_offset=10**6),
                                root / "test" / "test.csv")
        (root / "config.json").write_text(
            '{"input_folder_path": "in", "output_folder_path": "out", "test_data_path": "test",'
            ' "output_model_path": "model", "prod_deployment_path": "prod",'
            ' "ingestion": {"settle_seconds": 0}}'
        )
        settings = load_settings(root / "config.json")
        ingest(settings)
        result = train(settings)
        score(settings)
        deploy(settings)
        roster = generate_data.make_clients(args.clients, 3, id_offset=2 * 10**6).drop(
            columns="exited")
        probabilities = predict_frame(result.model, "", roster, settings.schema).probabilities
        threshold = linear_scorer(result.model).threshold
        estimate_only, whole_step = [], []
        for _ in range(args.runs):
            started = time.perf_counter()
            estimate_performance(probabilities, threshold, settings.scoring)
            estimate_only.append(time.perf_counter() - started)
            started = time.perf_counter()
            estimate_roster(settings, roster, "roster.csv")
            whole_step.append(time.perf_counter() - started)
    print(f"{args.clients} clients: estimate {statistics.median(estimate_only):.3f} s, "
          f"whole step (predict, estimate, drift, record) {statistics.median(whole_step):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

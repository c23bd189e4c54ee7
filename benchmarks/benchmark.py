"""Benchmark: speed, memory and scale of every stage, the cron cycle and the API, against their floors.

    .venv/bin/python benchmarks/benchmark.py [--sizes 10000,100000,1000000] [--runs 5] [--no-api]

Each stage runs as a whole process, the way a user runs it (`python ingestion.py --config ...`), on
data made by generate_data.py in a scratch folder; peak memory is the child's maximum resident set
(wait4). These machines are shared and their speed drifts from minute to minute, so every figure is
paired with its floor, measured alternately with it (A B A B ...): a process that only imports
what the stage or cycle uses (`python -c pass` for the no-op cycle), or the API's /health for a
request. Each pair gives a ratio; the table shows the median figure, the median ratio and the
ratios' range. The API is served by gunicorn with 2 workers on 127.0.0.1. Prints a table and writes
the same figures to benchmarks/results/benchmark.json. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_DIR))

import generate_data  # noqa: E402

PYTHON = sys.executable
RESULTS_PATH = PROJECT_DIR / "benchmarks" / "results" / "benchmark.json"
STAGES = ("ingestion", "training", "scoring", "deployment", "diagnostics", "reporting")
# Writing a PNG loads these Pillow plugins, and pandas.to_csv its writer.
PNG_AND_CSV = (
    "PIL.PngImagePlugin, PIL.BmpImagePlugin, PIL.GifImagePlugin, PIL.JpegImagePlugin, "
    "PIL.PpmImagePlugin, pandas.io.formats.csvs"
)
# What a drift cycle uses: our modules, scikit-learn (retraining; narwhals is how it reads a
# pandas frame), scipy.stats (the drift tests), matplotlib's PNG back end (the report's PDF is
# written by reportpdf.py), and the codecs and modules the standard library loads on the way
# (zip file names in .npz, the PDF's WinAnsi text, a CSV's byte-order mark, requests' netrc).
CYCLE_IMPORTS = (
    "fullprocess, ingestion, training, scoring, deployment, diagnostics, reporting, apicalls, "
    "alerts, estimation, encodings.cp437, encodings.cp1252, encodings.utf_8_sig, netrc, "
    "scipy.stats, scipy.spatial.distance, statistics, narwhals._pandas_like.dataframe, "
    "narwhals._pandas_like.namespace, narwhals._interchange.dataframe, "
    f"narwhals.stable.v2._namespace, matplotlib.backends.backend_agg, {PNG_AND_CSV}"
)
# Each stage's floor: a process importing what the stage uses, its own module and the libraries
# it loads while it works (several load them inside functions, to keep other paths light).
# scoring's floor is pandas and numpy alone: it scores model.json without scikit-learn.
STAGE_IMPORTS = {stage: stage for stage in STAGES} | {
    "ingestion": "ingestion, pandas",
    "scoring": "pandas, numpy",
    "deployment": "deployment, scoring",  # scoring reads latestscore.txt
    "diagnostics": "diagnostics",  # scipy only for samples of at most 1,000 rows
    "reporting": f"reporting, matplotlib.backends.backend_agg, {PNG_AND_CSV}",
}
# The server's master runs gunicorn and imports the app, which counts requests with
# prometheus_client; the workers it forks start with all of it.
# Time for the throughput clients' processes to start before they send together.
CLIENT_START_SECONDS = 5.0
API_SERVER_IMPORTS = "flask, pandas, numpy, gunicorn.app.base, prometheus_client"
TARGETS = {
    "noop_cycle_ratio": 5.0,
    "drift_cycle_ratio": 1.3,
    "scoring_10000_ratio": 1.3,
    "million_pipeline_seconds": 15.0,
    "million_pipeline_peak_mb": 1536.0,
    "million_diagnostics_seconds": 3.0,
    "million_risk_list_seconds": 3.0,
    "api_worker_ready_seconds": 0.5,
    "api_predict_1_p50_ms": 5.0,
    "api_predict_10000_p50_ms": 150.0,
    "api_diagnostics_p50_ms": 50.0,
    "api_predictions_per_second": 500.0,
}


@dataclass
class Measurement:
    """Wall seconds of each run and of the floor run after it; the largest peak memory of any."""

    label: str
    seconds: list[float] = field(default_factory=list)
    peak_mb: float = 0.0
    floor: str | None = None
    floor_runs: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def floor_seconds(self) -> float | None:
        return statistics.median(self.floor_runs) if self.floor_runs else None

    @property
    def ratios(self) -> list[float]:
        """Each run against the floor run paired with it."""
        return [run / floor for run, floor in zip(self.seconds, self.floor_runs, strict=False)]

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratios) if self.floor_runs else None

    def ratio_text(self) -> str:
        if not self.floor_runs:
            return ""
        ratios = self.ratios
        return f"{self.ratio:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "median": self.median, "floor_seconds": self.floor_seconds,
                "ratios": self.ratios, "ratio": self.ratio}


# Times one command and reads its peak memory. Linux carries a process's peak resident size across
# exec, and a child spawned from this benchmark (large: it holds generated data) would report this
# process's size; a child forked from a small launcher starts from the launcher's few megabytes.
LAUNCHER = """
import os, sys, time
started = time.perf_counter()
child = os.fork()
if child == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the command's own output is not measured
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(child, 0)
print(time.perf_counter() - started, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def run_process(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run one process to completion; its wall seconds and peak resident memory in MB."""
    with tempfile.TemporaryFile() as errors:
        done = subprocess.run(
            [PYTHON, "-c", LAUNCHER, *argv], env=env, stdout=subprocess.PIPE, stderr=errors,
            text=True, check=True,
        )
        seconds, peak_kib, exit_code = done.stdout.split()
        if int(exit_code) != 0:
            errors.seek(0)
            tail = errors.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{' '.join(argv)} failed ({exit_code}):\n{tail}")
    return float(seconds), int(peak_kib) / 1024  # ru_maxrss is in KiB on Linux


def measure(
    label: str, argv: list[str], runs: int, reset=None, env=None, floor: str | None = None
) -> Measurement:
    """Run `argv` `runs` times; with a floor (Python code), run it after each run: A B A B ..."""
    result = Measurement(label, floor=floor and _floor_label(floor))
    for _ in range(runs):
        if reset:
            reset()
        seconds, peak = run_process(argv, env)
        result.seconds.append(seconds)
        result.peak_mb = max(result.peak_mb, peak)
        if floor is not None:
            result.floor_runs.append(run_process([PYTHON, "-c", floor], env)[0])
    return result


def importing(modules: str) -> str:
    """The floor of a process that uses `modules`: one that imports them and does nothing else."""
    return f"import {modules}"


def _floor_label(code: str) -> str:
    return "python -c pass" if code == "pass" else code


def benchmark_env(workspace: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["RISK_CONFIG"] = str(workspace / "config.json")
    # The dependency check is served from its cache after the first cycle; never wait on the index.
    env.setdefault("PIP_RETRIES", "0")
    return env


def make_workspace(root: Path, rows: int, api_url: str = "http://127.0.0.1:9") -> Path:
    """Source data of `rows` clients in two files, test data of a fifth as many, and a config."""
    if root.exists():
        shutil.rmtree(root)
    half = rows // 2
    generate_data.write_csv(generate_data.make_clients(half, seed=1, id_offset=0),
                            root / "sourcedata" / "part1.csv")
    generate_data.write_csv(generate_data.make_clients(rows - half, seed=2, id_offset=half),
                            root / "sourcedata" / "part2.csv")
    generate_data.write_csv(
        generate_data.make_clients(max(rows // 5, 2000), seed=3, id_offset=50_000_000),
        root / "testdata" / "testdata.csv",
    )
    config = {
        "input_folder_path": "sourcedata",
        "output_folder_path": "ingesteddata",
        "test_data_path": "testdata",
        "output_model_path": "models",
        "prod_deployment_path": "production_deployment",
        "log_path": "logs/fullprocess.log",
        "api": {"base_url": api_url},
        # Each file is written whole before any run reads it: nothing to wait for.
        "ingestion": {"settle_seconds": 0},
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return root


def stage_argv(stage: str, workspace: Path) -> list[str]:
    return [PYTHON, str(PROJECT_DIR / f"{stage}.py"), "--config", str(workspace / "config.json")]


def bench_stages(rows: int, runs: int, scratch: Path) -> dict:
    """Every stage as a process on `rows` clients, and ingestion + training + scoring together."""
    workspace = make_workspace(scratch / f"stages-{rows}", rows)
    env = benchmark_env(workspace)

    def clean_outputs() -> None:
        for name in ("ingesteddata", "models", "production_deployment"):
            shutil.rmtree(workspace / name, ignore_errors=True)

    stage_runs = runs if rows <= 100_000 else max(1, min(runs, 3))
    results: dict[str, Measurement] = {}
    results["ingestion"] = measure(
        "ingestion", stage_argv("ingestion", workspace), stage_runs, clean_outputs, env,
        floor=importing(STAGE_IMPORTS["ingestion"]),
    )
    def new_model() -> None:
        """A model trained and scored anew: each deployment then deploys a new release (the
        served one again is a no-op)."""
        for stage in ("training", "scoring"):
            run_process(stage_argv(stage, workspace), env)

    def list_of_older_data() -> None:
        """The risk list on disk recorded as one of older data, as after new rows arrived: each
        report then ranks the clients again, as a cycle's does."""
        with sqlite3.connect(workspace / "ingesteddata" / "records.sqlite") as connection:
            connection.execute("UPDATE call_lists SET data_stamp = 'older data'")

    resets = {"deployment": new_model, "reporting": list_of_older_data}
    for stage in STAGES[1:]:
        if stage == "diagnostics":
            run_process(stage_argv("diagnostics", workspace), env)  # fill the cache
        if stage == "reporting":
            run_process(stage_argv("reporting", workspace), env)  # the first list of this data
        results[stage] = measure(
            stage, stage_argv(stage, workspace), stage_runs, resets.get(stage), env,
            floor=importing(STAGE_IMPORTS[stage]),
        )
    risk_list = measure_risk_list(workspace, stage_runs)
    pipeline_seconds = sum(results[s].median for s in ("ingestion", "training", "scoring"))
    pipeline_peak = max(results[s].peak_mb for s in ("ingestion", "training", "scoring"))
    return {
        "rows": rows,
        "stages": {name: m.as_dict() for name, m in results.items()},
        "ingest_train_score_seconds": pipeline_seconds,
        "ingest_train_score_peak_mb": pipeline_peak,
        "risk_list": risk_list,
    }


# The risk list made again, as a cycle makes it after new data arrived: the list on disk is
# recorded as one of older data, and the new one is compared with it. A cycle has the modules
# imported already, so only the work is timed.
RISK_LIST = """
import sqlite3, sys, time
sys.path.insert(0, {project!r})
import calllist, dataset, deployment, scoring, settings
chosen = settings.load_settings({config!r})
with sqlite3.connect(chosen.records_path) as connection:
    connection.execute("UPDATE call_lists SET data_stamp = 'older data'")
started = time.perf_counter()
listed = calllist.rebuild_call_list(chosen)
print(time.perf_counter() - started, listed.ranked)
"""


def measure_risk_list(workspace: Path, runs: int) -> dict[str, Any]:
    """Seconds rebuild_call_list takes in a process that has imported what it uses."""
    code = RISK_LIST.format(project=str(PROJECT_DIR), config=str(workspace / "config.json"))
    seconds, ranked = [], 0
    for _ in range(runs):
        answer = subprocess.run([PYTHON, "-c", code], check=True, capture_output=True, text=True)
        taken, ranked_text = answer.stdout.split()
        seconds.append(float(taken))
        ranked = int(ranked_text)
    return {"seconds": seconds, "median": statistics.median(seconds), "ranked": ranked}


def bench_cycles(runs: int, scratch: Path) -> dict:
    """The cron no-op cycle and a full drift cycle on 10,000 clients, each as a whole process."""
    template = make_workspace(scratch / "cycle-template", 10_000)
    env = benchmark_env(template)
    # As cronjob.txt runs it: `-m` uses the compiled module, a script path would be compiled anew.
    cycle = [PYTHON, "-m", "fullprocess", "--config", str(template / "config.json")]
    run_process(cycle, env)  # first deployment, report, dependency cache
    noop = measure("cron no-op cycle", cycle, max(runs * 6, 30), env=env, floor="pass")

    work = scratch / "cycle-run"
    work_cycle = [PYTHON, "-m", "fullprocess", "--config", str(work / "config.json")]
    drifted = generate_data.make_clients(2_000, seed=9, drifted=True, id_offset=90_000_000)

    def fresh_drifted_workspace() -> None:
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(template, work)
        generate_data.write_csv(drifted, work / "sourcedata" / "drifted.csv")

    drift = measure("full drift cycle (10,000 clients)", work_cycle, max(runs, 7),
                    fresh_drifted_workspace, benchmark_env(work), floor=importing(CYCLE_IMPORTS))
    decision = _last_cycle_decision(work)
    return {"noop": noop.as_dict(), "drift": drift.as_dict(), "drift_decision": decision}


def _last_cycle_decision(workspace: Path) -> str:
    with sqlite3.connect(workspace / "ingesteddata" / "records.sqlite") as connection:
        row = connection.execute("SELECT decision FROM cycles ORDER BY id DESC LIMIT 1").fetchone()
    return row[0] if row else "none"


# ---------------------------------------------------------------------------------------------
# API


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None,
            content_type: str = "application/json") -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Content-Type": content_type} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def timed_request(port: int, method: str, path: str, body: bytes | None) -> float:
    """Milliseconds one request takes, from connecting to the last byte of the answer."""
    started = time.perf_counter()
    status, payload = request(port, method, path, body)
    elapsed = (time.perf_counter() - started) * 1000
    if status != 200:
        raise RuntimeError(f"{method} {path} answered {status}: {payload[:300]!r}")
    return elapsed


def latency(port: int, method: str, path: str, body: bytes | None, count: int) -> dict[str, float]:
    """p50 and p95 of `count` requests, each followed by GET /health: the floor of any answer."""
    timings, floors = [], []
    for _ in range(count):
        timings.append(timed_request(port, method, path, body))
        floors.append(timed_request(port, "GET", "/health", None))
    ratios = [t / f for t, f in zip(timings, floors, strict=True)]
    return {
        "requests": count,
        "p50_ms": statistics.median(timings),
        "p95_ms": statistics.quantiles(timings, n=20)[18],
        "floor_p50_ms": statistics.median(floors),
        "ratio": statistics.median(ratios),
    }


def _throughput_client(args: tuple[int, bytes, float, float]) -> int:
    """One client's requests between `start` and `start + seconds` (clocks of one machine).

    Each request is sent prepared, as bytes, over a new connection, and its answer read to the
    end: http.client spent more CPU parsing each answer than the server took to make it, so the
    figure measured the clients.
    """
    port, message, start, seconds = args
    time.sleep(max(0.0, start - time.time()))
    done = 0
    deadline = start + seconds
    while time.time() < deadline:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
            connection.sendall(message)
            answer = bytearray()
            while chunk := connection.recv(65536):
                answer += chunk
        if answer.startswith(b"HTTP/1.1 200 "):
            done += 1
    return done


def throughput(port: int, body: bytes, clients: int, seconds: float) -> dict[str, float]:
    """One-record predictions per second of `clients` processes each sending one after another.

    The clients start together, a few seconds after the pool, so that starting their processes
    (each imports this module, and with it pandas) is not counted as time serving nobody.
    """
    message = (
        f"POST /prediction HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        start = time.time() + CLIENT_START_SECONDS
        counts = pool.map(_throughput_client, [(port, message, start, seconds)] * clients)
    return {"clients": clients, "seconds": seconds, "requests": sum(counts),
            "per_second": sum(counts) / seconds}


# What a gunicorn master does before it forks (gunicorn's own start aside): import wsgi, which
# builds the app and loads the served model; then one /ready, answered in the process.
APP_LOADED = (
    "from wsgi import app\n"
    "assert app.test_client().get('/ready').status_code == 200\n"
)


def bench_api(scratch: Path, quick: bool) -> dict:
    """Latency and throughput of the API served by gunicorn with 2 workers on 127.0.0.1."""
    workspace = make_workspace(scratch / "api", 10_000)
    env = benchmark_env(workspace)
    run_process([PYTHON, str(PROJECT_DIR / "fullprocess.py")], env)
    app_loaded = measure("API app loaded", [PYTHON, "-c", APP_LOADED], 10, env=env,
                           floor=importing(API_SERVER_IMPORTS))
    results: dict[str, Any] = {
        "app_loaded": app_loaded.as_dict(),
        "worker_ready": worker_replacement(env, 5 if quick else 20),
    }
    with serving(env, workers=2) as (port, _):
        clients = generate_data.make_clients(10_000, seed=5, id_offset=70_000_000)
        records = clients.drop(columns=["exited"]).to_dict(orient="records")

        def body(n: int) -> bytes:
            return json.dumps({"records": records[:n]}).encode()

        scale = 0.2 if quick else 1.0
        results |= {
            "prediction_1": latency(port, "POST", "/prediction", body(1), int(1000 * scale)),
            "prediction_1000": latency(port, "POST", "/prediction", body(1000), int(100 * scale)),
            "prediction_10000": latency(port, "POST", "/prediction", body(10_000), int(40 * scale)),
            "scoring": latency(port, "GET", "/scoring", None, int(200 * scale)),
            "summarystats": latency(port, "GET", "/summarystats", None, int(200 * scale)),
            "diagnostics": latency(port, "GET", "/diagnostics", None, int(200 * scale)),
        }
        # Three rounds, so that a busy moment on the shared machine shows as a spread, not a figure.
        rounds = [throughput(port, body(1), clients=4, seconds=2.0 if quick else 5.0)
                  for _ in range(3)]
        rates = sorted(r["per_second"] for r in rounds)
        results["throughput_1_record"] = {
            "clients": 4, "rounds": rounds, "per_second": statistics.median(rates),
            "low": rates[0], "high": rates[-1],
        }
    return results


def worker_replacement(env: dict[str, str], times: int) -> dict[str, Any]:
    """Seconds from killing the one worker of a server until the worker gunicorn forks in its
    place answers /ready: how soon a worker that crashed, timed out or was recycled serves again.
    """
    seconds = []
    with serving(env, workers=1) as (port, server):
        for _ in range(times):
            [worker] = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
            started = time.perf_counter()
            os.kill(int(worker), signal.SIGKILL)
            _wait_until_ready(port, server, pause=0.002)
            seconds.append(time.perf_counter() - started)
    return {"label": "API worker ready (a new worker)", "seconds": seconds,
            "median": statistics.median(seconds), "low": min(seconds), "high": max(seconds)}


@contextlib.contextmanager
def serving(env: dict[str, str], workers: int) -> Iterator[tuple[int, subprocess.Popen]]:
    """`gunicorn wsgi:app` (with the project's gunicorn.conf.py) on a free 127.0.0.1 port."""
    port = free_port()
    server = subprocess.Popen(
        [PYTHON, "-m", "gunicorn", "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
         "--log-level", "warning", "wsgi:app"],
        cwd=PROJECT_DIR, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        _wait_until_ready(port, server)
        yield port, server
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_until_ready(
    port: int, server: subprocess.Popen, attempts: int = 3000, pause: float = 0.01
) -> None:
    for _ in range(attempts):
        if server.poll() is not None:
            raise RuntimeError(f"gunicorn exited: {server.stderr.read().decode()[-2000:]}")
        try:
            status, _ = request(port, "GET", "/ready")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(pause)
    raise RuntimeError("gunicorn did not become ready")


# ---------------------------------------------------------------------------------------------
# Report


def print_table(results: dict) -> None:
    machine = results["machine"]
    print(f"\n{results['date']} on {machine['cpus']} cores ({machine['cpu']}), "
          f"Python {machine['python']}")
    print("Median wall seconds; each run paired with its floor run (A B A B ...): median ratio "
          "(range of the pairs' ratios)")
    for size in results["sizes"]:
        print(f"\nStages on {size['rows']:,} clients:")
        for name, m in size["stages"].items():
            print(f"  {name:<12} {m['median']:7.3f} s  {_ratio(m):<20} {m['peak_mb']:6.0f} MB   "
                  f"floor {m['floor_seconds']:.3f} s: {m['floor']}")
        print(f"  ingestion + training + scoring: {size['ingest_train_score_seconds']:.2f} s, "
              f"peak {size['ingest_train_score_peak_mb']:.0f} MB")
        risk_list = size["risk_list"]
        print(f"  risk list made again ({risk_list['ranked']:,} current clients), in the process: "
              f"{risk_list['median']:.2f} s ({min(risk_list['seconds']):.2f}-"
              f"{max(risk_list['seconds']):.2f})")
    if "cycles" in results:
        cycles = results["cycles"]
        for key in ("noop", "drift"):
            m = cycles[key]
            print(f"\n{m['label']}: {m['median']:.3f} s = {_ratio(m)}, peak {m['peak_mb']:.0f} MB;"
                  f" floor {m['floor_seconds']:.3f} s: {m['floor']}")
        print(f"  drift cycle decision: {cycles['drift_decision']}")
    if "api" in results:
        print("\nAPI (gunicorn, 2 workers, 127.0.0.1; each request followed by GET /health):")
        for name, figures in results["api"].items():
            if name == "app_loaded":
                print(f"  {'app loaded':<18} {figures['median']:.3f} s = {_ratio(figures)}; "
                      f"floor {figures['floor_seconds']:.3f} s: {figures['floor']}")
            elif name == "worker_ready":
                print(f"  {'new worker ready':<18} {figures['median']:.3f} s "
                      f"({figures['low']:.3f}-{figures['high']:.3f}; {len(figures['seconds'])} "
                      "workers killed and replaced)")
            elif "p50_ms" in figures:
                print(f"  {name:<18} p50 {figures['p50_ms']:8.2f} ms   p95 {figures['p95_ms']:8.2f} ms"
                      f"   ({figures['requests']} requests; /health p50 "
                      f"{figures['floor_p50_ms']:.2f} ms)")
            else:
                print(f"  {name:<18} {figures['per_second']:8.0f} requests/s with "
                      f"{figures['clients']} concurrent clients (3 rounds: {figures['low']:.0f}-"
                      f"{figures['high']:.0f})")
    print("\nTargets:")
    for name, verdict in results["targets"].items():
        print(f"  {name:<30} {verdict}")


def _ratio(m: dict) -> str:
    ratios = m["ratios"]
    return f"{m['ratio']:.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def check_targets(results: dict) -> dict[str, str]:
    verdicts = {}

    def judge(name: str, value: float | None, lower_is_better: bool = True) -> None:
        if value is None:
            return
        target = TARGETS[name]
        ok = value <= target if lower_is_better else value >= target
        verdicts[name] = f"{value:.2f} (target {'<=' if lower_is_better else '>='} {target}) " + (
            "met" if ok else "MISSED")

    cycles = results.get("cycles")
    if cycles:
        judge("noop_cycle_ratio", cycles["noop"]["ratio"])
        judge("drift_cycle_ratio", cycles["drift"]["ratio"])
    sizes = {size["rows"]: size for size in results["sizes"]}
    if 10_000 in sizes:
        judge("scoring_10000_ratio", sizes[10_000]["stages"]["scoring"]["ratio"])
    million = sizes.get(1_000_000)
    if million:
        judge("million_pipeline_seconds", million["ingest_train_score_seconds"])
        judge("million_pipeline_peak_mb", million["ingest_train_score_peak_mb"])
        judge("million_diagnostics_seconds", million["stages"]["diagnostics"]["median"])
        judge("million_risk_list_seconds", million["risk_list"]["median"])
    api = results.get("api")
    if api:
        judge("api_worker_ready_seconds", api["worker_ready"]["median"])
        judge("api_predict_1_p50_ms", api["prediction_1"]["p50_ms"])
        judge("api_predict_10000_p50_ms", api["prediction_10000"]["p50_ms"])
        judge("api_diagnostics_p50_ms", api["diagnostics"]["p50_ms"])
        judge("api_predictions_per_second", api["throughput_1_record"]["per_second"], False)
    return verdicts


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000",
                        help="comma-separated client counts for the stage benchmarks")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (median taken)")
    parser.add_argument("--no-api", action="store_true", help="skip the API benchmark")
    parser.add_argument("--no-cycles", action="store_true", help="skip the cycle benchmarks")
    parser.add_argument("--quick", action="store_true", help="fewer API requests (a smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    return parser.parse_args(argv)


def cpu_model() -> str:
    """The processor's name as the kernel reports it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown processor"


def compile_project() -> None:
    """Write the project's bytecode, as a server that runs the scripts every 10 minutes has it.

    Where PYTHONDONTWRITEBYTECODE is set, every process would otherwise compile the project's
    modules from source, a cost no deployed cron job pays.
    """
    scripts = sorted(str(path) for path in PROJECT_DIR.glob("*.py"))
    subprocess.run([PYTHON, "-m", "compileall", "-q", *scripts], check=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.chdir(PROJECT_DIR)  # children inherit it: `-m fullprocess` and `gunicorn wsgi:app` need it
    compile_project()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_model(), "python": sys.version.split()[0]},
        "sizes": [],
    }
    with tempfile.TemporaryDirectory(prefix="risk-benchmark-") as scratch_name:
        scratch = Path(scratch_name)
        for rows in sizes:
            print(f"stages on {rows:,} clients ...", file=sys.stderr)
            results["sizes"].append(bench_stages(rows, args.runs, scratch))
        if not args.no_cycles:
            print("cron cycles ...", file=sys.stderr)
            results["cycles"] = bench_cycles(args.runs, scratch)
        if not args.no_api:
            print("API ...", file=sys.stderr)
            results["api"] = bench_api(scratch, args.quick)
    results["targets"] = check_targets(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nFigures written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

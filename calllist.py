"""The call list: every current client ranked by the served model, with the reasons of its risk.

Client managers call the clients at the top of production_deployment/riskscores.csv. A client is
current when its newest known row (a labeled row of the master dataset, or a roster snapshot) has no
outcome yet or says it stayed; a client whose newest row says it left is counted, never ranked.
Each ranked client carries the three features that raise its risk most against the typical client
(scoring.explain: the model's own arithmetic) and what changed since the previous list: new in the
top group, risen or fallen, and the feature that moved it. When labeled data later brings the
outcomes of clients an earlier list ranked, that list's track record is recorded: how many of its
top group left, against the share of leavers among all it ranked (precision at the top, and lift).

`rebuild_call_list` writes the list of the served release and records it (the `call_lists` table),
with each listed client's log-odds terms beside it (riskscores.terms.npz) for the next list to
compare with; it does nothing when the list already describes the served release and the current
data, so the cycle, the report and a rollback can all call it. pandas and numpy are imported by
the functions that rank, so that `call_list_is_current` costs a stat and a query.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import atomicio
import deployment
import records
from errors import DataError
from ingestion import MASTER_POSITION_COLUMN, SNAPSHOT_COLUMN
from settings import Schema, Settings

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

# One column per reason (scoring.REASONS_PER_CLIENT), strongest first.
REASON_COLUMNS = ("reason_1", "reason_2", "reason_3")
# Rows laid out and written at a time (write_list): small enough for the CPU's caches.
WRITE_CHUNK_ROWS = 5_000


class ClientHistory(NamedTuple):
    """The master dataset and the roster snapshots, each row's client as an integer code.

    With codes, who is current is a handful of integer array operations, at the end of the data
    or at any earlier point (the track record asks who was current when an earlier list was made).
    """

    master: pd.DataFrame  # typed, indexed by row position (read_master)
    snapshots: pd.DataFrame  # the rows of rosters.csv, in the order they arrived
    master_clients: np.ndarray  # the client code of each master row
    snapshot_clients: np.ndarray  # ... and of each snapshot row
    clients: pd.Index  # the client id (text) of each code


class CurrentClients(NamedTuple):
    """Who is current, and the newest row of each: what the list ranks."""

    rows: pd.DataFrame  # the schema's ids and features, one row per current client
    codes: np.ndarray  # each row's client code (ClientHistory)
    left: int  # clients whose newest row says they left: counted, not ranked
    from_rosters: int  # current clients whose newest row is a roster snapshot
    sources: np.ndarray  # each row's row in the data: master row i, or snapshot row j as -(j + 1)


class CallList(NamedTuple):
    """A risk list as recorded: which release ranked which data, and how earlier lists fared."""

    list_id: int
    model_version: str
    roster: str | None
    ranked: int
    from_rosters: int
    left_not_ranked: int
    top_n: int
    path: Path
    rebuilt: bool
    results: tuple[dict[str, Any], ...] = ()  # track records recorded by this rebuild

    def summary(self) -> str:
        roster = f", newest roster {self.roster}" if self.roster else ""
        lines = [
            f"Risk list of release {self.model_version}{roster}: {self.ranked:,} current clients "
            f"ranked ({self.from_rosters:,} from rosters), {self.left_not_ranked:,} already left, "
            f"not ranked; {self.path}" + ("" if self.rebuilt else " (already up to date)")
        ]
        lines += [f"  {track_record_text(result)}" for result in self.results]
        return "\n".join(lines)


# --- Who is current ----------------------------------------------------------------------------


def client_history(master: pd.DataFrame, snapshots: pd.DataFrame, schema: Schema) -> ClientHistory:
    """Give every client of the master dataset and the snapshots an integer code."""
    import numpy as np
    import pandas as pd

    codes, clients = pd.factorize(
        np.concatenate([client_keys(master, schema), client_keys(snapshots, schema)])
    )
    return ClientHistory(
        master, snapshots, codes[: len(master)], codes[len(master):],
        pd.Index(clients, dtype=object),
    )


def current_clients(
    history: ClientHistory, schema: Schema, master_rows: int | None = None,
    roster_rows: int | None = None,
) -> CurrentClients:
    """The newest row of every current client, from the first `master_rows` and `roster_rows`.

    A client's newest labeled row is its last in the master dataset, its newest snapshot row its
    last in the rosters. A snapshot that arrived when the master dataset had P rows is newer than
    master rows 0..P-1 and older than the rest. The client is current when its newest row is a
    snapshot or a labeled row saying it stayed.
    """
    import numpy as np
    import pandas as pd

    newest = _newest_rows(history, schema, master_rows, roster_rows)
    columns = list(schema.id_columns + schema.features)
    stayed = np.flatnonzero(~newest.snapshot_is_newest & (newest.outcome == 0))
    listed = np.flatnonzero(newest.snapshot_is_newest)
    parts = [
        history.master.iloc[newest.labeled_at[stayed]][columns],
        history.snapshots.iloc[newest.listed_at[listed]][columns],
    ]
    if len(parts[1]) and len(parts[0]):
        rows = pd.concat(parts, ignore_index=True)
    else:  # the usual case of no roster, or only rosters: one part, not copied again
        rows = parts[0 if len(parts[0]) else 1].reset_index(drop=True)
    return CurrentClients(
        rows=rows,
        codes=np.concatenate([stayed, listed]),
        left=int((~newest.snapshot_is_newest & (newest.outcome == 1)).sum()),
        from_rosters=len(listed),
        sources=np.concatenate([newest.labeled_at[stayed], -newest.listed_at[listed] - 1]),
    )


class _Newest(NamedTuple):
    labeled_at: np.ndarray  # per client code: its last master row, -1 if none
    listed_at: np.ndarray  # ... its last snapshot row, -1 if none
    snapshot_is_newest: np.ndarray
    outcome: np.ndarray  # ... the target of its last master row, NaN if none

    @property
    def current(self) -> np.ndarray:
        return self.snapshot_is_newest | (self.outcome == 0)


def _newest_rows(
    history: ClientHistory, schema: Schema, master_rows: int | None, roster_rows: int | None
) -> _Newest:
    import numpy as np

    clients = len(history.clients)
    labeled_at = last_rows(history.master_clients[:master_rows], clients)
    listed_at = last_rows(history.snapshot_clients[:roster_rows], clients)
    positions = history.snapshots[MASTER_POSITION_COLUMN].to_numpy(dtype="int64")
    listed = listed_at >= 0
    listed_after = np.full(clients, -1, dtype="int64")
    listed_after[listed] = positions[listed_at[listed]]
    target = history.master[schema.target].to_numpy(dtype="float64", na_value=np.nan)
    labeled = labeled_at >= 0
    outcome = np.full(clients, np.nan)
    outcome[labeled] = target[labeled_at[labeled]]
    return _Newest(labeled_at, listed_at, listed_after > labeled_at, outcome)


def last_rows(codes: np.ndarray, clients: int) -> np.ndarray:
    """For each of `clients` codes, the index of its last row in `codes`; -1 where it has none.

    The largest row number of each code, in one pass: finding it by sorting the codes (np.unique)
    took 0.19 s for a million rows, this 0.02 s.
    """
    import numpy as np

    last = np.full(clients, -1, dtype="int64")
    np.maximum.at(last, codes, np.arange(len(codes), dtype="int64"))
    return last


def first_rows(codes: np.ndarray, clients: int) -> np.ndarray:
    """For each of `clients` codes, the index of its first row in `codes`; -1 where it has none."""
    import numpy as np

    first = np.full(clients, len(codes), dtype="int64")
    np.minimum.at(first, codes, np.arange(len(codes), dtype="int64"))
    first[first == len(codes)] = -1
    return first


def client_keys(frame: pd.DataFrame, schema: Schema) -> np.ndarray:
    """Each row's client id as text (several id columns joined by " / ", as scoring names them)."""
    ids = list(schema.id_columns)
    if len(ids) == 1:
        return frame[ids[0]].to_numpy(dtype=object)
    return frame[ids].astype("str").agg(" / ".join, axis=1).to_numpy(dtype=object)


def read_snapshots(settings: Settings) -> pd.DataFrame:
    """The roster snapshots (rosters.csv), typed like the master dataset; empty if none arrived."""
    import numpy as np

    from dataset import empty_frame, read_csv, typed

    schema = settings.schema
    columns = schema.id_columns + schema.features
    path = settings.rosters_path
    if not path.exists():
        return empty_frame(schema)[list(columns)].assign(
            **{SNAPSHOT_COLUMN: np.zeros(0, "int64"), MASTER_POSITION_COLUMN: np.zeros(0, "int64")}
        )
    frame = read_csv(path, schema, name=f"roster dataset {path}")
    missing = [c for c in (*columns, SNAPSHOT_COLUMN, MASTER_POSITION_COLUMN) if c not in frame]
    if missing:
        raise DataError(
            f"roster dataset {path} lacks column(s) {', '.join(missing)}: it was made with another "
            "schema; move it away and ingest the rosters again"
        )
    return typed(frame, schema, columns).assign(**{
        column: frame[column].to_numpy(dtype="int64")
        for column in (SNAPSHOT_COLUMN, MASTER_POSITION_COLUMN)
    })


# --- Ranking with reasons and changes ----------------------------------------------------------


class Ranked(NamedTuple):
    """A list before it is written: what a manager reads, and what the next list compares with."""

    table: pd.DataFrame  # rank, ids, probability, predicted class, release, reasons (+ changes)
    terms: np.ndarray  # each row's log-odds terms (rows x features), in rank order
    features: tuple[str, ...]
    sources: np.ndarray  # each row's row in the data: master row i, or snapshot row j as -(j + 1)
    codes: np.ndarray  # each row's client code (ClientHistory)
    utf8: dict[str, np.ndarray]  # columns of the table already in UTF-8, for write_list


def rank_current_clients(settings: Settings, model: Any, version: str) -> pd.DataFrame:
    """The list `model` makes of the current data, compared with the list on disk; not written."""
    from dataset import read_master

    history = client_history(read_master(settings), read_snapshots(settings), settings.schema)
    current = current_clients(history, settings.schema)
    return make_list(settings, model, version, history, current).table


def make_list(
    settings: Settings, model: Any, version: str, history: ClientHistory, current: CurrentClients
) -> Ranked:
    """Rank the current clients with their reasons, and say what changed since the list on disk."""
    ranked = _ranked(model, version, current, settings.schema)
    before, shift = _compared_with_previous(settings, history, ranked)
    table = with_changes(
        ranked.table, settings.diagnostics.risk_top_n, before, shift, ranked.features
    )
    return ranked._replace(table=table)


def ranked_table(model: Any, version: str, rows: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Rows ranked by probability of leaving, highest first, each with its three reasons.

    Ties go by client id, so the order never depends on the order rows happened to arrive in.
    The columns are today's (rank, ids, probability, predicted class, model_version), then the
    reasons.
    """
    import numpy as np

    every_row = np.arange(len(rows))
    current = CurrentClients(rows, every_row, left=0, from_rosters=0, sources=every_row)
    return _ranked(model, version, current, schema).table


def _ranked(model: Any, version: str, current: CurrentClients, schema: Schema) -> Ranked:
    import numpy as np
    import pandas as pd

    from scoring import calibrated_probabilities, explain, linear_scorer

    rows = current.rows
    why = explain(model, rows)
    # Reasons are terms of the log-odds; the probability is the model's, through its calibration.
    probabilities = calibrated_probabilities(why.logits(), linear_scorer(model).calibration)
    keys = client_keys(rows, schema)
    keys_utf8 = _utf8(keys.tolist())  # sort as the ids do, and are what write_list writes
    order = _risk_order(probabilities, keys if keys_utf8 is None else keys_utf8)
    index = pd.RangeIndex(len(order))
    threshold = linear_scorer(model).threshold
    columns: dict[str, Any] = {"rank": np.arange(1, len(order) + 1)}
    if len(schema.id_columns) == 1:  # the keys are the ids themselves
        columns[schema.id_columns[0]] = _texts(keys[order], index)
    else:
        for column in schema.id_columns:
            columns[column] = _texts(rows[column].to_numpy(dtype=object)[order], index)
    columns["probability"] = probabilities[order]
    columns[f"predicted_{schema.target}"] = (columns["probability"] >= threshold).astype("int64")
    columns["model_version"] = _one_text(version, len(order))
    for position, column in enumerate(REASON_COLUMNS):
        columns[column] = why.reason_column(position, order)
    table = _frame(columns, index)
    utf8 = {}
    if keys_utf8 is not None and len(schema.id_columns) == 1:
        utf8[schema.id_columns[0]] = keys_utf8[order]
    return Ranked(
        table=table, terms=why.contributions[order], features=why.features,
        sources=current.sources[order], codes=current.codes[order], utf8=utf8,
    )


def _texts(values: np.ndarray, index: pd.Index) -> pd.Series:
    """Text as plain Python strings: pandas' own string type costs a missing-value scan per use."""
    import pandas as pd

    return pd.Series(values, index=index, dtype=object, copy=False)


def _one_text(text: str, rows: int) -> pd.Categorical:
    """The same text in every row, held once."""
    import numpy as np
    import pandas as pd

    return pd.Categorical.from_codes(np.zeros(rows, dtype="int8"), [text])


def _coded_texts(codes: np.ndarray, texts: list[str]) -> pd.Categorical:
    """Row i reads texts[codes[i]]: a column of few distinct texts, as categories."""
    import pandas as pd

    return pd.Categorical.from_codes(codes, texts)


def _frame(columns: dict[str, Any], index: pd.Index) -> pd.DataFrame:
    """A table of these columns as they are: a million clients' columns are not copied again."""
    import pandas as pd

    return pd.DataFrame(columns, index=index, copy=False)


def _utf8(texts: list[str]) -> np.ndarray | None:
    """Texts as fixed-width UTF-8 bytes (numpy "S"), which sort as the texts do; None if a text
    holds a NUL, which such bytes would lose at the end."""
    import numpy as np

    joined = "".join(texts)
    if "\x00" in joined:
        return None
    if joined.isascii():  # the usual case converts in one step
        return np.array(texts, dtype="S")
    return np.array([text.encode("utf-8") for text in texts], dtype="S")


def _risk_order(probabilities: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Row order by probability, highest first, equal probabilities by client id.

    Ids are sorted first, then the rows stably by probability. Ties are the rule where the
    features take few values (a list of a million clients may hold a few hundred distinct
    probabilities). The ids are sorted as fixed-width text (or its UTF-8, which sorts the same),
    several times faster than Python strings.
    """
    import numpy as np

    ids = keys if keys.dtype.kind in "SU" else np.asarray(keys, dtype=str)
    by_id = _byte_order(ids) if ids.dtype.kind == "S" else np.argsort(ids, kind="stable")
    return by_id[np.argsort(-probabilities[by_id], kind="stable")]


def _byte_order(texts: np.ndarray) -> np.ndarray:
    """The stable order of fixed-width bytes, sorted as whole numbers of 8 bytes at a time.

    Bytes padded with zeros compare as the big-endian numbers they spell, and numpy sorts
    numbers faster than byte strings: a million six-letter ids in 0.13 s rather than 0.22 s.
    """
    import numpy as np

    width = texts.dtype.itemsize
    padded = np.zeros((len(texts), -(-width // 8) * 8), dtype=np.uint8)
    padded[:, :width] = np.ascontiguousarray(texts).view(np.uint8).reshape(len(texts), width)
    numbers = padded.view(">u8").astype(np.uint64)
    if numbers.shape[1] == 1:
        return np.argsort(numbers[:, 0], kind="stable")
    return np.lexsort(numbers.T[::-1])  # the last key sorts first: the leading 8 bytes


def with_changes(
    table: pd.DataFrame, top_n: int, before: np.ndarray | None, shift: np.ndarray | None,
    features: tuple[str, ...],
) -> pd.DataFrame:
    """Add what changed since the previous list: change, rank_before and moved_by.

    `before` is each row's rank on the previous list (0: not on it; None: there is no previous
    list); `shift`, how each row's log-odds terms moved since (NaN, or None: not known).
    change: "new in the top N" (in the top group now, not in the previous one), "risen",
    "fallen", "unchanged", "new" (not on the previous list), or "first list". moved_by: of a
    client whose own risk moved, the feature whose term moved furthest the same way.
    """
    import numpy as np
    import pandas as pd

    # After the reasons: the columns a manager reads first.
    where = list(table.columns).index(REASON_COLUMNS[-1]) + 1
    if before is None:
        return _with_columns(table, where, {
            "change": _one_text("first list", len(table)),
            "rank_before": pd.arrays.IntegerArray(
                np.zeros(len(table), dtype="int64"), np.ones(len(table), dtype=bool)
            ),
            "moved_by": _one_text("", len(table)),
        })
    rank = table["rank"].to_numpy()
    found = before > 0
    changes = ["unchanged", "risen", "fallen", "new", f"new in the top {top_n}"]
    change = np.zeros(len(table), dtype="int8")
    change[found & (rank < before)] = 1
    change[found & (rank > before)] = 2
    change[~found] = 3
    change[(rank <= top_n) & (~found | (before > top_n))] = 4
    moved = np.full(len(table), len(features), dtype="int64")  # the last text: ""
    if shift is not None:
        known = found & ~np.isnan(shift).any(axis=1)
        total = shift[known].sum(axis=1)
        # Terms recomputed from the same row and model agree to the last bit; anything else moved.
        own = np.abs(total) > 1e-9
        moved[np.flatnonzero(known)[own]] = np.argmax(
            shift[known][own] * np.sign(total[own])[:, None], axis=1
        )
    return _with_columns(table, where, {
        "change": _coded_texts(change, changes),
        "rank_before": pd.arrays.IntegerArray(before, ~found),
        "moved_by": _coded_texts(moved, [*features, ""]),
    })


def _with_columns(table: pd.DataFrame, where: int, columns: dict[str, Any]) -> pd.DataFrame:
    """`table` with `columns` inserted before its column number `where`; nothing is copied."""
    names = list(table.columns)
    return _frame(
        {**{name: table[name] for name in names[:where]}, **columns,
         **{name: table[name] for name in names[where:]}},
        table.index,
    )


def _compared_with_previous(
    settings: Settings, history: ClientHistory, ranked: Ranked
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Each new row's rank on the list on disk (0: not on it) and how its terms moved since.

    The terms file written beside the list says where each client's row lies in the data, so the
    two lists meet through integer codes; without it (or for a list of other data) the clients
    are matched by id, and what moved them is not known. (None, None): no list on disk.
    """
    import numpy as np
    import pandas as pd

    path = settings.risk_scores_path
    if not path.is_file():
        return None, None
    saved = read_terms(settings, history)
    if saved is not None:
        codes_before = _codes_of(saved["sources"], history)
        row_before = np.full(len(history.clients), -1, dtype="int64")
        row_before[codes_before] = np.arange(len(codes_before))
        at = row_before[ranked.codes]
        found = at >= 0
        shift = None
        if tuple(saved["features"].tolist()) == ranked.features:
            shift = np.full(ranked.terms.shape, np.nan)
            shift[found] = ranked.terms[found] - saved["terms"][at[found]]
        return np.where(found, at + 1, 0), shift
    previous = read_previous_list(path, settings.schema)
    if previous is None:
        return None, None
    at = pd.Index(client_keys(previous, settings.schema)).get_indexer(
        history.clients[ranked.codes]
    )
    return np.where(at >= 0, previous["rank"].to_numpy(dtype="int64")[at], 0), None


def _codes_of(sources: np.ndarray, history: ClientHistory) -> np.ndarray:
    """The client code of each source row: master row i, or snapshot row j given as -(j + 1)."""
    import numpy as np

    from_master = sources >= 0
    codes = np.empty(len(sources), dtype="int64")
    codes[from_master] = history.master_clients[sources[from_master]]
    codes[~from_master] = history.snapshot_clients[-sources[~from_master] - 1]
    return codes


def read_previous_list(path: Path, schema: Schema) -> pd.DataFrame | None:
    """The ids and ranks of the list on disk; None if there is none or it cannot be read."""
    import pandas as pd

    if not path.is_file():
        return None
    ids = list(schema.id_columns)
    try:
        return pd.read_csv(
            path, usecols=[*ids, "rank"], dtype={c: "str" for c in ids}, keep_default_na=False
        )
    except (OSError, ValueError, pd.errors.ParserError) as error:
        log.warning("comparing with no previous list: %s cannot be read (%s)", path, error)
        return None


# --- Writing and recording ---------------------------------------------------------------------


def rebuild_call_list(settings: Settings) -> CallList:
    """Write and record the risk list of the served release; nothing to do if it is up to date.

    Also brings the track record of earlier lists up to date with the outcomes that arrived since.
    """
    release = deployment.current_release(settings)
    stamp = data_stamp(settings, release.version)
    latest = latest_list(settings)
    if latest is not None and _is_written(settings, latest, stamp):
        return _call_list(settings, latest, rebuilt=False)

    from dataset import read_master
    from scoring import load_deployed

    model, release = load_deployed(settings)
    schema = settings.schema
    history = client_history(read_master(settings), read_snapshots(settings), schema)
    current = current_clients(history, schema)
    ranked = make_list(settings, model, release.version, history, current)
    top_n = settings.diagnostics.risk_top_n
    list_id = records.add(settings.records_path, "call_lists", {
        "time": records.utc_now(),
        "model_version": release.version,
        "roster": _newest_roster(settings, len(history.snapshots)),
        "master_rows": len(history.master),
        "roster_rows": len(history.snapshots),
        "ranked": len(ranked.table),
        "from_rosters": current.from_rosters,
        "left_not_ranked": current.left,
        "top_n": top_n,
        "top_clients": client_keys(ranked.table.head(top_n), schema).tolist(),
        "data_stamp": stamp,
    })
    write_list(settings.risk_scores_path, ranked.table, ranked.utf8)
    write_terms(settings, list_id, ranked, history)
    records.update(settings.records_path, "call_lists", list_id,
                   {"file_stamp": file_stamp(settings.risk_scores_path)})
    results = update_track_records(settings, history, list_id)
    log.info("risk list %d of release %s: %d clients ranked, %d already left",
             list_id, release.version, len(ranked.table), current.left)
    return _call_list(settings, latest_list(settings), rebuilt=True, results=results)


def terms_path(settings: Settings) -> Path:
    """Beside riskscores.csv: each listed client's row in the data and log-odds terms, in rank
    order, so that the next list can say what moved each client without reading this one."""
    return settings.risk_scores_path.with_suffix(".terms.npz")


# Ids of this many listed clients, spread over the list, are kept in the terms file to check that
# its rows still point at the same clients (the data might have been made anew since).
CHECKED_IDS = 100


def write_terms(settings: Settings, list_id: int, ranked: Ranked, history: ClientHistory) -> None:
    import numpy as np

    listed = len(ranked.codes)
    checked = np.unique(np.linspace(0, listed - 1, min(listed, CHECKED_IDS)).astype("int64"))

    def write(path: Path) -> None:
        with open(path, "wb") as stream:
            np.savez(
                stream, list_id=np.array(list_id), sources=ranked.sources, terms=ranked.terms,
                features=np.array(ranked.features, dtype=str), checked=checked,
                checked_ids=np.array(history.clients[ranked.codes[checked]], dtype=str),
            )

    atomicio.write_with(terms_path(settings), write)


def read_terms(settings: Settings, history: ClientHistory) -> dict[str, np.ndarray] | None:
    """The terms file of the list on disk, if it is that list's and still fits the data."""
    import numpy as np

    listed = latest_list(settings)
    if listed is None or listed["file_stamp"] != file_stamp(settings.risk_scores_path):
        return None
    try:
        with np.load(terms_path(settings), allow_pickle=False) as stored:
            saved = {name: stored[name] for name in stored.files}
    except (OSError, ValueError, KeyError) as error:
        log.info("the terms of the previous list are not at hand (%s)", error)
        return None
    sources = saved["sources"]
    fits = (
        int(saved["list_id"]) == listed["id"]
        and (sources < len(history.master)).all()
        and (-sources - 1 < len(history.snapshots)).all()
    )
    if not fits or not (
        history.clients[_codes_of(sources[saved["checked"]], history)]
        == saved["checked_ids"].astype(object)
    ).all():
        return None
    return saved


def call_list_is_current(settings: Settings) -> bool:
    """Whether riskscores.csv is the recorded list of the served release and the current data."""
    manifest = deployment.read_manifest(settings)
    latest = latest_list(settings)
    if manifest is None or latest is None:
        return False
    return _is_written(settings, latest, data_stamp(settings, manifest["current"]))


def data_stamp(settings: Settings, version: str) -> str:
    """What a list is made of: the release, and the data files' sizes (both only ever grow)."""
    sizes = [
        f"{path.name}={path.stat().st_size if path.exists() else -1}"
        for path in (settings.finaldata_path, settings.rosters_path)
    ]
    return ";".join([version, *sizes])


def file_stamp(path: Path) -> str | None:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stamp_of(stat.st_size, stat.st_mtime_ns)


def stamp_of(size: int, mtime_ns: int) -> str:
    """A list file's stamp as the call_lists records keep it (file_stamp)."""
    return f"{size}:{mtime_ns}"


def recorded_list(settings: Settings, stamp: str | None) -> dict[str, Any] | None:
    """The records' entry of the list whose file has `stamp`; None when the newest recorded list
    is another (the file was written some other way, or the records lag behind it)."""
    listed = latest_list(settings)
    if listed is None or stamp is None or listed["file_stamp"] != stamp:
        return None
    return listed


def _is_written(settings: Settings, listed: dict[str, Any], stamp: str) -> bool:
    return listed["data_stamp"] == stamp and listed["file_stamp"] == file_stamp(
        settings.risk_scores_path
    )


def latest_list(settings: Settings) -> dict[str, Any] | None:
    rows = records.query(settings.records_path, "SELECT * FROM call_lists ORDER BY id DESC LIMIT 1")
    return rows[0] if rows else None


def _call_list(
    settings: Settings, listed: dict[str, Any], *, rebuilt: bool,
    results: tuple[dict[str, Any], ...] = (),
) -> CallList:
    return CallList(
        list_id=listed["id"], model_version=listed["model_version"], roster=listed["roster"],
        ranked=listed["ranked"], from_rosters=listed["from_rosters"],
        left_not_ranked=listed["left_not_ranked"], top_n=listed["top_n"],
        path=settings.risk_scores_path, rebuilt=rebuilt, results=results,
    )


def _newest_roster(settings: Settings, roster_rows: int) -> str | None:
    if not roster_rows:
        return None
    rows = records.query(
        settings.records_path, "SELECT file FROM rosters ORDER BY snapshot DESC LIMIT 1"
    )
    return Path(rows[0]["file"]).name if rows else None


def write_list(
    path: Path, table: pd.DataFrame, utf8: dict[str, np.ndarray] | None = None
) -> None:
    """Write the list as CSV, atomically, a chunk of rows at a time.

    A million clients with their reasons take pandas' to_csv about 20 s, and a Python format per
    row about 2 s. Here numpy lays out each chunk as a byte matrix with a line per client: every
    column's cells in UTF-8 at the chunk's widest, padded with 0xFF (a byte UTF-8 never uses), and
    the commas between; deleting the padding leaves the lines of the file in order. A text column
    of few distinct values (categories: the reasons, the release, what changed) is encoded once per
    distinct text. `utf8` holds columns already encoded (numpy "S" arrays): the ids, which the
    ranking encoded to sort them. numpy lets go of the GIL while it moves bytes, so two threads
    lay out chunks side by side.
    """
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    utf8 = utf8 or {}
    columns = [_csv_cells(table[name], utf8.get(name)) for name in table.columns]

    def lines(start: int) -> np.ndarray:
        rows = slice(start, min(start + WRITE_CHUNK_ROWS, len(table)))
        comma = np.full((rows.stop - rows.start, 1), ord(","), dtype="uint8")
        line = [part for cells in columns for part in (cells(rows), comma)]
        line[-1] = np.full_like(comma, ord("\n"))
        matrix = np.concatenate(line, axis=1)
        return matrix[matrix != CSV_PADDING]

    with atomicio.open_atomic(path, "wb") as stream, ThreadPoolExecutor(2) as pool:
        stream.write((",".join(_csv_field(str(name)) for name in table.columns) + "\n").encode())
        for chunk in pool.map(lines, range(0, len(table), WRITE_CHUNK_ROWS)):
            stream.write(chunk.data)


# Pads every cell of write_list's byte matrix to its column's width: no UTF-8 text holds it.
CSV_PADDING = 0xFF


def _csv_cells(values: pd.Series, utf8: np.ndarray | None = None) -> Callable[[slice], np.ndarray]:
    """The column's cells as write_list lays them out: given a slice of rows, a matrix of bytes,
    a row per cell, each cell's UTF-8 first and padding after.

    Integers are written as they are, empty where missing; probabilities with six decimals. Every
    cell of a column is quoted when any holds a comma (every reason does), and only the cells that
    need it when one holds a quote or a line break.
    """
    import numpy as np
    import pandas as pd

    dtype = values.dtype
    if utf8 is not None and not re.search(rb'[,"\r\n]', utf8.tobytes()):  # needs no quotes
        cells = _padded(utf8)
        return lambda rows: cells[rows]
    if pd.api.types.is_integer_dtype(dtype):
        numbers = values.to_numpy(dtype="int64", na_value=0)
        missing = values.isna().to_numpy()
        if (numbers >= 0).all():  # ranks and classes: digits by arithmetic
            return lambda rows: _digits(numbers[rows], missing[rows])
        codes = np.where(missing, -1, np.arange(len(values)))
        texts = [str(number) for number in numbers.tolist()]
    elif pd.api.types.is_float_dtype(dtype):
        codes, distinct = pd.factorize(values.to_numpy(dtype="float64"), use_na_sentinel=True)
        texts = ["%.6f" % number for number in distinct.tolist()]
    elif isinstance(dtype, pd.CategoricalDtype):
        codes = values.cat.codes.to_numpy()
        texts = values.cat.categories.tolist()
    else:  # text of its own in every row: the client ids
        cells = values.to_numpy(dtype=object)
        codes = np.where(pd.isna(cells), -1, np.arange(len(cells)))
        texts = cells.tolist()
    encoded = _padded_utf8([*_quoted(texts), ""])
    lengths = (encoded != CSV_PADDING).sum(axis=1)
    codes = np.where(codes < 0, len(texts), codes)  # a missing cell: the empty text

    def cells(rows: slice) -> np.ndarray:
        """At the chunk's widest: low on the list, most third reasons are empty."""
        chunk = codes[rows]
        return encoded[chunk, :max(int(lengths[chunk].max(initial=0)), 1)]

    return cells


def _quoted(texts: list[Any]) -> list[str]:
    """A column's texts as CSV cells, quoted as _csv_cells says (a missing cell's is unused)."""
    try:
        everything = "\x00".join(texts)  # one scan of all the cells for what needs quoting
    except TypeError:  # not all of them text
        texts = [str(text) for text in texts]
        everything = "\x00".join(texts)
    if '"' in everything or "\n" in everything or "\r" in everything:
        return [_csv_field(text) for text in texts]
    if "," in everything:
        return [f'"{text}"' for text in texts]
    return texts


def _padded_utf8(texts: list[str]) -> np.ndarray:
    """Texts as a matrix of bytes, a row each: its UTF-8, then CSV_PADDING to the widest."""
    import numpy as np

    fixed = _utf8(texts)
    if fixed is not None:
        return _padded(fixed)
    # A text holds a NUL: each text's length is told from its own bytes.
    encoded = [text.encode("utf-8") for text in texts]
    lengths = np.fromiter(map(len, encoded), dtype="int64", count=len(encoded))
    width = max(int(lengths.max(initial=0)), 1)
    matrix = np.array(encoded, dtype=f"S{width}").view("uint8").reshape(len(texts), width).copy()
    matrix[np.arange(width) >= lengths[:, None]] = CSV_PADDING
    return matrix


def _padded(fixed: np.ndarray) -> np.ndarray:
    """_utf8's bytes as a matrix, a row each: numpy's NUL padding becomes CSV_PADDING (_utf8 lets
    no text hold a NUL)."""
    width = max(fixed.dtype.itemsize, 1)
    matrix = fixed.astype(f"S{width}").view("uint8").reshape(len(fixed), width).copy()
    matrix[matrix == 0] = CSV_PADDING
    return matrix


def _digits(numbers: np.ndarray, missing: np.ndarray) -> np.ndarray:
    """Non-negative integers as a matrix of ASCII digits, a row each; empty where missing."""
    import numpy as np

    width = len(str(int(numbers.max()))) if len(numbers) else 1
    powers = 10 ** np.arange(width - 1, -1, -1, dtype="int64")
    digits = ((numbers[:, None] // powers) % 10).astype("uint8") + ord("0")
    length = (numbers[:, None] >= powers[:-1]).sum(axis=1) + 1  # 0 is written "0"
    digits[(np.arange(width) < width - length[:, None]) | missing[:, None]] = CSV_PADDING
    return digits


def read_list(path: Path, schema: Schema, rows: int | None = None) -> pd.DataFrame:
    """The first `rows` of a written list (all by default): text cells as text, "" where empty."""
    import pandas as pd

    text = {*schema.id_columns, "model_version", *REASON_COLUMNS, "change", "moved_by"}
    header = pd.read_csv(path, nrows=0).columns
    frame = pd.read_csv(
        path, nrows=rows, dtype={c: "str" for c in header if c in text},
        keep_default_na=False, na_values={c: [""] for c in header if c not in text},
    )
    if "rank_before" in frame:
        frame["rank_before"] = frame["rank_before"].astype("Int64")
    return frame


def _csv_field(text: str) -> str:
    """Text as a CSV cell: quoted when it holds a comma, a quote or a line break."""
    if "," in text or '"' in text or "\n" in text or "\r" in text:
        return '"' + text.replace('"', '""') + '"'
    return text


# --- The track record --------------------------------------------------------------------------


def update_track_records(
    settings: Settings, history: ClientHistory, newest_list: int
) -> tuple[dict[str, Any], ...]:
    """Record the track record of earlier lists whose clients' outcomes arrived since."""
    from scoring import normal_quantile

    tracked = records.query(
        settings.records_path,
        "SELECT l.*, (SELECT MAX(outcomes_through) FROM call_list_results r "
        "WHERE r.list_id = l.id) AS through FROM call_lists l WHERE l.id < ? "
        "ORDER BY l.id DESC LIMIT ?",
        (newest_list, settings.diagnostics.risk_tracked_lists),
    )
    z = normal_quantile(settings.scoring.confidence)
    master_rows, roster_rows = len(history.master), len(history.snapshots)
    results = []
    for listed in reversed(tracked):
        if not listed["master_rows"] < master_rows or (listed["through"] or -1) >= master_rows:
            continue  # no outcome arrived since the list was made, or since it was last counted
        if listed["roster_rows"] > roster_rows:
            continue  # the data was replaced since: who this list ranked can no longer be known
        numbers = track_record(
            history, listed["master_rows"], listed["roster_rows"],
            json.loads(listed["top_clients"]), settings.schema, z,
        )
        if numbers is None:
            continue
        result = {"time": records.utc_now(), "list_id": listed["id"], **numbers}
        records.add(settings.records_path, "call_list_results", result)
        results.append({**result, "model_version": listed["model_version"],
                        "roster": listed["roster"], "top_n": listed["top_n"]})
    return tuple(results)


def track_record(
    history: ClientHistory,
    master_rows: int,
    roster_rows: int,
    top_clients: list[str],
    schema: Schema,
    z: float,
) -> dict[str, Any] | None:
    """How a list made from the first `master_rows` and `roster_rows` rows fared; None: no outcome.

    A ranked client's outcome is its first labeled row after the list was made. Precision at the
    top is the share of leavers among the top group's clients whose outcome arrived, with Wilson's
    interval; lift is that precision over the share of leavers among all ranked clients whose
    outcome arrived (its interval is the precision's, over that share, which rests on many more
    clients).
    """
    import numpy as np

    from scoring import wilson_interval

    clients = len(history.clients)
    first_after = first_rows(history.master_clients[master_rows:], clients)
    known = first_after >= 0
    if not known.any():
        return None
    target = history.master[schema.target].to_numpy(dtype="float64", na_value=np.nan)
    left = np.zeros(clients, dtype=bool)
    left[known] = target[master_rows + first_after[known]] == 1
    ranked = _newest_rows(history, schema, master_rows, roster_rows).current & known
    top = np.zeros(clients, dtype=bool)
    candidates = np.flatnonzero(ranked)  # only ids with an outcome need hashing, not every client
    top[candidates] = _isin(np.asarray(history.clients[candidates], dtype=object), top_clients)
    ranked_known, top_known = int(ranked.sum()), int(top.sum())
    if ranked_known == 0:
        return None
    ranked_left, top_left = int((ranked & left).sum()), int((top & left).sum())
    share = ranked_left / ranked_known
    numbers: dict[str, Any] = {
        "outcomes_through": len(history.master),
        "top_known": top_known, "top_left": top_left,
        "ranked_known": ranked_known, "ranked_left": ranked_left,
        "precision": None, "precision_low": None, "precision_high": None,
        "leaver_share": share, "lift": None, "lift_low": None, "lift_high": None,
    }
    if top_known:
        precision = top_left / top_known
        low, high = wilson_interval(top_left, top_known, z)
        numbers.update(precision=precision, precision_low=low, precision_high=high)
        if share > 0:
            numbers.update(lift=precision / share, lift_low=low / share, lift_high=high / share)
    return numbers


def _isin(values: np.ndarray, pool: list[str]) -> np.ndarray:
    """Which values are in pool, by hashing (numpy's isin sorts, slow for text)."""
    import pandas as pd

    return pd.Series(values, dtype=object).isin(pool).to_numpy()


def track_record_text(result: dict[str, Any]) -> str:
    """One track record in words."""
    roster = f", roster {result['roster']}" if result.get("roster") else ""
    head = (
        f"list {result['list_id']} (release {result['model_version']}{roster}): "
        f"outcomes of {result['ranked_known']:,} ranked clients, "
        f"{result['leaver_share']:.1%} of them left"
    )
    if result["precision"] is None:
        return f"{head}; none of its top {result['top_n']} yet"
    lift = "" if result["lift"] is None else (
        f", lift {result['lift']:.2f} ({result['lift_low']:.2f} to {result['lift_high']:.2f})"
    )
    return (
        f"{head}; {result['top_left']} of {result['top_known']} in its top {result['top_n']}: "
        f"precision {result['precision']:.2f} ({result['precision_low']:.2f} to "
        f"{result['precision_high']:.2f}){lift}"
    )


def latest_track_record(settings: Settings) -> dict[str, Any] | None:
    """The most recently recorded track record, with the list it belongs to; None if none yet."""
    rows = track_records(settings, latest_only=True)
    return rows[0] if rows else None


def track_records(settings: Settings, latest_only: bool = False) -> list[dict[str, Any]]:
    """Each list's latest track record with the list's release and roster, oldest list first."""
    rows = records.query(
        settings.records_path,
        "SELECT r.*, l.time AS list_time, l.model_version, l.roster, l.ranked, l.top_n "
        "FROM call_list_results r JOIN call_lists l ON l.id = r.list_id "
        "WHERE r.id = (SELECT MAX(id) FROM call_list_results WHERE list_id = r.list_id) "
        + ("ORDER BY r.id DESC LIMIT 1" if latest_only else "ORDER BY r.list_id"),
    )
    return rows

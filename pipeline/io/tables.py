"""One logical table (the results, or the error ledger) in up to two stores — a Parquet dataset and a LanceDB
table — holding exactly ONE current row per key (video_id, config_hash) in each, whatever crashes.

A plain reader of the Parquet dataset (pyarrow, DuckDB: `read_parquet('<dir>/*.parquet')`) must see no
duplicates without knowing our rules, so a row that replaces an older one (the object changed, a retry) takes
the old row out of its part file: copy-on-write of the few part files that hold superseded keys.

The commit protocol (`commit`), under the index lock (`pipeline.io.locks`):
  1. find the part files that hold keys being replaced or deleted (LanceDB's `part` column, else a scan);
  2. stage the new part `_staging/<N>.staged` and each rewritten old part `_staging/<P>.rewrite.staged`
     (names no reader globs: `_` folders and non-.parquet names are skipped by pyarrow and DuckDB);
  3. write the journal `_journal/<txn>.json` naming what moves where;
  4. commit LanceDB (the commit point when LanceDB is configured): merge_insert the rows (with part=N), then
     delete the deleted keys;
  5. apply the journal: staged files into place (a rename / one PUT replaces a whole file atomically), drop
     emptied parts, remove the journal.
`recover()` (at open): a journal whose LanceDB rows exist (or with no LanceDB, whose journal exists) is
applied again — every step is idempotent; any other journal and every unreferenced staged file is discarded.
So a SIGKILL at any point leaves both stores as before the commit or as after it.

`STLLM_CRASH_AT=<point>[:<n>]` kills this process with SIGKILL at the n-th (default first) passing of a named
point (`staged`, `journaled`, `lance-committed`, `applied-new`) — how the exactly-once tests crash a real run.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import signal
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.io.sinks import check_existing, filesystem, open_table, write_atomic, write_parquet
from pipeline.io.sources import S3Options

log = logging.getLogger(__name__)

KEY = ("video_id", "config_hash")
STAGING, JOURNAL = "_staging", "_journal"
_passes: Counter[str] = Counter()


def crash_point(name: str) -> None:
    """SIGKILL this process here when STLLM_CRASH_AT names this point (tests of exactly-once)."""
    want = os.environ.get("STLLM_CRASH_AT")
    if not want:
        return
    point, _, nth = want.partition(":")
    if point == name:
        _passes[name] += 1
        if _passes[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


def sql_str(value: str) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def key_filter(config_hash: str, column: str, values: Iterable[str]) -> str:
    """A LanceDB filter: this config's rows whose `column` is one of `values`."""
    vals = ", ".join(sql_str(v) for v in values)
    return f"config_hash = {sql_str(config_hash)} AND {column} IN ({vals})"


class TableStore:
    """`name` in the Parquet root `<parquet_root>/<name>/` and/or the LanceDB database `lance_db`."""

    def __init__(self, name: str, *, parquet_root: str | None, lance_db: Any | None, s3: S3Options | None,
                 schema: pa.Schema | None = None, lance_uri: str = "", key_column: str = "video_id"):
        if parquet_root is None and lance_db is None:
            raise ValueError("a table needs a Parquet root, a LanceDB database, or both")
        self.name, self.s3, self.lance_db = name, s3, lance_db
        self.key_column = key_column  # the row's key is (key_column, config_hash)
        self.parquet_dir = None if parquet_root is None else (
            parquet_root.rstrip("/") + "/" + name if parquet_root.startswith("s3://")
            else os.path.join(parquet_root, name))
        if self.parquet_dir is not None:
            self.fs, self.root = filesystem(self.parquet_dir, s3)
        self.schema = schema
        self._lance = open_table(lance_db, name) if lance_db is not None else None
        self._where = f"{lance_uri or 'LanceDB'} table '{name}'"
        if self._lance is not None and schema is not None:
            check_existing(self._lance.schema, schema, self._where)

    # ---- reading ---------------------------------------------------------------------------------------

    @property
    def lance_table(self) -> Any | None:
        return self._lance

    def existing_schema(self) -> pa.Schema | None:
        if self._lance is not None:
            return self._lance.schema
        dataset = self._parquet_dataset()
        return dataset.schema if dataset is not None else None

    def _has_parquet(self) -> bool:
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def lookup(self, config_hash: str, column: str, values: Sequence[str],
               columns: Sequence[str] | None = None) -> pa.Table | None:
        """This config's rows whose `column` is in `values` (LanceDB when present: the commit point)."""
        if not values:
            return None
        if self.lance_db is not None:
            if self._lance is None:
                self._lance = open_table(self.lance_db, self.name)  # another writer may have created it
            if self._lance is None:
                return None
            q = self._lance.search().where(key_filter(config_hash, column, values))
            if columns:
                q = q.select(list(columns))
            return q.limit(None).to_arrow()
        dataset = self._parquet_dataset()
        if dataset is None:
            return None
        flt = (ds.field("config_hash") == config_hash) & ds.field(column).isin(list(values))
        return dataset.to_table(columns=list(columns) if columns else None, filter=flt)

    def _parquet_dataset(self) -> ds.Dataset | None:
        if self.parquet_dir is None or not self._has_parquet():
            return None
        dataset = ds.dataset(self.root, filesystem=self.fs, format="parquet")
        return dataset if dataset.files else None

    def count(self) -> int:
        if self._lance is not None:
            return self._lance.count_rows()
        dataset = self._parquet_dataset()
        return dataset.count_rows() if dataset is not None else 0

    # ---- writing ---------------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _parts_holding(self, keys: set[tuple[str, str]]) -> dict[str, set[tuple[str, str]]]:
        """{part file: the given keys it holds}."""
        by_config: dict[str, list[str]] = {}
        for vid, cfg in keys:
            by_config.setdefault(cfg, []).append(vid)
        out: dict[str, set[tuple[str, str]]] = {}
        for cfg, vids in by_config.items():
            cols = [self.key_column, "config_hash", "part"]
            found = self.lookup(cfg, self.key_column, vids, columns=cols)
            if found is None:
                continue
            for vid, c, part in zip(*(found.column(n).to_pylist() for n in cols), strict=True):
                if part:
                    out.setdefault(part, set()).add((vid, c))
        return out

    def commit(self, upserts: pa.Table | None, deletes: Sequence[tuple[str, str]] = (), *, run_id: str) -> str | None:
        """Make `upserts` the current rows of their keys and remove `deletes`, in both stores, all or nothing.
        The caller holds the index lock. Returns the new Parquet part's name (None if none was written)."""
        upserts = upserts if upserts is not None and upserts.num_rows else None
        if upserts is None and not deletes:
            return None
        keys = set(deletes)
        if upserts is not None:
            keys |= set(zip(upserts.column(self.key_column).to_pylist(),
                            upserts.column("config_hash").to_pylist(), strict=True))
        txn = f"{run_id}-{uuid.uuid4().hex[:8]}"
        part = f"part-{txn}.parquet" if upserts is not None else None
        if upserts is not None:
            upserts = upserts.set_column(upserts.schema.get_field_index("part"), "part",
                                         pa.array([part] * upserts.num_rows, pa.string()))
        journal: dict[str, Any] = {"txn": txn, "add": part, "rewrite": [], "remove": [],
                                   "deletes": [list(k) for k in deletes]}
        if self.parquet_dir is not None:
            self.fs.create_dir(self._path(STAGING), recursive=True)
            for old, held in self._parts_holding(keys).items():
                table = pq.read_table(self._path(old), filesystem=self.fs)
                keep = pc.invert(_key_mask(table, held, self.key_column))
                table = table.filter(keep)
                if table.num_rows:
                    write_parquet(self.fs, self._path(STAGING, old + ".rewrite.staged"), table)
                    journal["rewrite"].append(old)
                else:
                    journal["remove"].append(old)
            if upserts is not None:
                write_parquet(self.fs, self._path(STAGING, part + ".staged"), upserts)
            crash_point("staged")
            write_atomic(self.fs, self._path(JOURNAL, txn + ".json"), json.dumps(journal).encode())
            crash_point("journaled")
        if self.lance_db is not None:
            self._commit_lance(upserts, deletes)
            crash_point("lance-committed")
        if self.parquet_dir is not None:
            self._apply(journal)
        return part

    def _commit_lance(self, upserts: pa.Table | None, deletes: Sequence[tuple[str, str]]) -> None:
        if upserts is not None:
            if self._lance is None:
                self._lance = self.lance_db.create_table(self.name, schema=upserts.schema)
            # on_bad_vectors="null": a null embedding is a valid value here, but merge_insert's vector check
            # counts it as a "variable length vector" when it leads a batch.
            (self._lance.merge_insert([self.key_column, "config_hash"]).when_matched_update_all()
             .when_not_matched_insert_all().execute(upserts, on_bad_vectors="null"))
        if deletes and self._lance is not None:
            by_config: dict[str, list[str]] = {}
            for vid, cfg in deletes:
                by_config.setdefault(cfg, []).append(vid)
            for cfg, vids in by_config.items():
                self._lance.delete(key_filter(cfg, self.key_column, vids))

    def _apply(self, journal: dict[str, Any]) -> None:
        if journal["add"]:
            staged = self._path(STAGING, journal["add"] + ".staged")
            if self._exists(staged):
                self.fs.move(staged, self._path(journal["add"]))
            crash_point("applied-new")
        for old in journal["rewrite"]:
            staged = self._path(STAGING, old + ".rewrite.staged")
            if self._exists(staged):
                self.fs.move(staged, self._path(old))  # replaces the whole file at once
        for old in journal["remove"]:
            if self._exists(self._path(old)):
                self.fs.delete_file(self._path(old))
        self.fs.delete_file(self._path(JOURNAL, journal["txn"] + ".json"))

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type == pafs.FileType.File

    def _listdir(self, sub: str) -> list[str]:
        info = self.fs.get_file_info(pafs.FileSelector(self._path(sub), allow_not_found=True))
        return sorted(posixpath.basename(i.path) for i in info if i.type == pafs.FileType.File)

    def recover(self) -> dict[str, int]:
        """Finish or discard what a crashed writer left (call under the index lock before writing)."""
        done = {"applied": 0, "discarded": 0, "orphans": 0}
        if self.parquet_dir is None or not self._has_parquet():
            return done
        referenced: set[str] = set()
        for name in self._listdir(JOURNAL):
            if not name.endswith(".json"):
                self.fs.delete_file(self._path(JOURNAL, name))  # a temp file of an interrupted write
                continue
            with self.fs.open_input_stream(self._path(JOURNAL, name)) as f:
                journal = json.loads(f.read())
            if self._committed(journal):
                if self.lance_db is not None:
                    self._commit_lance(None, [tuple(k) for k in journal["deletes"]])
                self._apply(journal)
                done["applied"] += 1
            else:
                for staged in self._staged_names(journal):
                    if self._exists(self._path(STAGING, staged)):
                        self.fs.delete_file(self._path(STAGING, staged))
                self.fs.delete_file(self._path(JOURNAL, name))
                done["discarded"] += 1
            referenced |= set(self._staged_names(journal))
        for name in self._listdir(STAGING):
            self.fs.delete_file(self._path(STAGING, name))  # staged before its journal was written
            done["orphans"] += 1
        if any(done.values()):
            log.warning("%s: recovered an interrupted commit: %s", self._where, done)
        return done

    @staticmethod
    def _staged_names(journal: dict[str, Any]) -> list[str]:
        names = [journal["add"] + ".staged"] if journal["add"] else []
        return names + [old + ".rewrite.staged" for old in journal["rewrite"]]

    def _committed(self, journal: dict[str, Any]) -> bool:
        if self.lance_db is None or not journal["add"]:
            return True  # the journal is the commit point (Parquet only), or deletes only: idempotent
        table = self._lance if self._lance is not None else open_table(self.lance_db, self.name)
        if table is None:
            return False
        self._lance = table
        return table.count_rows(f"part = {sql_str(journal['add'])}") > 0


def _key_mask(table: pa.Table, keys: set[tuple[str, str]], key_column: str = "video_id") -> pa.Array:
    """True where the row's (key_column, config_hash) is in `keys`."""
    joined = pc.binary_join_element_wise(table.column(key_column), table.column("config_hash"), "\x1f")
    return pc.is_in(joined, value_set=pa.array([f"{v}\x1f{c}" for v, c in keys], pa.string()))


__all__ = ["TableStore", "KEY", "crash_point", "key_filter", "sql_str"]

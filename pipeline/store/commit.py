"""One logical table (a view, the cells, the error ledger) in up to two stores — a Parquet dataset and a LanceDB
table — holding exactly ONE current row per key in each, whatever crashes.

A plain reader of the Parquet dataset (pyarrow, DuckDB: `read_parquet('<dir>/*.parquet')`) must see no
duplicates without knowing our rules, so a row that replaces an older one takes the old row out of its part
file: copy-on-write of the few part files that hold superseded keys.

The commit protocol (`commit`), under the index lock (`pipeline.store.locks`):
  1. find the rows of the keys being replaced or deleted, and the part files that hold them (LanceDB's `part`
     column, else a scan);
  2. stage the new part `_staging/<N>.staged` and each rewritten old part `_staging/<P>.rewrite.staged`
     (names no reader globs: `_` folders and non-.parquet names are skipped by pyarrow and DuckDB);
  3. write the journal `_journal/<txn>.json` naming what moves where;
  4. commit LanceDB (the commit point when LanceDB is configured): merge_insert the rows (with part=N) — append
     them when step 1 found none of their keys, one commit either way — then delete the deleted keys;
  5. apply the journal: staged files into place (a rename / one PUT replaces a whole file atomically), drop
     emptied parts, remove the journal.
`recover()` (at open): a journal whose LanceDB rows exist (or with no LanceDB, whose journal exists) is
applied again — every step is idempotent; any other journal and every unreferenced staged file is discarded.
So a SIGKILL at any point leaves both stores as before the commit or as after it.

Compaction (`compact`) folds small parts into parts of a target size, with the same journal: the merged part is
staged, the journal names it, the parts it replaces and their new home; applying it moves the merged part into
place, records the move in `_parts/map.json` (rows keep the `part` they were committed with: the map says which
file holds them now — no row of LanceDB is rewritten), then deletes the old parts. LanceDB is not touched, so the
journal itself is the commit point. A reader that lists the folder between the move and the last delete sees the
merged rows twice: that window is one rename plus the deletes (milliseconds locally, about a round trip per old
part on S3); readers that must never see it read through LanceDB, or take the files named by `parquet_files()`.

Each step passes a named point (`staged`, `journaled`, `lance-committed`, `applied-new`) to the hooks in
`COMMIT_HOOKS` — how the exactly-once tests stop a real writer there.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import uuid
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.io.sources import S3Options
from pipeline.store.files import filesystem, write_atomic, write_parquet
from pipeline.store.lance import key_filter, open_table, sql_in, sql_str
from schemas import SCHEMA_VERSION, check_schema, schema_version

log = logging.getLogger(__name__)

STAGING, JOURNAL, PARTS = "_staging", "_journal", "_parts"
TARGET_PART_BYTES = 128 << 20  # compacted parts grow to about this size
SMALL_PARTS = 8  # parts below the target that trigger a compaction
# LanceDB versions older than this go at each fold: readers see the latest version on every read, and a minute
# covers a read that started before a compaction rewrote its fragments
KEEP_VERSIONS_S = 60.0
Key = tuple[str, ...]
# Called with each commit step's name and the table's as it is passed (tests inject crashes here).
COMMIT_HOOKS: list[Callable[[str, str], None]] = []


def _passed(point: str, table: str) -> None:
    for hook in COMMIT_HOOKS:
        hook(point, table)


def check_existing(actual: pa.Schema, expected: pa.Schema, what: str) -> None:
    """An existing table must be this release's version and match the schema (order aside)."""
    version = schema_version(actual)
    if version is not None and version > SCHEMA_VERSION:
        raise ValueError(f"{what} was written by a newer release of stllm-index (schema version {version}; this "
                         f"one reads up to {SCHEMA_VERSION}): upgrade stllm-index to use this index")
    if version is not None and version != SCHEMA_VERSION:
        raise ValueError(f"{what} holds schema version {version}; this build writes {SCHEMA_VERSION} (a run "
                         "migrates it first)")
    try:
        check_schema(actual, expected)
    except ValueError as e:
        raise ValueError(f"{what} does not match the schema: {e}") from None


class TableStore:
    """`name` in the Parquet root `<parquet_root>/<name>/` and/or the LanceDB database `lance_db`, one row per
    `key` (a tuple of columns). `locate_by`: an indexed column whose value the key fixes (a cell's content), by
    which a commit finds the rows its keys already have."""

    def __init__(self, name: str, *, parquet_root: str | None, lance_db: Any | None, s3: S3Options | None,
                 key: Key, schema: pa.Schema | None = None, lance_uri: str = "", locate_by: str | None = None):
        if parquet_root is None and lance_db is None:
            raise ValueError("a table needs a Parquet root, a LanceDB database, or both")
        self.name, self.s3, self.lance_db, self.key = name, s3, lance_db, key
        self.locate_by = locate_by
        self.parquet_dir = None if parquet_root is None else (
            parquet_root.rstrip("/") + "/" + name if parquet_root.startswith("s3://")
            else os.path.join(parquet_root, name))
        if self.parquet_dir is not None:
            self.fs, self.root = filesystem(self.parquet_dir, s3)
        self.schema = schema
        self._lance = open_table(lance_db, name) if lance_db is not None else None
        self.where = f"{lance_uri or 'LanceDB'} table '{name}'"
        if schema is not None and (existing := self.existing_schema()) is not None:
            check_existing(existing, schema, self.where)

    # ---- reading ---------------------------------------------------------------------------------------

    @property
    def lance_table(self) -> Any | None:
        if self._lance is None and self.lance_db is not None:
            self._lance = open_table(self.lance_db, self.name)  # another writer may have created it
        return self._lance

    def existing_schema(self) -> pa.Schema | None:
        if self.lance_table is not None:
            return self.lance_table.schema
        dataset = self._parquet_dataset()
        return dataset.schema if dataset is not None else None

    def _has_parquet(self) -> bool:
        return self.fs.get_file_info(self.root).type == pafs.FileType.Directory

    def lookup(self, column: str, values: Sequence[Any], columns: Sequence[str] | None = None,
               **equal: str) -> pa.Table | None:
        """Rows whose `column` is in `values` (and whose `equal` columns hold those values); LanceDB when present:
        the commit point."""
        if not values:
            return None
        if self.lance_db is not None:
            if self.lance_table is None:
                return None
            where = " AND ".join([sql_in(column, values), *(f"{c} = {sql_str(v)}" for c, v in equal.items())])
            q = self.lance_table.search().where(where)
            if columns:
                q = q.select(list(columns))
            return q.limit(None).to_arrow()
        dataset = self._parquet_dataset()
        if dataset is None:
            return None
        flt = ds.field(column).isin(list(values))
        for c, v in equal.items():
            flt = flt & (ds.field(c) == v)
        return dataset.to_table(columns=list(columns) if columns else None, filter=flt)

    def _parquet_dataset(self) -> ds.Dataset | None:
        if self.parquet_dir is None or not self._has_parquet():
            return None
        dataset = ds.dataset(self.root, filesystem=self.fs, format="parquet")
        return dataset if dataset.files else None

    def read_all(self, columns: Sequence[str] | None = None, where: str | None = None) -> pa.Table | None:
        """Every row (`where`: a LanceDB filter, applied when the table is in LanceDB)."""
        if self.lance_table is not None:
            q = self.lance_table.search()
            if where:
                q = q.where(where)
            if columns:
                q = q.select(list(columns))
            return q.limit(None).to_arrow()
        dataset = self._parquet_dataset()
        return None if dataset is None else dataset.to_table(columns=list(columns) if columns else None)

    def count(self, where: str | None = None) -> int:
        if self.lance_table is not None:
            return self.lance_table.count_rows(where)
        dataset = self._parquet_dataset()
        if dataset is None:
            return 0
        return dataset.count_rows() if where is None else self.read_all(where=where).num_rows

    # ---- writing ---------------------------------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _keys_of(self, table: pa.Table) -> set[tuple[str, ...]]:
        return set(zip(*(table.column(c).to_pylist() for c in self.key), strict=True))

    def _parts_map(self) -> dict[str, str]:
        """{part a row was committed in: the part that holds it now} for parts compacted away."""
        path = self._path(PARTS, "map.json")
        if not self._exists(path):
            return {}
        with self.fs.open_input_stream(path) as f:
            return json.loads(f.read())

    def _holder(self, part: str, moved: dict[str, str]) -> str:
        while part in moved:  # a compacted part may itself have been compacted since
            part = moved[part]
        return part

    def _existing(self, upserts: pa.Table | None, keys: set[Key], deletes: Sequence[Key]) -> dict[Key, str | None]:
        """{key: the part it was committed in (None: a LanceDB-only row)} of `keys` (the upserts') and `deletes`
        that the table holds now. Upserted keys are found through `locate_by` when the table has one: a column
        fixed by the key (a cell's content) and indexed, so one commit's thousands of keys are a few hundred
        values."""
        cols = [*self.key, "part"]
        wanted = keys | set(deletes)
        found = []
        by_key = set(deletes)
        if self.locate_by is not None and upserts is not None:
            found.append(self.lookup(self.locate_by, sorted(set(upserts.column(self.locate_by).to_pylist())), cols))
        else:
            by_key |= keys
        by_rest: dict[tuple[str, ...], list[str]] = {}
        for k in by_key:
            by_rest.setdefault(tuple(k[1:]), []).append(k[0])
        for rest, firsts in by_rest.items():
            found.append(self.lookup(self.key[0], sorted(firsts), columns=cols,
                                     **dict(zip(self.key[1:], rest, strict=True))))
        out: dict[Key, str | None] = {}
        for table in filter(None, found):
            for *k, part in zip(*(table.column(n).to_pylist() for n in cols), strict=True):
                if tuple(k) in wanted:
                    out[tuple(k)] = part
        return out

    def _parts_holding(self, existing: dict[Key, str | None]) -> dict[str, set[Key]]:
        """{part file: the keys it holds} of these rows."""
        moved = self._parts_map()
        out: dict[str, set[Key]] = {}
        for k, part in existing.items():
            if part:
                out.setdefault(self._holder(part, moved), set()).add(k)
        return out

    def commit(self, upserts: pa.Table | None, deletes: Sequence[tuple[str, ...]] = (), *,
               run_id: str) -> str | None:
        """Make `upserts` the current rows of their keys and remove `deletes`, in both stores, all or nothing.
        The caller holds the index lock. Returns the new Parquet part's name (None if none was written)."""
        upserts = upserts if upserts is not None and upserts.num_rows else None
        deletes = [tuple(k) for k in deletes]
        if upserts is None and not deletes:
            return None
        keys = self._keys_of(upserts) if upserts is not None else set()
        existing = self._existing(upserts, keys, deletes)
        # nothing to replace (a first run over an archive): LanceDB appends, which costs the same at any table
        # size; merge_insert joins against the whole key column (or its index and every unindexed fragment)
        append = upserts is not None and not existing and len(keys) == upserts.num_rows
        txn = f"{run_id}-{uuid.uuid4().hex[:8]}"
        part = f"part-{txn}.parquet" if upserts is not None else None
        if upserts is not None:
            upserts = upserts.set_column(upserts.schema.get_field_index("part"), "part",
                                         pa.array([part] * upserts.num_rows, pa.string()))
        journal: dict[str, Any] = {"txn": txn, "add": part, "rewrite": [], "remove": [],
                                   "deletes": [list(k) for k in deletes]}
        if self.parquet_dir is not None:
            self.fs.create_dir(self._path(STAGING), recursive=True)
            for old, held in self._parts_holding(existing).items():
                if not self._exists(self._path(old)):
                    continue  # its rows were all superseded and the part removed
                table = pq.read_table(self._path(old), filesystem=self.fs)
                table = table.filter(pc.invert(self._key_mask(table, held)))
                if table.num_rows:
                    write_parquet(self.fs, self._path(STAGING, old + ".rewrite.staged"), table)
                    journal["rewrite"].append(old)
                else:
                    journal["remove"].append(old)
            if upserts is not None:
                write_parquet(self.fs, self._path(STAGING, part + ".staged"), upserts)
            _passed("staged", self.name)
            write_atomic(self.fs, self._path(JOURNAL, txn + ".json"), json.dumps(journal).encode())
            _passed("journaled", self.name)
        if self.lance_db is not None:
            self._commit_lance(upserts, deletes, append=append)
            _passed("lance-committed", self.name)
        if self.parquet_dir is not None:
            self._apply(journal)
        return part

    def replace_all(self, table: pa.Table, *, run_id: str) -> None:
        """Make `table` the whole content of both stores (a schema migration), with the same protocol: the new
        part is staged and journaled, LanceDB overwritten (one commit), then every old part removed."""
        txn = f"{run_id}-{uuid.uuid4().hex[:8]}"
        part = f"part-{txn}.parquet"
        table = table.set_column(table.schema.get_field_index("part"), "part",
                                 pa.array([part] * table.num_rows, pa.string()))
        journal: dict[str, Any] = {"txn": txn, "add": part, "rewrite": [], "remove": [], "deletes": []}
        if self.parquet_dir is not None:
            self.fs.create_dir(self._path(STAGING), recursive=True)
            journal["remove"] = [n for n in self._listdir("") if n.endswith(".parquet")]
            write_parquet(self.fs, self._path(STAGING, part + ".staged"), table)
            write_atomic(self.fs, self._path(JOURNAL, txn + ".json"), json.dumps(journal).encode())
        if self.lance_db is not None:
            self._lance = self.lance_db.create_table(self.name, table, mode="overwrite")
        if self.parquet_dir is not None:
            self._apply(journal)

    def _commit_lance(self, upserts: pa.Table | None, deletes: Sequence[tuple[str, ...]], *,
                      append: bool = False) -> None:
        """One LanceDB commit for the upserts (`append`: none of their keys is there), then the deletes."""
        if upserts is not None:
            if self.lance_table is None:
                self._lance = self.lance_db.create_table(self.name, schema=upserts.schema)
            # on_bad_vectors="null": a null embedding is a valid value here, but LanceDB's vector check counts it
            # as a "variable length vector" when it leads a batch.
            if append:
                self._lance.add(upserts, on_bad_vectors="null")
            else:
                (self._lance.merge_insert(list(self.key)).when_matched_update_all()
                 .when_not_matched_insert_all().execute(upserts, on_bad_vectors="null"))
        if deletes and self.lance_table is not None:
            self._lance.delete(key_filter(self.key, deletes))

    def parquet_files(self) -> list[str]:
        """The part files that hold the table now (a reader that must not see a compaction's window reads these:
        they are listed once, before any old part is deleted and after the merged one is in place)."""
        return [self._path(n) for n in self._listdir("") if n.endswith(".parquet")]

    def fold(self, *, run_id: str, keep_versions_s: float = KEEP_VERSIONS_S,
             scalar_columns: Sequence[str] = ()) -> dict[str, Any]:
        """What keeps a long run's commits cheap, between two of them (the caller holds the index lock): small
        Parquet parts compacted; LanceDB's new fragments compacted and folded into its indexes (the scalar indexes
        lookups filter on made on first use), old versions removed."""
        done: dict[str, Any] = {"parquet": self.compact(run_id=run_id)}
        table = self.lance_table
        if table is not None:
            from lancedb.index import BTree

            existing = {idx.columns[0] for idx in table.list_indices()}
            for col in scalar_columns:
                if col not in existing:
                    table.create_index(col, config=BTree(), replace=True)
            table.optimize(cleanup_older_than=timedelta(seconds=keep_versions_s))
            done["lance_version"] = table.version
        return done

    def compact(self, *, run_id: str, target_bytes: int = TARGET_PART_BYTES,
                small_parts: int = SMALL_PARTS) -> dict[str, int]:
        """Fold small Parquet parts (below `target_bytes`), once there are `small_parts` of them, into parts of about
        `target_bytes`, smallest first. The caller holds the index lock. Returns {"merged": parts, "into": parts}."""
        if self.parquet_dir is None or not self._has_parquet():
            return {"merged": 0, "into": 0}
        infos = self.fs.get_file_info(pafs.FileSelector(self.root))
        small = sorted((i.size, i.base_name) for i in infos
                       if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and i.size < target_bytes)
        if len(small) < small_parts:
            return {"merged": 0, "into": 0}
        groups: list[list[str]] = [[]]
        total = 0
        for size, name in small:
            if groups[-1] and total + size > target_bytes:
                groups.append([])
                total = 0
            groups[-1].append(name)
            total += size
        groups = [g for g in groups if len(g) > 1]
        merged = into = 0
        for group in groups:
            self._compact_group(group, run_id)
            merged, into = merged + len(group), into + 1
        return {"merged": merged, "into": into}

    def _compact_group(self, parts: list[str], run_id: str) -> None:
        txn = f"{run_id}-compact-{uuid.uuid4().hex[:8]}"
        new = f"part-{txn}.parquet"
        table = pa.concat_tables([pq.read_table(self._path(p), filesystem=self.fs) for p in parts],
                                 promote_options="default")
        self.fs.create_dir(self._path(STAGING), recursive=True)
        write_parquet(self.fs, self._path(STAGING, new + ".staged"), table)
        _passed("compact-staged", self.name)
        journal = {"txn": txn, "add": new, "rewrite": [], "remove": parts, "deletes": [],
                   "moved": dict.fromkeys(parts, new)}
        write_atomic(self.fs, self._path(JOURNAL, txn + ".json"), json.dumps(journal).encode())
        _passed("compact-journaled", self.name)
        self._apply(journal)

    def _apply(self, journal: dict[str, Any]) -> None:
        if journal["add"]:
            staged = self._path(STAGING, journal["add"] + ".staged")
            if self._exists(staged):
                self.fs.move(staged, self._path(journal["add"]))
            _passed("applied-new", self.name)
        for old in journal["rewrite"]:
            staged = self._path(STAGING, old + ".rewrite.staged")
            if self._exists(staged):
                self.fs.move(staged, self._path(old))  # replaces the whole file at once
        if journal.get("moved"):  # a compaction: where the rows of the parts it folds in live now
            moved = self._parts_map()
            moved.update(journal["moved"])
            live = {n for n in self._listdir("") if n.endswith(".parquet")}
            # entries whose holder is gone (every row superseded since) say nothing any more
            moved = {k: v for k, v in moved.items() if self._holder(v, moved) in live}
            write_atomic(self.fs, self._path(PARTS, "map.json"), json.dumps(moved, sort_keys=True).encode())
            _passed("compact-mapped", self.name)
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
            log.warning("%s: recovered an interrupted commit: %s", self.where, done)
        return done

    @staticmethod
    def _staged_names(journal: dict[str, Any]) -> list[str]:
        names = [journal["add"] + ".staged"] if journal["add"] else []
        return names + [old + ".rewrite.staged" for old in journal["rewrite"]]

    def _committed(self, journal: dict[str, Any]) -> bool:
        if journal.get("moved"):
            return True  # a compaction: LanceDB is not touched, the journal is the commit point
        if self.lance_db is None or not journal["add"]:
            return True  # the journal is the commit point (Parquet only), or deletes only: idempotent
        table = self.lance_table
        return table is not None and table.count_rows(f"part = {sql_str(journal['add'])}") > 0

    def _key_mask(self, table: pa.Table, keys: set[tuple[str, ...]]) -> pa.Array:
        """True where the row's key is in `keys`."""
        if len(self.key) == 1:
            return pc.is_in(table.column(self.key[0]), value_set=pa.array([k[0] for k in keys], pa.string()))
        joined = pc.binary_join_element_wise(*(table.column(c) for c in self.key), "\x1f")
        return pc.is_in(joined, value_set=pa.array(["\x1f".join(k) for k in keys], pa.string()))


__all__ = ["TableStore", "COMMIT_HOOKS", "KEEP_VERSIONS_S", "check_existing"]

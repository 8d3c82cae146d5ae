"""Clinical review of contours: 0–3 scores, append-only logs, blinded mode, summaries.

The scale (the paper's Table 2) — a score of 2 or more is *acceptable*:

* 0 — severe defect, large and obvious errors;
* 1 — moderate defect, minor correctable errors;
* 2 — mild defect, clinically insignificant errors;
* 3 — precise, no editing needed.

A :class:`ReviewRecord` is one score for one segment of one segmentation of one
case by one reviewer. Records are appended — never rewritten — to a review log
folder holding ``review-log.csv`` and ``review-log.jsonl`` (same fields). A
re-score is a new record; summaries use the latest record per
(case, segmentation, segment, reviewer). Appends take an exclusive
``fcntl.flock`` on ``.review-log.lock`` and write each batch with one
``O_APPEND`` write followed by ``fsync``, so concurrent reviewers never
interleave or lose rows. A corrupt line is reported and skipped; the file is
never discarded or rewritten.

Blinded mode shows two segmentations of the same CT as "Set A" / "Set B" in a
per-case random order stored in an assignment JSON file; the true source is
hidden until the review is submitted, and records keep it in ``source``.

MRML glue (function-level imports, works with a real slicer-core scene):
:func:`records_to_table_node`, :func:`table_node_to_records`,
:func:`metrics_to_table_node`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .errors import ReviewError
from .imageio import atomic_file, check_output

#: Score definitions shown in the UI and reports.
SCORE_DEFINITIONS = {
    0: "Severe defect: large and obvious errors",
    1: "Moderate defect: minor correctable errors",
    2: "Mild defect: clinically insignificant errors",
    3: "Precise: no editing needed",
}
SCORE_SHORT = {0: "severe", 1: "moderate", 2: "mild", 3: "precise"}
ACCEPTABLE_MIN_SCORE = 2
MODES = ("open", "blinded")
SET_LABELS = ("Set A", "Set B")

#: Log columns, in this exact order (CSV header and JSONL keys).
FIELDS = ("case_id", "segmentation", "segment", "score", "comment", "reviewer", "timestamp_utc", "model",
          "mode", "source")

LOG_BASENAME = "review-log"
LOCK_NAME = ".review-log.lock"


def is_acceptable(score: int) -> bool:
    return int(score) >= ACCEPTABLE_MIN_SCORE


def now_utc() -> str:
    """ISO 8601 UTC timestamp with microseconds, e.g. ``2026-11-23T12:00:00.123456Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_timestamp(text: str) -> datetime:
    t = text.strip()
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    dt = datetime.fromisoformat(t)
    if dt.tzinfo is None:
        raise ValueError("timestamp has no time zone")
    return dt.astimezone(timezone.utc)


def _clean_text(value) -> str:
    """Single-line text: CR/LF/tab become spaces (logs are line-oriented), surrounding blanks trimmed."""
    text = "" if value is None else str(value)
    for ch in ("\r\n", "\r", "\n", "\t"):
        text = text.replace(ch, " ")
    return text.strip()


@dataclass
class ReviewRecord:
    """One score. ``validate()`` (called by the log) normalises and checks every field."""

    case_id: str
    segmentation: str
    segment: str
    score: int
    comment: str = ""
    reviewer: str = ""
    timestamp_utc: str = field(default_factory=now_utc)
    model: str = ""
    mode: str = "open"
    source: str = ""

    def validate(self) -> "ReviewRecord":
        for name in FIELDS:
            if name != "score":
                setattr(self, name, _clean_text(getattr(self, name)))
        problems = []
        for name in ("case_id", "segmentation", "segment", "reviewer"):
            if not getattr(self, name):
                problems.append(f"{name} is empty")
        score = self.score
        try:
            if isinstance(score, bool) or (isinstance(score, float) and not float(score).is_integer()):
                raise ValueError
            score = int(str(score).strip()) if not isinstance(score, int) else score
        except (TypeError, ValueError):
            problems.append(f"score {self.score!r} is not an integer 0-3")
        else:
            if score not in SCORE_DEFINITIONS:
                problems.append(f"score {score} is outside 0-3")
            self.score = score
        if self.mode not in MODES:
            problems.append(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        try:
            self.timestamp_utc = _parse_timestamp(self.timestamp_utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        except (TypeError, ValueError):
            problems.append(f"timestamp {self.timestamp_utc!r} is not an ISO 8601 UTC time")
        if problems:
            raise ReviewError(f"Invalid review record ({self.case_id or '?'} / {self.segment or '?'}): "
                              + "; ".join(problems) + ".")
        return self

    @property
    def acceptable(self) -> bool:
        return is_acceptable(self.score)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in FIELDS}

    @classmethod
    def from_dict(cls, d: dict) -> "ReviewRecord":
        missing = [k for k in FIELDS if k not in d]
        if missing:
            raise ReviewError(f"Review record lacks field(s): {', '.join(missing)}.")
        return cls(**{k: d[k] for k in FIELDS}).validate()

    def key(self) -> tuple:
        """Identity for "latest record wins": (case, segmentation, segment, reviewer)."""
        return (self.case_id, self.segmentation, self.segment, self.reviewer)


# ---------------------------------------------------------------------------------------------
# Case ids

_PATIENT_KEYS = ("PatientID", "patient_id", "patientId", "0010|0020", "00100020")
_STUDY_KEYS = ("StudyInstanceUID", "study_uid", "studyInstanceUID", "0020|000d", "0020|000D", "0020000D")


def _first(meta: dict, keys) -> str:
    for k in keys:
        v = meta.get(k)
        if v is not None and str(v).strip():
            return str(v).strip()
    return ""


def case_id_from(metadata: dict | None = None, volume_name: str | None = None) -> str:
    """Case id: ``PatientID/StudyInstanceUID`` (either alone if only one is known), else the volume name.

    ``metadata`` accepts DICOM keywords, snake_case names or SimpleITK tag keys
    (``0010|0020``, ``0020|000d``).
    """
    meta = metadata or {}
    patient, study = _first(meta, _PATIENT_KEYS), _first(meta, _STUDY_KEYS)
    if patient and study:
        return f"{patient}/{study}"
    if patient or study:
        return patient or study
    name = _clean_text(volume_name)
    if not name:
        raise ReviewError("No case id: the volume has no DICOM patient/study id and no name. Name the volume.")
    return name


# ---------------------------------------------------------------------------------------------
# Append-only log


def _csv_line(record: ReviewRecord) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([str(getattr(record, k)) for k in FIELDS])
    return buf.getvalue()


def _header_line() -> str:
    return ",".join(FIELDS) + "\n"


class _Lock:
    """Exclusive inter-process lock on a lock file (fcntl.flock on POSIX, msvcrt.locking on Windows)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt
            import time

            while True:  # LK_LOCK retries for ~10 s then raises; keep waiting like flock does
                try:
                    msvcrt.locking(self.fd, msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    time.sleep(0.05)
        else:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt

            os.lseek(self.fd, 0, os.SEEK_SET)
            msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)
        else:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _append_bytes(path: Path, data: bytes, header: bytes = b"") -> None:
    """One O_APPEND write (header first if the file is new/empty; newline fix-up after a torn line)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        prefix = b""
        if size == 0:
            prefix = header
        else:
            with open(path, "rb") as fh:  # a crash may have left a torn last line: start on a new one
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    prefix = b"\n"
        payload = prefix + data
        written = 0
        while written < len(payload):  # os.write may be partial on some file systems
            written += os.write(fd, payload[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _roll_back(before) -> None:
    """Restore files to their recorded sizes (``None``: the file did not exist), best effort."""
    for path, size in before:
        try:
            if size is None:
                if path.exists():
                    path.unlink()
            elif path.stat().st_size != size:
                os.truncate(path, size)
        except OSError:
            pass


class ReviewLog:
    """A review log folder: ``review-log.csv`` + ``review-log.jsonl`` (+ the lock file)."""

    def __init__(self, folder, create: bool = True):
        self.folder = Path(folder)
        if not self.folder.exists():
            if not create:
                raise ReviewError(f"Review log folder {self.folder} does not exist.")
            if not self.folder.parent.exists():
                raise ReviewError(f"Cannot create the review log folder {self.folder}: "
                                  f"{self.folder.parent} does not exist. Pick an existing folder.")
            self.folder.mkdir(exist_ok=True)
        elif not self.folder.is_dir():
            raise ReviewError(f"{self.folder} is a file; pick a folder for the review log.")
        self.csv_path = self.folder / f"{LOG_BASENAME}.csv"
        self.jsonl_path = self.folder / f"{LOG_BASENAME}.jsonl"
        self.lock_path = self.folder / LOCK_NAME

    def append(self, records) -> int:
        """Validate all, then append the batch to both files under an exclusive lock. Returns the count."""
        records = [r if isinstance(r, ReviewRecord) else ReviewRecord.from_dict(r) for r in records]
        for r in records:
            r.validate()
        if not records:
            return 0
        csv_data = "".join(_csv_line(r) for r in records).encode("utf-8")
        jsonl_data = "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        try:
            with _Lock(self.lock_path):
                # both files or neither: if the second append fails, the first is rolled back, so a retry
                # does not duplicate rows
                before = [(p, p.stat().st_size if p.exists() else None) for p in (self.csv_path, self.jsonl_path)]
                try:
                    _append_bytes(self.csv_path, csv_data, _header_line().encode("utf-8"))
                    _append_bytes(self.jsonl_path, jsonl_data)
                except BaseException:
                    _roll_back(before)
                    raise
        except OSError as exc:
            raise ReviewError(f"Cannot append to the review log in {self.folder}: {exc.strerror or exc}. "
                              "Check the folder is writable.") from None
        return len(records)

    def read(self) -> tuple[list[ReviewRecord], list[str]]:
        """Records from the CSV (the primary log) and warnings for skipped lines."""
        if not self.csv_path.exists():
            return [], []
        return read_log(self.csv_path)


def read_csv_log(path) -> tuple[list[ReviewRecord], list[str]]:
    path = Path(path)
    records, warnings = [], []
    with open(path, "r", encoding="utf-8", errors="replace", newline="") as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    header = list(FIELDS)
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            cells = next(csv.reader([line]))
        except csv.Error as exc:
            warnings.append(f"{path}:{lineno}: unreadable CSV line skipped ({exc}).")
            continue
        if [c.strip() for c in cells] == list(FIELDS):
            continue  # header (also a repeated header from concatenated logs)
        if lineno == 1:
            warnings.append(f"{path}:1: header is not {','.join(FIELDS)}; assuming that column order.")
        if len(cells) != len(header):
            warnings.append(f"{path}:{lineno}: expected {len(header)} columns, found {len(cells)}; line skipped.")
            continue
        try:
            records.append(ReviewRecord.from_dict(dict(zip(header, cells))))
        except ReviewError as exc:
            warnings.append(f"{path}:{lineno}: {exc} Line skipped.")
    return records, warnings


def read_jsonl_log(path) -> tuple[list[ReviewRecord], list[str]]:
    path = Path(path)
    records, warnings = [], []
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                if not isinstance(d, dict):
                    raise ValueError("not a JSON object")
                records.append(ReviewRecord.from_dict(d))
            except (ValueError, ReviewError) as exc:
                warnings.append(f"{path}:{lineno}: {exc} Line skipped.")
    return records, warnings


def read_log(path) -> tuple[list[ReviewRecord], list[str]]:
    """Read a review log: a ``.csv``, a ``.jsonl`` or a log folder (its CSV). Corrupt lines → warnings."""
    path = Path(path)
    if path.is_dir():
        csv_path = path / f"{LOG_BASENAME}.csv"
        jsonl_path = path / f"{LOG_BASENAME}.jsonl"
        if csv_path.exists():
            return read_csv_log(csv_path)
        if jsonl_path.exists():
            return read_jsonl_log(jsonl_path)
        raise ReviewError(f"{path} holds no {LOG_BASENAME}.csv or {LOG_BASENAME}.jsonl.")
    if not path.exists():
        raise ReviewError(f"Review log not found: {path}.")
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        return read_jsonl_log(path)
    return read_csv_log(path)


def read_logs(paths) -> tuple[list[ReviewRecord], list[str]]:
    records, warnings = [], []
    for p in paths:
        r, w = read_log(p)
        records.extend(r)
        warnings.extend(w)
    return records, warnings


# ---------------------------------------------------------------------------------------------
# Latest record wins, summaries


def latest_records(records) -> list[ReviewRecord]:
    """The latest record (by timestamp, then by order) per (case, segmentation, segment, reviewer).

    Identical duplicates (the same record read from two logs) collapse too.
    """
    best: dict = {}
    for order, r in enumerate(records):
        ts = _parse_timestamp(r.timestamp_utc)
        k = r.key()
        if k not in best or (ts, order) >= best[k][0]:
            best[k] = ((ts, order), r)
    return [v[1] for v in sorted(best.values(), key=lambda x: x[0])]


def true_source(record: ReviewRecord) -> str:
    """The true source of a record (``"automatic [Set A]"`` → ``"automatic"``)."""
    s = record.source
    if s.endswith("]") and " [" in s:
        s = s[: s.rindex(" [")]
    return s or record.segmentation


def _score_stats(scores) -> dict:
    n = len(scores)
    dist = {str(k): sum(1 for s in scores if s == k) for k in SCORE_DEFINITIONS}
    return {"n": n, "mean_score": (sum(scores) / n) if n else math.nan,
            "acceptable_pct": (100.0 * sum(1 for s in scores if is_acceptable(s)) / n) if n else math.nan,
            "distribution": dist,
            "distribution_pct": {k: (100.0 * v / n if n else math.nan) for k, v in dist.items()}}


def summarise(records, source: str | None = None, case_id: str | None = None) -> dict:
    """Per-segment summary of the latest records (Table 2 layout).

    ``{"segments": {NAME: {"n", "mean_score", "acceptable_pct", "distribution": {"0".."3"},
    "distribution_pct", "by_reviewer": {REVIEWER: {...}}, "by_source": {SOURCE: {...}}}},
    "overall": {...}, "n_records": N, "reviewers": [...], "cases": N}``; ``acceptable_pct`` in percent.
    Optional filters: the true ``source`` and ``case_id``.
    """
    latest = latest_records(records)
    if source is not None:
        latest = [r for r in latest if true_source(r) == source]
    if case_id is not None:
        latest = [r for r in latest if r.case_id == case_id]
    segs: dict = {}
    for r in latest:
        segs.setdefault(r.segment, []).append(r)
    out = {"segments": {}, "n_records": len(latest),
           "reviewers": sorted({r.reviewer for r in latest}), "cases": len({r.case_id for r in latest})}
    for name, rs in segs.items():
        entry = _score_stats([r.score for r in rs])
        entry["by_reviewer"] = {rev: _score_stats([r.score for r in rs if r.reviewer == rev])
                                for rev in sorted({r.reviewer for r in rs})}
        entry["by_source"] = {src: _score_stats([r.score for r in rs if true_source(r) == src])
                              for src in sorted({true_source(r) for r in rs})}
        out["segments"][name] = entry
    out["overall"] = _score_stats([r.score for r in latest])
    return out


def summary_rows(summary: dict) -> list[dict]:
    """CSV rows: one per segment × reviewer (reviewer ``*`` = all reviewers)."""
    rows = []
    for name, s in summary["segments"].items():
        for rev, st in [("*", s)] + list(s["by_reviewer"].items()):
            row = {"segment": name, "reviewer": rev, "n": st["n"], "mean_score": st["mean_score"],
                   "acceptable_pct": st["acceptable_pct"]}
            row.update({f"n_score_{k}": v for k, v in st["distribution"].items()})
            rows.append(row)
    return rows


SUMMARY_CSV_FIELDS = ("segment", "reviewer", "n", "mean_score", "acceptable_pct", "n_score_0", "n_score_1",
                      "n_score_2", "n_score_3")


def format_summary(summary: dict) -> str:
    """Text table: per segment and reviewer, mean score, % acceptable and the 0–3 distribution."""
    lines = [f"{'Segment':<26} {'Reviewer':<14} {'n':>4} {'mean':>5} {'accept%':>8}   0    1    2    3"]
    for name, s in summary["segments"].items():
        for rev, st in [("all", s)] + list(s["by_reviewer"].items()):
            d = st["distribution"]
            lines.append(f"{name[:26]:<26} {rev[:14]:<14} {st['n']:>4} {st['mean_score']:>5.2f} "
                         f"{st['acceptable_pct']:>7.1f}% " + " ".join(f"{d[k]:>4}" for k in "0123"))
    return "\n".join(lines)


def plot_summary(summary: dict, path, force: bool = False, title: str | None = None):
    """Stacked horizontal bars of the 0–3 distribution (percent) per segment → PNG (atomic)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = check_output(path, force)
    names = list(summary["segments"])
    if not names:
        raise ReviewError("Nothing to plot: the review log has no records.")
    colours = {"0": "#c0392b", "1": "#e67e22", "2": "#f1c40f", "3": "#27ae60"}
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(names) + 1.6))
    left = [0.0] * len(names)
    for k in "0123":
        vals = [summary["segments"][n]["distribution_pct"][k] for n in names]
        ax.barh(names, vals, left=left, color=colours[k], label=f"{k}: {SCORE_SHORT[int(k)]}")
        left = [a + b for a, b in zip(left, vals)]
    for i, n in enumerate(names):
        s = summary["segments"][n]
        ax.text(101, i, f"mean {s['mean_score']:.2f}, {s['acceptable_pct']:.0f}% ok (n={s['n']})",
                va="center", fontsize=8)
    ax.set_xlim(0, 140)
    ax.set_xlabel("% of latest scores")
    ax.invert_yaxis()
    ax.legend(ncol=4, fontsize=8, loc="lower right")
    ax.set_title(title or "Clinical review scores per structure (≥2 acceptable)")
    fig.tight_layout()
    try:
        with atomic_file(path, ".png", force=force) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# Blinded mode


@dataclass
class BlindedAssignment:
    """Which segmentation is shown as "Set A" / "Set B" for one case. ``repr`` never shows sources."""

    case_id: str
    sets: dict = field(repr=False)  # {"Set A": {"source", "segmentation"}, "Set B": {...}}
    submitted: bool = False

    def labels(self) -> tuple[str, str]:
        return SET_LABELS

    def segmentation_for(self, label: str) -> str:
        """The segmentation (node/file name) to display under ``label`` (the UI must not show it)."""
        return self._entry(label)["segmentation"]

    def _entry(self, label):
        if label not in self.sets:
            raise ReviewError(f"Unknown blinded set {label!r}; use {' or '.join(SET_LABELS)}.")
        return self.sets[label]

    def reveal(self) -> dict:
        """``{"Set A": source, "Set B": source}`` — only after :meth:`submit`."""
        if not self.submitted:
            raise ReviewError("The sources stay hidden until the blinded review is submitted.")
        return {k: v["source"] for k, v in self.sets.items()}

    def record(self, label: str, segment: str, score, reviewer: str, comment: str = "", model: str = "",
               timestamp_utc: str | None = None) -> ReviewRecord:
        """A record for a score given to ``label``; it keeps the true source and segmentation."""
        e = self._entry(label)
        return ReviewRecord(case_id=self.case_id, segmentation=e["segmentation"], segment=segment, score=score,
                            comment=comment, reviewer=reviewer, timestamp_utc=timestamp_utc or now_utc(),
                            model=model, mode="blinded", source=f"{e['source']} [{label}]").validate()

    def submit(self, log: ReviewLog | None, records) -> list[ReviewRecord]:
        """Append the records (if a log is given) and unlock :meth:`reveal`."""
        records = list(records)
        for r in records:
            if r.case_id != self.case_id or r.mode != "blinded":
                raise ReviewError("Only blinded records of this case can be submitted with this assignment.")
        if log is not None:
            log.append(records)
        self.submitted = True
        return records


def assign_blinded(case_id: str, sources: dict, assignment_file=None, seed=None) -> BlindedAssignment:
    """Random "Set A"/"Set B" order for a case, stable once stored.

    ``sources``: two entries ``{source_label: segmentation_name}`` (e.g.
    ``{"automatic": "CT_auto", "manual": "CT_manual"}``). With ``seed`` the
    order is reproducible (``random.Random(f"{seed}:{case_id}")``), otherwise it
    uses the OS's entropy. With ``assignment_file`` (JSON) an existing entry for
    the case is reused (its sources must match), and new entries are added
    under a lock with an atomic rewrite of that file.
    """
    case_id = _clean_text(case_id)
    if not case_id:
        raise ReviewError("Blinded review needs a case id.")
    if len(sources) != 2:
        raise ReviewError(f"Blinded review needs exactly two segmentations, got {len(sources)}.")
    items = sorted((str(k), str(v)) for k, v in sources.items())

    def draw():
        rng = random.Random(f"{seed}:{case_id}") if seed is not None else secrets.SystemRandom()
        order = list(items)
        rng.shuffle(order)
        return {SET_LABELS[i]: {"source": s, "segmentation": seg} for i, (s, seg) in enumerate(order)}

    if assignment_file is None:
        return BlindedAssignment(case_id, draw())
    path = Path(assignment_file)
    if not path.parent.exists():
        raise ReviewError(f"Folder {path.parent} for the blinded assignment file does not exist.")
    with _Lock(path.with_name(f".{path.name}.lock")):
        data = {"version": 1, "cases": {}}
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(data.get("cases"), dict):
                    raise ValueError("no 'cases' object")
            except (ValueError, AttributeError) as exc:
                raise ReviewError(f"Blinded assignment file {path} is corrupt ({exc}); it was left untouched. "
                                  "Restore it from a backup or pick another file.") from None
        if case_id in data["cases"]:
            sets = data["cases"][case_id]
            stored = sorted((v["source"], v["segmentation"]) for v in sets.values())
            if stored != items:
                raise ReviewError(f"Case {case_id} was already assigned with other segmentations "
                                  f"({', '.join(s for s, _ in stored)}); use another assignment file.")
            return BlindedAssignment(case_id, {k: dict(v) for k, v in sets.items()})
        sets = draw()
        data["cases"][case_id] = sets
        if seed is not None:
            data.setdefault("seed", str(seed))
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return BlindedAssignment(case_id, sets)


# ---------------------------------------------------------------------------------------------
# Building records from a review form (used by the Review tab)


def build_records(case_id: str, segmentation: str, scores: dict, reviewer: str, comments: dict | None = None,
                  model: str = "", mode: str = "open", source: str = "", segments=None):
    """Records for the scored segments plus the list of unscored ones.

    ``scores``: ``{segment: score or None}``; ``segments`` (optional) is the
    full list of segments shown, so that missing ones are reported. Returns
    ``(records, missing_segments)``; the caller asks for confirmation when
    ``missing_segments`` is not empty.
    """
    comments = comments or {}
    names = list(segments) if segments is not None else list(scores)
    ts = now_utc()
    records, missing = [], []
    for name in names:
        score = scores.get(name)
        if score is None:
            missing.append(name)
            continue
        records.append(ReviewRecord(case_id, segmentation, name, score, comments.get(name, ""), reviewer, ts,
                                    model, mode, source or segmentation).validate())
    return records, missing


# ---------------------------------------------------------------------------------------------
# MRML glue (real slicer-core / Slicer classes; function-level imports)

TABLE_NODE_NAME = "ParotidOAR review"
METRICS_TABLE_NODE_NAME = "ParotidOAR metrics"
_QUOTE_IN_TABLE = "\u201d"  # Slicer's table storage does not escape '"'; store a typographic quote instead


def _add_string_column(table_node, name):
    import vtk

    arr = vtk.vtkStringArray()
    arr.SetName(name)
    table_node.AddColumn(arr)


def records_to_table_node(scene, records, name: str = TABLE_NODE_NAME, table_node=None):
    """Append records as rows of a ``vtkMRMLTableNode`` (created if needed; columns as the CSV).

    ``score`` is an integer column, the others strings. Existing rows are
    never changed. Double quotes in text are stored as ``”`` (Slicer's table
    files do not escape quotes); :func:`table_node_to_records` maps them back.
    """
    import vtk

    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    if table_node.GetNumberOfColumns() == 0:
        for col in FIELDS:
            if col == "score":
                arr = vtk.vtkIntArray()
                arr.SetName(col)
                table_node.AddColumn(arr)
            else:
                _add_string_column(table_node, col)
        table_node.SetUseColumnNameAsColumnHeader(True)
        table_node.SetColumnDescription("score", "0-3; " + "; ".join(f"{k} = {v}" for k, v in
                                                                   SCORE_DEFINITIONS.items()))
    cols = [table_node.GetColumnName(i) for i in range(table_node.GetNumberOfColumns())]
    if cols != list(FIELDS):
        raise ReviewError(f"Table node {table_node.GetName()!r} does not have the review columns "
                          f"({', '.join(FIELDS)}).")
    for r in records:
        r = r.validate() if isinstance(r, ReviewRecord) else ReviewRecord.from_dict(r)
        row = table_node.AddEmptyRow()
        for ci, col in enumerate(FIELDS):
            table_node.SetCellText(row, ci, str(getattr(r, col)).replace('"', _QUOTE_IN_TABLE))
    table_node.Modified()
    return table_node


def table_node_to_records(table_node) -> list[ReviewRecord]:
    """Records from a review table node (columns looked up by name)."""
    n_cols = table_node.GetNumberOfColumns()
    index = {table_node.GetColumnName(i): i for i in range(n_cols)}
    missing = [c for c in FIELDS if c not in index]
    if missing:
        raise ReviewError(f"Table {table_node.GetName()!r} lacks review column(s): {', '.join(missing)}.")
    out = []
    for row in range(table_node.GetNumberOfRows()):
        d = {c: table_node.GetCellText(row, index[c]).replace(_QUOTE_IN_TABLE, '"') for c in FIELDS}
        out.append(ReviewRecord.from_dict(d))
    return out


def metrics_to_table_node(scene, metrics_json: dict, name: str = METRICS_TABLE_NODE_NAME, table_node=None):
    """Per-segment metrics table (one row per segment) from a :func:`metrics.compare_segmentations` result.

    Numeric columns are doubles (NaN where undefined); ``flags`` is a string.
    An existing ``table_node`` is cleared and refilled (metrics are derived data).
    """
    import vtk

    from .metrics import EXTRA_KEYS, METRIC_KEYS

    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    else:
        table_node.RemoveAllColumns()
    _add_string_column(table_node, "segment")
    numeric = list(METRIC_KEYS) + list(EXTRA_KEYS)
    arrays = []
    for key in numeric:
        arr = vtk.vtkDoubleArray()
        arr.SetName(key)
        table_node.AddColumn(arr)
        arrays.append(arr)
    _add_string_column(table_node, "flags")
    table_node.SetUseColumnNameAsColumnHeader(True)
    table = table_node.GetTable()
    for seg_name, seg in metrics_json.get("segments", {}).items():
        row = table_node.AddEmptyRow()
        table_node.SetCellText(row, 0, str(seg_name))
        for ci, key in enumerate(numeric, start=1):
            v = seg.get(key)
            table.GetColumn(ci).SetValue(row, math.nan if v is None else float(v))
        table_node.SetCellText(row, len(numeric) + 1, ";".join(seg.get("flags", [])))
    for key in numeric:
        if key.endswith("_mm"):
            table_node.SetColumnUnitLabel(key, "mm")
        elif key.endswith("_cc"):
            table_node.SetColumnUnitLabel(key, "cc")
    table_node.Modified()
    return table_node


def rows_to_table_node(scene, rows, fields=None, name: str = "ParotidOAR table", table_node=None):
    """Generic rows (dicts) → table node (cleared and refilled): numbers as doubles, the rest as strings.

    Used for the dose table (``dose.dose_rows``). ``fields`` defaults to the first row's keys.
    """
    import vtk

    rows = list(rows)
    fields = list(fields or (rows[0].keys() if rows else []))
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    else:
        table_node.RemoveAllColumns()
    numeric = [bool(rows) and all(isinstance(r.get(f), (int, float)) or r.get(f) is None for r in rows)
               and any(isinstance(r.get(f), (int, float)) for r in rows) for f in fields]
    for f, is_num in zip(fields, numeric):
        arr = vtk.vtkDoubleArray() if is_num else vtk.vtkStringArray()
        arr.SetName(f)
        table_node.AddColumn(arr)
    table_node.SetUseColumnNameAsColumnHeader(True)
    table = table_node.GetTable()
    for r in rows:
        row = table_node.AddEmptyRow()
        for ci, (f, is_num) in enumerate(zip(fields, numeric)):
            v = r.get(f)
            if is_num:
                table.GetColumn(ci).SetValue(row, math.nan if v is None else float(v))
            else:
                table_node.SetCellText(row, ci, "" if v is None else str(v).replace('"', _QUOTE_IN_TABLE))
    table_node.Modified()
    return table_node

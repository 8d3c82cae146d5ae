"""Review: records, append-only logs (concurrent writers, corrupt lines), summaries, blinded mode, MRML tables."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from ParotidOARLib import review
from ParotidOARLib.errors import ReviewError
from ParotidOARLib.review import ReviewLog, ReviewRecord


def rec(segment="Parotid", score=3, reviewer="dr_a", ts="2026-11-23T10:00:00Z", case="P1", comment="",
        segmentation="auto", source="", mode="open"):
    return ReviewRecord(case, segmentation, segment, score, comment, reviewer, ts, "parotid-oar-research-v1",
                        mode, source)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ParotidOARLib", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# --------------------------------------------------------------------------------------------- records

def test_record_validation():
    r = rec(comment="line one\nline two", score="2").validate()
    assert r.score == 2 and r.comment == "line one line two" and r.acceptable
    assert r.timestamp_utc == "2026-11-23T10:00:00.000000Z"
    for bad in (dict(score=4), dict(score=-1), dict(score="x"), dict(score=2.5), dict(reviewer=""),
                dict(mode="sneaky"), dict(ts="yesterday"), dict(ts="2026-11-23T10:00:00"), dict(case=" ")):
        with pytest.raises(ReviewError):
            rec(**bad).validate()
    assert not review.is_acceptable(1) and review.is_acceptable(2)
    assert set(review.SCORE_DEFINITIONS) == {0, 1, 2, 3}
    assert review.FIELDS == ("case_id", "segmentation", "segment", "score", "comment", "reviewer",
                             "timestamp_utc", "model", "mode", "source")


def test_case_id_from_metadata():
    assert review.case_id_from({"PatientID": "HN-001", "StudyInstanceUID": "1.2.3"}) == "HN-001/1.2.3"
    assert review.case_id_from({"0010|0020": "HN-002 "}, "CT vol") == "HN-002"
    assert review.case_id_from({}, "phantom_003") == "phantom_003"
    assert review.case_id_from(None, "vol") == "vol"
    with pytest.raises(ReviewError):
        review.case_id_from({}, "")


# --------------------------------------------------------------------------------------------- log

def test_log_is_append_only(tmp_path):
    log = ReviewLog(tmp_path / "log")
    log.append([rec(), rec(segment="Skin", score=1, comment='edges "too" wide, redo')])
    first_csv = log.csv_path.read_bytes()
    first_jsonl = log.jsonl_path.read_bytes()
    assert first_csv.decode().splitlines()[0] == ",".join(review.FIELDS)
    log.append([rec(score=2, ts="2026-11-23T11:00:00Z")])
    assert log.csv_path.read_bytes().startswith(first_csv)
    assert log.jsonl_path.read_bytes().startswith(first_jsonl)
    records, warnings = log.read()
    assert warnings == [] and len(records) == 3
    assert records[1].comment == 'edges "too" wide, redo'
    assert log.csv_path.read_text().count("case_id,") == 1  # header written once
    jrecords, jw = review.read_log(log.jsonl_path)
    assert jw == [] and [r.to_dict() for r in jrecords] == [r.to_dict() for r in records]
    with pytest.raises(ReviewError):  # an invalid record in a batch: nothing of the batch is written
        log.append([rec(segment="Mastoid process"), rec(score=9)])
    assert len(log.read()[0]) == 3


def test_append_writes_both_files_or_neither(tmp_path):
    """Issue #15 fault 5: when the JSONL append fails, the CSV row is rolled back, so a retry does not
    duplicate it (the JSONL path is made a folder: a real write failure)."""
    log = ReviewLog(tmp_path / "log")
    log.jsonl_path.mkdir()  # the very first append fails half-way: no CSV is left either
    with pytest.raises(ReviewError, match="Cannot append"):
        log.append([rec()])
    assert not log.csv_path.exists()
    log.jsonl_path.rmdir()
    log.append([rec()])
    csv_before, jsonl_before = log.csv_path.read_bytes(), log.jsonl_path.read_bytes()
    log.jsonl_path.rename(tmp_path / "moved.jsonl")
    log.jsonl_path.mkdir()
    with pytest.raises(ReviewError, match="Cannot append"):
        log.append([rec(segment="Skin", score=1)])
    assert log.csv_path.read_bytes() == csv_before
    log.jsonl_path.rmdir()
    (tmp_path / "moved.jsonl").rename(log.jsonl_path)
    log.append([rec(segment="Skin", score=1)])  # the retry
    records, warnings = log.read()
    assert warnings == [] and [r.segment for r in records] == ["Parotid", "Skin"]
    jrecords, _ = review.read_log(log.jsonl_path)
    assert [r.to_dict() for r in jrecords] == [r.to_dict() for r in records]
    assert log.jsonl_path.read_bytes().startswith(jsonl_before)


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from ParotidOARLib.review import ReviewLog, ReviewRecord
    log = ReviewLog(sys.argv[1])
    who = sys.argv[2]
    for i in range(200):
        log.append([ReviewRecord(f"case{{i:03d}}", "auto", "Parotid", i % 4, f"{{who}} comment, number {{i}}",
                                 who, f"2026-11-23T10:{{i // 60:02d}}:{{i % 60:02d}}Z")])
""")


def test_concurrent_writers(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(repo=str(REPO)))
    folder = tmp_path / "shared-log"
    folder.mkdir()
    procs = [subprocess.Popen([sys.executable, str(script), str(folder), who]) for who in ("alice", "bob")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    log = ReviewLog(folder)
    records, warnings = log.read()
    assert warnings == []
    assert len(records) == 400
    for who in ("alice", "bob"):
        mine = [r for r in records if r.reviewer == who]
        assert len(mine) == 200 and len({r.case_id for r in mine}) == 200
    jrecords, jwarn = review.read_log(log.jsonl_path)
    assert jwarn == [] and len(jrecords) == 400
    lines = log.csv_path.read_text().splitlines()
    assert len(lines) == 401 and lines.count(",".join(review.FIELDS)) == 1


def test_corrupt_lines_reported_and_skipped(tmp_path):
    log = ReviewLog(tmp_path)
    log.append([rec(case="P1"), rec(case="P2")])
    # a torn write (no newline) and garbage, as after a crash or a hand edit
    with open(log.csv_path, "a") as fh:
        fh.write("P3,auto,Parotid,3,\"unterminated")
    with open(log.jsonl_path, "a") as fh:
        fh.write('{"case_id": "P3", "segm')
    size = log.csv_path.stat().st_size
    log.append([rec(case="P4")])  # starts on a fresh line
    assert log.csv_path.stat().st_size > size
    with open(log.csv_path, "a") as fh:
        fh.write("P5,auto,Parotid,7,,dr_a,2026-11-23T10:00:00Z,m,open,\n")  # score out of range
    records, warnings = log.read()
    assert [r.case_id for r in records] == ["P1", "P2", "P4"]
    assert len(warnings) == 2 and ":4:" in warnings[0] and "outside 0-3" in warnings[1]
    jrec, jwarn = review.read_log(log.jsonl_path)
    assert [r.case_id for r in jrec] == ["P1", "P2", "P4"] and len(jwarn) == 1
    assert "P3,auto,Parotid,3" in log.csv_path.read_text()  # nothing was discarded


def test_latest_record_wins_and_summary():
    records = [
        rec("Parotid", 1, "dr_a", "2026-11-23T09:00:00Z"),
        rec("Parotid", 3, "dr_a", "2026-11-23T10:00:00Z"),  # re-score replaces the 1
        rec("Parotid", 2, "dr_b", "2026-11-23T09:30:00Z"),
        rec("Skin", 0, "dr_a", "2026-11-23T09:00:00Z"),
        rec("Skin", 3, "dr_b", "2026-11-23T09:00:00Z"),
        rec("Parotid", 1, "dr_a", "2026-11-23T09:00:00Z", case="P2"),
        rec("Parotid", 3, "dr_a", "2026-11-23T08:00:00Z", case="P2"),  # older: loses although later in the log
    ]
    latest = review.latest_records(records)
    assert len(latest) == 5
    s = review.summarise(records)
    par = s["segments"]["Parotid"]
    assert par["n"] == 3 and par["mean_score"] == pytest.approx((3 + 2 + 1) / 3)
    assert par["acceptable_pct"] == pytest.approx(200 / 3)
    assert par["distribution"] == {"0": 0, "1": 1, "2": 1, "3": 1}
    assert par["by_reviewer"]["dr_a"]["n"] == 2 and par["by_reviewer"]["dr_a"]["mean_score"] == 2.0
    assert s["segments"]["Skin"]["acceptable_pct"] == 50.0
    assert s["cases"] == 2 and s["reviewers"] == ["dr_a", "dr_b"]
    only_p2 = review.summarise(records, case_id="P2")
    assert only_p2["segments"]["Parotid"]["mean_score"] == 1.0
    text = review.format_summary(s)
    assert "Parotid" in text and "dr_b" in text


def test_plot_summary_png(tmp_path):
    s = review.summarise([rec("Parotid", k % 4, f"r{k}") for k in range(7)] + [rec("Skin", 3)])
    out = review.plot_summary(s, tmp_path / "scores.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    with pytest.raises(Exception):
        review.plot_summary(s, tmp_path / "scores.png")  # no overwrite without force


# --------------------------------------------------------------------------------------------- blinded

def test_blinded_assignment_stable_and_hidden(tmp_path):
    sources = {"automatic": "CT_auto", "manual": "CT_manual"}
    a1 = review.assign_blinded("P1", sources, seed=42)
    a2 = review.assign_blinded("P1", sources, seed=42)
    assert a1.sets == a2.sets
    orders = {review.assign_blinded(f"P{i}", sources, seed=42).sets["Set A"]["source"] for i in range(40)}
    assert orders == {"automatic", "manual"}  # both orders occur
    assert "automatic" not in repr(a1) and "CT_auto" not in repr(a1)
    path = tmp_path / "blinded.json"
    b1 = review.assign_blinded("P1", sources, assignment_file=path)
    b2 = review.assign_blinded("P1", sources, assignment_file=path, seed=7)  # stored order wins
    assert b1.sets == b2.sets
    assert json.loads(path.read_text())["cases"]["P1"] == b1.sets
    review.assign_blinded("P2", sources, assignment_file=path)
    assert set(json.loads(path.read_text())["cases"]) == {"P1", "P2"}
    with pytest.raises(ReviewError):
        review.assign_blinded("P1", {"automatic": "other", "manual": "CT_manual"}, assignment_file=path)
    with pytest.raises(ReviewError):
        b1.reveal()  # hidden until submitted
    shown_a = b1.segmentation_for("Set A")
    r = b1.record("Set A", "Parotid", 3, "dr_a")
    assert r.mode == "blinded" and r.segmentation == shown_a
    assert r.source == f"{b1.sets['Set A']['source']} [Set A]"
    assert review.true_source(r) == b1.sets["Set A"]["source"]
    log = ReviewLog(tmp_path / "log")
    b1.submit(log, [r, b1.record("Set B", "Parotid", 1, "dr_a")])
    assert b1.reveal() == {"Set A": b1.sets["Set A"]["source"], "Set B": b1.sets["Set B"]["source"]}
    records, _ = log.read()
    s = review.summarise(records)
    assert set(s["segments"]["Parotid"]["by_source"]) == {"automatic", "manual"}
    assert s["segments"]["Parotid"]["n"] == 2  # Set A and Set B do not replace each other
    with pytest.raises(ReviewError):
        review.assign_blinded("P3", {"only": "one"})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ReviewError):
        review.assign_blinded("P1", sources, assignment_file=tmp_path / "bad.json")
    assert (tmp_path / "bad.json").read_text() == "{not json"


def test_build_records_reports_missing():
    records, missing = review.build_records("P1", "auto", {"Parotid": 3, "Skin": None}, "dr_a",
                                            comments={"Parotid": "fine"}, segments=["Parotid", "Skin", "EAC"])
    assert [r.segment for r in records] == ["Parotid"] and missing == ["Skin", "EAC"]
    assert records[0].source == "auto" and records[0].comment == "fine"


# --------------------------------------------------------------------------------------------- MRML

def test_table_node_round_trip_with_storage(mrml, tmp_path):
    import slicer

    records = [rec(comment='boundary "ok", posterior edge short'), rec("Skin", 0, "dr_b", comment=""),
               rec("Mastoid process", 2, "dr_c", mode="blinded", source="automatic [Set B]")]
    node = review.records_to_table_node(mrml.scene, records[:2])
    assert node.IsA("vtkMRMLTableNode") and node.GetNumberOfRows() == 2
    review.records_to_table_node(mrml.scene, records[2:], table_node=node)  # appended, earlier rows kept
    assert [node.GetColumnName(i) for i in range(node.GetNumberOfColumns())] == list(review.FIELDS)
    back = review.table_node_to_records(node)
    assert [r.to_dict() for r in back] == [r.validate().to_dict() for r in records]
    for ext in ("tsv", "csv"):
        storage = mrml.scene.AddNewNodeByClass("vtkMRMLTableStorageNode")
        storage.SetFileName(str(tmp_path / f"review.{ext}"))
        assert storage.WriteData(node)
        fresh = mrml.scene.AddNewNodeByClass("vtkMRMLTableNode", f"read-{ext}")
        assert storage.ReadData(fresh)
        again = review.table_node_to_records(fresh)
        assert [r.to_dict() for r in again] == [r.to_dict() for r in back], ext
        assert isinstance(again[0].score, int)
    # saved with the scene: the node is a regular storable scene node
    assert mrml.scene.GetFirstNodeByName(review.TABLE_NODE_NAME) is node
    assert isinstance(node, slicer.vtkMRMLStorableNode)


def test_metrics_table_node_exports_csv(mrml, tmp_path):
    import numpy as np

    from ParotidOARLib import metrics
    from ParotidOARLib.imageio import Geometry

    g = Geometry((20, 20, 10), (1.0, 1.0, 2.0))
    a = np.zeros(g.shape, bool)
    a[2:8, 4:14, 4:14] = True
    b = np.roll(a, 2, axis=2)
    res = metrics.compare_segmentations({"Parotid": b, "Skin": np.zeros_like(a)}, {"Parotid": a, "Skin": a}, g)
    node = review.metrics_to_table_node(mrml.scene, res)
    assert node.GetNumberOfRows() == 2
    storage = mrml.scene.AddNewNodeByClass("vtkMRMLTableStorageNode")
    storage.SetFileName(str(tmp_path / "metrics.csv"))
    assert storage.WriteData(node)
    with open(tmp_path / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["segment"] == "Parotid"
    assert float(rows[0]["dsc"]) == pytest.approx(res["segments"]["Parotid"]["dsc"])
    assert float(rows[0]["hd95_mm"]) == pytest.approx(2.0)
    assert rows[1]["flags"] == "pred_empty"
    review.metrics_to_table_node(mrml.scene, res, table_node=node)  # refill, not duplicate
    assert node.GetNumberOfRows() == 2


def test_dose_rows_to_table_node(mrml):
    import numpy as np

    from ParotidOARLib import dose
    from ParotidOARLib.imageio import Geometry

    g = Geometry((20, 20, 10), (1.0, 1.0, 2.0))
    d = np.broadcast_to(np.arange(20, dtype=np.float32), g.shape).copy()  # dose = i (Gy)
    m = np.zeros(g.shape, bool)
    m[2:8, 4:14, 4:14] = True
    res = dose.compare_dose(d, g, g, {"Parotid": np.roll(m, 1, axis=2)}, {"Parotid": m})
    node = review.rows_to_table_node(mrml.scene, dose.dose_rows(res), name="ParotidOAR dose")
    assert node.GetNumberOfRows() == 1 and node.GetCellText(0, 0) == "Parotid"
    col = node.GetTable().GetColumnByName("difference_dmean_gy")
    assert col.GetClassName() == "vtkDoubleArray" and col.GetValue(0) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------- CLI

def test_review_report_cli(tmp_path):
    log = ReviewLog(tmp_path / "log")
    log.append([rec("Parotid", 3, "dr_a"), rec("Parotid", 1, "dr_b"), rec("Skin", 2, "dr_a"),
                rec("Parotid", 2, "dr_a", ts="2026-11-23T12:00:00Z")])
    with open(log.csv_path, "a") as fh:
        fh.write("garbage line\n")
    p = run_cli("review-report", log.folder, "--json", tmp_path / "s.json", "--csv", tmp_path / "s.csv",
                "--png", tmp_path / "s.png")
    assert p.returncode == 0, p.stderr
    assert "warning:" in p.stdout and "Parotid" in p.stdout
    s = json.loads((tmp_path / "s.json").read_text())
    par = s["segments"]["Parotid"]
    assert par["n"] == 2 and par["mean_score"] == 1.5 and par["acceptable_pct"] == 50.0
    assert par["distribution"] == {"0": 0, "1": 1, "2": 1, "3": 0}
    assert set(par["by_reviewer"]) == {"dr_a", "dr_b"}
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "s.csv").read_text().startswith("segment,reviewer,n,mean_score")
    p = run_cli("review-report", log.folder, "--json", tmp_path / "s.json")
    assert p.returncode == 2 and "already exists" in p.stderr
    p = run_cli("review-report", tmp_path / "nowhere.csv")
    assert p.returncode == 2 and "not found" in p.stderr

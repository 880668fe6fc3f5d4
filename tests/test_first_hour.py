"""What a new user meets in the first hour: stage lines (plain ones when stderr is not a
terminal), the summary's rates and reused shards, `convoy status JOB` after an embedded run, the
Grad-CAM gallery and the report page in a real headless Chromium, Celery's own tools, --version,
defaults in --help."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from convoy.orchestrator import progress
from convoy.orchestrator.cam import pick_spread
from convoy.shared.words import plural
from tests.conftest import ROOT, convoy, skip_or_fail
from tests.imagegen import make_tree

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # anything but \t and \n


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One embedded `convoy run` with training and Grad-CAM, then the same command again. The first
    runs from a folder holding junk `shared/`, `workers/` and `orchestrator/` packages, as a user's
    project might: Convoy installs only `convoy`, so neither the CLI nor its workers import them."""
    root = tmp_path_factory.mktemp("first-hour")
    here = root / "project"
    for name in ("shared", "workers", "orchestrator"):
        (here / name).mkdir(parents=True)
        (here / name / "__init__.py").write_text(f"raise ImportError('the junk {name} package was imported')\n")
    data = make_tree(root / "data", {"train": 6, "validation": 3, "test": 4})
    out = root / "out"
    # No broker: `convoy run` starts its own; the job index goes to a folder of the test's own.
    env = {"CONVOY_STATE_DIR": str(root / "state"), "CONVOY_BROKER_URL": ""}
    args = ("run", str(data), "--out", str(out), "--weights", "none", "--input-size", "32", "--workers", "1",
            "--epochs", "2", "--cam", "4", "--shard-size", "10", "--json")
    first = convoy(*args, env=env, check=True, cwd=here)
    status = json.loads(convoy("status", str(out), "--json", env=env, check=True).stdout)  # before OUT is reused
    second = convoy(*args, env=env, check=True)
    return {"out": out, "env": env, "first": first, "second": second, "first_status": status,
            "summary": json.loads(first.stdout.splitlines()[-1]), "again": json.loads(second.stdout.splitlines()[-1])}


RANDOM = "random weights (seed 0): features carry no ImageNet knowledge"


def test_each_stage_gets_a_plain_line_with_its_time_off_a_terminal(demo):
    err = demo["first"].stderr
    assert not CONTROL.search(err), "control characters in the non-terminal output"
    for stage in ("scanning", "extracting", "training", "Grad-CAM"):
        assert re.search(rf"^convoy: {stage} done in [0-9.]+ s", err, re.M), err
    assert re.search(r"^convoy: scanning done in .*: 26 images in 2 classes$", err, re.M), err
    assert re.search(r"^convoy: training done in .*val_accuracy [0-9.]+$", err, re.M), err
    assert re.search(r"^convoy: Grad-CAM done in .*: 4 heatmaps$", err, re.M), err
    # The extracting line and the summary give one time, count and rate.
    summary = demo["summary"]
    line = (f"convoy: extracting done in {progress.fmt_seconds(summary['stages']['extracting'])}: 26 images "
            f"extracted, {summary['extract_images_per_s']:.1f} img/s")
    assert line in err.splitlines(), err


def test_the_summary_gives_the_extraction_rate_and_every_stage(demo):
    summary = demo["summary"]
    assert list(summary["stages"]) == ["scanning", "extracting", "merging", "training", "Grad-CAM"]
    assert summary["extracted_images"] == summary["images"] == 26 and summary["reused_shards"] == 0
    extract_s = summary["stages"]["extracting"]
    assert summary["extract_images_per_s"] == pytest.approx(26 / extract_s, rel=0.01)
    assert extract_s < summary["seconds"]  # not the whole run's time, training and Grad-CAM included


def test_a_rerun_says_its_shards_were_reused_and_extracted_nothing(demo):
    from convoy.orchestrator.watch import summary_lines

    again = demo["again"]
    assert again["reused_shards"] == again["shards"] and again["reused_images"] == 26
    assert again["extracted_images"] == 0 and again["extract_images_per_s"] == 0.0
    # The progress line says what the summary says, in the same words.
    words = f"0 images extracted, 26 reused from {plural(again['shards'], 'shard')}"
    line = f"convoy: extracting done in {progress.fmt_seconds(again['stages']['extracting'])}: {words}"
    assert line in demo["second"].stderr.splitlines(), demo["second"].stderr
    assert any(s.startswith("  extracting ") and s.endswith(f"  {words}") for s in summary_lines(again))


def test_the_summary_says_the_weights_are_random(demo):
    from convoy.orchestrator.watch import summary_lines

    for summary in (demo["summary"], demo["again"]):
        assert summary["weights"] == "random (seed 0)" and summary["notes"] == [RANDOM], summary
    lines = summary_lines(demo["summary"])
    assert lines[0].endswith(", weights random (seed 0)") and lines[1] == f"  note: {RANDOM}", lines


def test_convoy_report_writes_the_page_again(demo):
    page = demo["out"] / "report.html"
    page.unlink()
    assert convoy("report", str(demo["out"]), check=True).stdout.strip() == str(page)
    assert "Confusion matrix" in page.read_text()


def test_human_summary_lines_say_reused(demo):
    from convoy.orchestrator.watch import summary_lines

    lines = "\n".join(summary_lines(demo["again"]))
    assert f"0 images extracted, 26 reused from {plural(demo['again']['shards'], 'shard')}" in lines


def test_status_of_the_job_id_after_an_embedded_run(demo):
    job = demo["again"]["job_id"]
    report = json.loads(convoy("status", job, "--json", env=demo["env"], check=True).stdout)
    assert report["status"] == "done" and report["source"] == "manifest" and report["job_id"] == job
    assert report["weights"] == "random (seed 0)" and report["notes"] == [RANDOM], report
    assert report["extracted_images"] == 0 and report["reused_images"] == 26 and report["images_per_s"] == 0.0
    text = convoy("status", job, env={**demo["env"], "COLUMNS": "200"}, check=True).stdout
    assert "done" in text and f"note: {RANDOM}" in text and "weights random (seed 0)" in text, text
    # The first run's record in OUT was replaced by the second's: said, not passed off as the other job.
    old = convoy("status", demo["summary"]["job_id"], env=demo["env"])
    assert old.returncode == 2 and f"which now holds job {job}" in old.stderr, old.stderr


def test_status_after_a_run_gives_its_rate_workers_and_counts_per_shard(demo):
    """`convoy status OUT` once the embedded broker is gone: the job's rate, not 0.0; each shard's
    worker, images extracted of its total and skipped images, as the manifest recorded them."""
    report, summary = demo["first_status"], demo["summary"]
    assert report["source"] == "manifest" and report["job_id"] == summary["job_id"]
    assert report["images_per_s"] == pytest.approx(summary["extract_images_per_s"], rel=0.01)
    assert report["images_per_s"] > 0 and report["extracted_images"] == 26
    shards = report["shards"].values()
    assert all(s["worker"].startswith("local1@") for s in shards), report["shards"]
    assert all(s["rows"] + s["skipped"] == s["total"] and not s["reused"] for s in shards), report["shards"]
    assert sum(s["rows"] for s in shards) == 26


def test_status_table_shows_a_shards_skipped_images_and_ended_workers():
    import io

    from rich.console import Console

    from convoy.orchestrator.status import _table, _title

    report = {"job_id": "j-1", "status": "done", "source": "manifest", "images_done": 40, "images_total": 40,
              "extracted_images": 36, "reused_images": 3, "reused_shards": 1,
              "images_per_s": 12.5, "eta_s": None, "skipped": [{"path": "bad.jpg", "reason": "truncated"}],
              "weights": "imagenet", "shards": {
                  "all/00000": {"state": "done", "total": 37, "done": 37, "rows": 36, "skipped": 1, "worker": "w1@h",
                                "reused": False, "images_per_s": 40.25},
                  "all/00001": {"state": "done", "total": 3, "done": 3, "rows": 3, "skipped": 0, "reused": True},
                  "all/00002": {"state": "queued", "total": 2, "done": 0}}}
    out = io.StringIO()
    Console(file=out, width=200).print(_table(report))
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in out.getvalue().splitlines() if "all/0000" in line]
    assert cells == [["all/00000", "done", "36/37", "40.2", "w1@h", "1", ""],  # one image skipped: 36 of 37
                     ["all/00001", "done (reused)", "3/3", "", "ended", "0", ""],  # no worker recorded
                     ["all/00002", "queued", "0/2", "", "ended", "0", ""]], cells
    assert _title(report) == ("job j-1: done  40/40 images (36 extracted, 3 reused), 1 skipped  12.5 img/s\n"
                              "weights imagenet")
    assert "\\n" not in out.getvalue()  # the title's second line is a line, not a spelled-out \n


def test_pages_say_random_weights_name_the_run_and_link_full_size_images(demo):
    gallery = (demo["out"] / "cam" / "index.html").read_text()
    job = demo["again"]["job_id"]  # the run whose `convoy run` made the CAM job, not the CAM job
    assert f"<title>Grad-CAM of job {job}: full_model.keras, layer " in gallery, gallery[:400]
    assert f"<strong>Note:</strong> {RANDOM}" in gallery
    assert gallery.count("probability of the predicted class ") == 4
    for kind in ("originals", "overlays"):
        links = re.findall(rf'<a href="({kind}/[^"]+)" target="_blank"[^>]*><img src="\1"', gallery)
        assert len(links) == 4 and all((demo["out"] / "cam" / link).is_file() for link in links), kind
    report = (demo["out"] / "report.html").read_text()
    assert f"<strong>Note:</strong> {RANDOM}" in report and "<td>weights</td><td>random (seed 0)</td>" in report
    assert "sample data" not in report  # DATA is not one `convoy sample` made
    assert report.count("probability of the predicted class ") == 4 and 'href="cam/overlays/' in report


def test_heatmaps_keep_the_logit_the_probability_and_the_true_label(demo):
    with h5py.File(demo["out"] / "cam" / "heatmaps.h5", "r") as f:
        score, prob, label = f["score"][()], f["probability"][()], f["label"][()]
        predicted, names = f["class_index"][()], json.loads(f.attrs["class_names"])
        paths = list(f["paths"].asstr()[()])
    assert names == ["blobs", "stripes"]
    # Binary sigmoid head: the chosen class's probability is the sigmoid of its logit.
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-score)), atol=1e-5)
    assert all(p.startswith("test/") for p in paths) and len(paths) == 4
    assert list(label) == [names.index(p.split("/")[1]) for p in paths]
    assert {int(k) for k in label} == {0, 1}, "the gallery's images come from every class"
    assert len(predicted) == 4


def test_pick_spread_takes_every_class_in_turn_misclassified_first():
    labels = {"a/1": 0, "a/2": 0, "a/3": 0, "b/1": 1, "b/2": 1, "c/1": 2}
    assert pick_spread(labels, {"a/3", "b/2"}, 4) == ["a/3", "b/2", "c/1", "a/1"]
    assert pick_spread(labels, set(), 10) == ["a/1", "b/1", "c/1", "a/2", "b/2", "a/3"]


def _chromium(*args: str) -> subprocess.CompletedProcess:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        skip_or_fail("headless Chromium is not installed (apt-get install -y chromium)")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,2000",
           "--virtual-time-budget=5000", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("page", ["cam/index.html", "report.html"])
def test_pages_load_in_headless_chromium_with_no_missing_image_or_error(demo, page, tmp_path):
    url = (demo["out"] / page).as_uri()
    dom = _chromium("--dump-dom", url)
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert 'data-ready="1"' in body, body  # the page's script ran to its end
    assert "data-missing" not in body and "data-errors" not in body, body
    assert "Uncaught" not in dom.stderr, dom.stderr[-2000:]
    cards = re.findall(r'<div class="card (\w*)"', dom.stdout)
    assert len(cards) == 4 and all(c in ("right", "wrong") for c in cards)
    assert "true <b>blobs</b>" in dom.stdout or "true <b>stripes</b>" in dom.stdout
    assert dom.stdout.count("logit ") == 4 and dom.stdout.count("probability ") >= 4
    if page == "report.html":
        for heading in ("Stages", "Classifier", "Confusion matrix", "Training curves", "Grad-CAM"):
            assert heading in dom.stdout, heading
    shot = tmp_path / (page.replace("/", "-") + ".png")
    _chromium(f"--screenshot={shot}", url)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    kept = ROOT / ".pytest-screenshots"
    kept.mkdir(exist_ok=True)
    shutil.copy(shot, kept / shot.name)
    print(f"\nscreenshot of {page}: {kept / shot.name}")


def test_a_missing_overlay_is_flagged_by_the_page(demo, tmp_path):
    copy = tmp_path / "cam"
    shutil.copytree(demo["out"] / "cam", copy)
    next((copy / "overlays").glob("*.png")).unlink()
    body = re.search(r"<body[^>]*>", _chromium("--dump-dom", (copy / "index.html").as_uri()).stdout).group(0)
    assert 'data-missing="1"' in body, body


def test_plain_stage_lines_come_every_interval(monkeypatch):
    import io
    import types

    # The stage's own clock, stepped by the test: a busy machine cannot stretch an interval.
    now = [0.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 2.0)
    out = io.StringIO()
    stages = progress.Stages(live=False, out=out)
    stages.begin("extracting", 100)
    for _ in range(10):  # an update a second for 10 s: a line every 2 s
        now[0] += 1.0
        stages.update(50, 100, "12.0 img/s")
    stages.end("100 images")
    lines = out.getvalue().splitlines()
    assert sum("extracting 50/100 images, 12.0 img/s" in line for line in lines) == 5, lines
    assert lines[-1].startswith("convoy: extracting done in ") and lines[-1].endswith(": 100 images")


def test_weights_read_the_same_everywhere():
    from convoy.shared.words import job_weights, weights_note, weights_words

    assert [weights_words(w, 3) for w in ("imagenet", "none", "/data/w/vgg.weights.h5", "s3://b/w/x.h5")] == [
        "imagenet", "random (seed 3)", "vgg.weights.h5", "x.h5"]
    assert weights_note("none", 3) == "random weights (seed 3): features carry no ImageNet knowledge"
    assert weights_note("imagenet") == weights_note("/w.h5", 1) == ""
    assert job_weights({"model": {"weights": "none"}, "options": {"seed": 0}}) == ("random (seed 0)", RANDOM)


def test_sample_data_says_what_it_is_cut_from(tmp_path, capsys):
    from convoy.orchestrator.cli import _result, main
    from convoy.orchestrator.sample import sample_note
    from convoy.shared.job import JobSpec, ModelConfig

    assert main(["sample", str(tmp_path / "data"), "--images", "12"]) == 0
    words = "cropped from 6 source photographs (cat: 1, other: 5); every split holds crops of the same photographs"
    assert capsys.readouterr().out.strip() == f"wrote 12 images to {tmp_path / 'data'}, {words}"
    assert sample_note(tmp_path / "data") == f"sample data: 12 images {words}"
    assert sample_note(tmp_path) == "" and sample_note("s3://bucket/data") == ""
    model = ModelConfig(layer="block5_pool", input_size_px=32, preprocess="vgg16", weights="none",
                        weights_path="w.h5", weights_sha256="0", batch_size=8, dtype="float32")
    spec = JobSpec(job_id="j-1", data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "out"), model=model,
                   class_names=["cat", "other"], shard_ids=["train/00000"], options={"seed": 0})
    summary = _result(spec, {"status": "done", "summary": json.dumps({"images": 12})}, 1.0, {}, 0.0)
    assert summary["weights"] == "random (seed 0)" and summary["notes"] == [RANDOM, f"sample data: 12 images {words}"]


def test_a_cam_spec_written_before_run_job_and_notes_still_loads():
    from dataclasses import asdict

    from convoy.shared.camjob import CamSpec

    spec = CamSpec(job_id="c-1", model="m.keras", model_path="/m.keras", model_sha256="0", out_dir="/o", root="/r",
                   n_batches=1, n_images=1, batch_size=1)
    old = {k: v for k, v in asdict(spec).items() if k not in ("run_job", "notes")}
    loaded = CamSpec.from_json(json.dumps(old))
    assert loaded.run_job == "" and loaded.notes == [] and loaded == spec


def test_plural():
    assert [plural(n, "heatmap") for n in (0, 1, 2)] == ["0 heatmaps", "1 heatmap", "2 heatmaps"]
    assert plural(1, "class") == "1 class" and plural(3, "class") == "3 classes"


# --- small fixes ------------------------------------------------------------------------------

def test_version():
    proc = convoy("--version", check=True)
    assert re.fullmatch(r"convoy \d+\.\d+\.\d+\n", proc.stdout), proc.stdout


@pytest.mark.parametrize("command, option, default", [
    (("run",), "--cam", "8"), (("run",), "--shard-size", "256"), (("run",), "--epochs", "30"),
    (("cam",), "--top-k", "1"), (("worker",), "--queues", "extract,train,cam"), (("flower",), "--port", "5555"),
])
def test_help_shows_defaults(command, option, default):
    text = " ".join(convoy(*command, "--help", check=True).stdout.split())
    after = text[text.index(option + " ", text.index("options:")):]
    assert f"(default: {default})" in after[:300], after[:300]


def test_out_that_is_a_file_is_a_usage_error(tmp_path):
    data = make_tree(tmp_path / "data", {"train": 1, "validation": 1, "test": 1})
    target = tmp_path / "file"
    target.write_text("x")
    proc = convoy("run", str(data), "--out", str(target), "--weights", "none")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "is a file, not a directory" in lines[0], proc.stderr


# --- Celery's own tools -----------------------------------------------------------------------

def _celery(*args: str, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONVOY_BROKER_URL": url}
    return subprocess.run([sys.executable, "-m", "celery", "-A", "convoy.shared.celery_app", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_celery_inspect_ping_reaches_convoys_workers(cluster):
    proc = _celery("inspect", "ping", "--timeout", "5", url=cluster.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pong" in proc.stdout and "w1@" in proc.stdout and "w2@" in proc.stdout, proc.stdout


def test_celery_report_shows_convoys_broker_and_json(cluster):
    proc = _celery("report", url=cluster.url)
    assert proc.returncode == 0, proc.stderr
    assert "transport:redis" in proc.stdout and "amqp" not in proc.stdout.split("broker_url")[0], proc.stdout
    assert "task_serializer: 'json'" in proc.stdout

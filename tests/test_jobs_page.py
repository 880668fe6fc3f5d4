"""The Jobs page of ``convoy flower`` for real: a Flower process, real workers and real jobs. It shows
every job from the store in headless Chromium, its progress moves while a job runs, Cancel and the
options form change the job through the login and the XSRF token, and a report is served from the
job's OUT and from nowhere else."""

from __future__ import annotations

import functools
import html
import io
import json
import re
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from PIL import Image

from convoy.orchestrator.control import set_options
from convoy.orchestrator.jobs_page import job_row, parse_options
from convoy.shared import keys
from convoy.shared.errors import JobNotFound, UsageError
from convoy.shared.gallery import gallery_section, page
from convoy.shared.jobstore import JobStore, connect
from convoy.shared.states import JobStatus, StepState
from tests.conftest import (
    LOGIN,
    FlowerServer,
    chromium,
    convoy,
    own_database,
    submit_watched,
    wait_final,
    wait_until,
)
from tests.imagegen import make_tree
from tests.test_jobstate import claim, finish, make_job, wide_open

#: A file name that is markup: the pages show it as text.
MARKUP = "<img src=x onerror=alert(1)>"
#: Where the screenshots are kept to be looked at after the run.
SHOTS = Path("/work/notes/shots")
#: A job that runs for a while even on a fast machine (VGG16 on 128 px, one thread, one image a
#: batch: a tenth of a second an image at best), each step noting its progress after every image.
RUNNING_ARGS = ("--input-size", "128", "--weights", "none", "--shard-size", "40", "--batch-size", "1")


@pytest.fixture(scope="module")
def flower(cluster, tmp_path_factory):
    server = FlowerServer(cluster.url, tmp_path_factory.mktemp("flower"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def store(cluster) -> JobStore:
    return JobStore(connect(cluster.url))


@pytest.fixture(scope="module")
def done_job(cluster, flower, tmp_path_factory) -> dict:
    """A small extraction run to the end by ``convoy run``, which leaves OUT/report.html."""
    tmp = tmp_path_factory.mktemp("jobs-page")
    data = make_tree(tmp / "data", {"train": 2, "validation": 1, "test": 1})
    (data / "train" / "blobs" / f"{MARKUP}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    proc = convoy("run", str(data), "--out", str(tmp / "out"), "--input-size", "32", "--weights", "none",
                  "--shard-size", "2", "--no-train", "--json", "--broker", cluster.url)
    assert proc.returncode == 0, proc.stderr[-3000:] + cluster.logs()
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (tmp / "out" / "report.html").is_file()
    return {"job_id": summary["job_id"], "out": tmp / "out"}


@pytest.fixture(scope="module")
def running_job(cluster, flower, tmp_path_factory) -> str:
    """A job of 304 images, one a batch, that runs for a while: its progress is watched, then it is
    cancelled (the tests take a few seconds of its run; the cancel ends it)."""
    tmp = tmp_path_factory.mktemp("running")
    data = make_tree(tmp / "data", {"train": 150, "validation": 1, "test": 1}, size_px=48)
    return submit_watched(cluster.url, str(data), "--out", str(tmp / "out"), *RUNNING_ARGS)


def _session() -> requests.Session:
    """A logged-in client that keeps Tornado's ``_xsrf`` cookie."""
    session = requests.Session()
    session.auth = LOGIN
    return session


def _token(session: requests.Session, base: str, job_id: str) -> str:
    """The XSRF token of the job page's forms (the page sets the cookie it matches)."""
    page = session.get(f"{base}/jobs/{job_id}", timeout=10)
    assert page.status_code == 200, page.text[:2000]
    return re.search(r'name="_xsrf" value="([^"]+)"', page.text).group(1)


def _job_json(base: str, job_id: str) -> dict:
    rows = requests.get(f"{base}/jobs.json", auth=LOGIN, timeout=10).json()["jobs"]
    return next(r for r in rows if r["job_id"] == job_id)


def _browse(base: str, path: str, shot: Path, *extra: str) -> str:
    """``path`` in headless Chromium with the login: its DOM once its scripts ran; a screenshot
    into ``shot`` and a copy into SHOTS. Fails on any message on the page's console that
    mentions an error (a script's, a refused request's, a blocked script's)."""
    with_login = base.replace("http://", f"http://{LOGIN[0]}:{LOGIN[1]}@")
    done = chromium("--enable-logging=stderr", "--v=0", *extra, f"--screenshot={shot}", "--dump-dom", with_login + path)
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    assert not [line for line in console if "Uncaught" in line or "Error" in line or "violates" in line], console
    _keep(shot)
    return done.stdout


def _keep(shot: Path) -> None:
    """A screenshot copied into SHOTS, once it is one."""
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, SHOTS / shot.name)


def test_jobs_page_in_headless_chromium(flower, store, done_job, tmp_path):
    base, job_id = flower.base, done_job["job_id"]
    jobs = _browse(base, "/jobs", tmp_path / "jobs-page-list.png")
    row = re.search(rf'<tr data-job="{job_id}" data-status="done">.*?</tr>', jobs, re.S)
    assert row, jobs[:3000]
    assert "<progress" in row.group(0) and ">done<" in row.group(0) and ">report.html</a>" in row.group(0)
    assert re.search(r'<body[^>]* data-polls="\d+"', jobs), "the page's poll of /jobs.json did not succeed"
    assert _job_json(base, job_id)["images_per_s"] > 0, "an ended job shows the rate it had, not 0"

    job = _browse(base, f"/jobs/{job_id}", tmp_path / "jobs-page-job.png", "--window-size=1600,1150")
    assert f'Job <span class="mono">{job_id}</span>' in job and 'id="step-counts"' in job
    steps = len(store.steps(job_id))
    assert re.search(rf'<td>done</td><td class="num">{steps}</td>', job), f"its {steps} steps, all done"
    assert 'name="_xsrf"' in job and 'id="cancel" disabled' in job
    skipped = re.search(r'<table id="skipped">.*?</table>', job, re.S).group(0)
    assert html.escape(MARKUP, quote=False) in skipped and "<img" not in skipped, skipped
    assert re.search(r'<body[^>]* data-polls="\d+"', job)

    # Flower's own pages carry a Jobs item in their navbar.
    workers = requests.get(f"{base}/workers", auth=LOGIN, timeout=10).text
    assert 'href="/jobs">Jobs</a>' in workers and "Workers" in workers


def test_progress_moves_while_a_job_runs(flower, running_job):
    seen = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        row = _job_json(flower.base, running_job)
        seen.append(row)
        if row["final"] or len({r["images_done"] for r in seen if 0 < r["images_done"] < 304}) >= 3:
            break
        time.sleep(0.1)
    done = [r["images_done"] for r in seen]
    assert done == sorted(done), f"images done went back: {done}"
    assert len({d for d in done if 0 < d < 304}) >= 3, f"no progress seen while the job ran: {done}"
    assert all(r["images_total"] == 304 and not r["final"] for r in seen), seen[-1]
    moving = [r for r in seen if r["images_per_s"] > 0]
    assert moving and moving[-1]["text"]["eta"] != "-", seen[-1]
    assert re.fullmatch(r"extracting, \d+/\d+ shards done", moving[-1]["stage"]), moving[-1]["stage"]


def test_a_running_job_in_headless_chromium(flower, running_job, tmp_path):
    jobs = _browse(flower.base, "/jobs", tmp_path / "jobs-page-running.png")
    row = re.search(rf'<tr data-job="{running_job}" data-status="extracting">.*?</tr>', jobs, re.S)
    assert row, jobs[:3000]
    done = int(re.search(r'<progress max="304" value="(\d+)">', row.group(0)).group(1))
    assert 0 < done < 304 and 'data-field="eta">-<' not in row.group(0)


def test_cancel_and_options_need_the_login_and_the_token(flower, store, running_job):
    job_id, base = running_job, flower.base
    session = _session()
    token = _token(session, base, job_id)

    # Without the login: 401 everywhere, before anything else is looked at.
    for path in ("/jobs", "/jobs.json", f"/jobs/{job_id}"):
        assert requests.get(base + path, timeout=10).status_code == 401, path
    for action in ("cancel", "options"):
        answer = requests.post(f"{base}/jobs/{job_id}/{action}", data={"_xsrf": token, "priority": "3"}, timeout=10)
        assert answer.status_code == 401
        # With the login but no token (or a token without its cookie): 403.
        assert session.post(f"{base}/jobs/{job_id}/{action}", data={"priority": "3"}, timeout=10).status_code == 403
        cookieless = requests.post(f"{base}/jobs/{job_id}/{action}", data={"_xsrf": token, "priority": "3"},
                                   auth=LOGIN, timeout=10)
        assert cookieless.status_code == 403
    assert store.status(job_id).get("priority", "0") == "0" and store.status(job_id)["status"] != "cancelled"

    # A bad value: 400, its one line on the page, nothing changed.
    bad = session.post(f"{base}/jobs/{job_id}/options", data={"_xsrf": token, "priority": "abc", "weight": "2"},
                       timeout=10, allow_redirects=False)
    assert bad.status_code == 400
    message = re.search(r'<p class="flash error" role="alert" id="message">([^<]*)</p>', bad.text).group(1)
    assert "priority" in message and "abc" in message and "\n" not in message, message
    assert "Traceback" not in bad.text
    state = store.status(job_id)
    assert state.get("priority", "0") == "0" and state.get("weight", "1") == "1"

    # Good values: recorded, and back to the job's page.
    good = session.post(f"{base}/jobs/{job_id}/options", data={"_xsrf": token, "priority": "3", "weight": "2",
                                                                "max_running": ""}, timeout=10, allow_redirects=False)
    assert good.status_code == 303 and good.headers["Location"] == f"/jobs/{job_id}?note=options", good.text[:2000]
    state = store.status(job_id)
    assert (state["priority"], state["weight"], state.get("max_running", "0")) == ("3", "2", "0")
    assert _job_json(base, job_id)["text"]["share"] == "3 / 2"

    # Cancel: the job ends cancelled in the store; the page says so.
    cancelled = session.post(f"{base}/jobs/{job_id}/cancel", data={"_xsrf": token}, timeout=10)
    assert cancelled.status_code == 200 and cancelled.url.endswith("?note=cancelled"), cancelled.text[:2000]
    assert "The job was cancelled." in cancelled.text
    assert wait_final(store, job_id)["status"] == "cancelled"
    assert wait_until(lambda: _job_json(base, job_id)["status"] == "cancelled", 10, "the list shows the cancel")


def test_only_the_report_and_its_images_are_served_from_out(flower, done_job, tmp_path):
    base, job_id, out = flower.base, done_job["job_id"], done_job["out"]
    get = lambda path: requests.get(f"{base}/jobs/{job_id}/out/{path}", auth=LOGIN, timeout=10)  # noqa: E731
    report = get("report.html")
    assert report.status_code == 200 and report.headers["Content-Type"].startswith("text/html")
    assert f"Convoy job {job_id}" in report.text
    policy = report.headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in policy.split("script-src")[1].split(";")[0] and "form-action 'none'" in policy

    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG not for the page")
    (out / "linked.png").symlink_to(outside)
    (out / "shown.png").write_bytes(_png())
    assert get("shown.png").content == _png()
    for path in ("manifest.json", "linked.png", "..%2F..%2Fsecret.png", "%2Fetc%2Fpasswd", "features/train.h5",
                 "index.html"):  # index.html: a Grad-CAM job's page, not an extraction's
        answer = get(path)
        assert answer.status_code == 404 and b"not for the page" not in answer.content, path
    assert requests.get(f"{base}/jobs/{job_id}/out/report.html", timeout=10).status_code == 401
    assert requests.get(f"{base}/jobs/no-such-job", auth=LOGIN, timeout=10).status_code == 404

    # A gallery page as Convoy writes it, with a script someone else added: Convoy's scripts run
    # and its images load through the login; the other script does not run.
    rows = SimpleNamespace(paths=["blobs/a.png"], class_index=[0], score=[1.5], probability=[0.9], label=[1],
                           flags=[""], overlay=["shown.png"], original=["shown.png"], skipped=[])
    added = '<script>document.body.dataset.added = "ran"</script>'
    kept = (out / "report.html").read_bytes()
    (out / "report.html").write_text(page("gallery", gallery_section(rows, ["blobs", "stripes"]) + added))
    try:
        with_login = base.replace("http://", f"http://{LOGIN[0]}:{LOGIN[1]}@")
        shot = tmp_path / "jobs-page-report.png"
        dom = chromium("--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--dump-dom",
                       f"{with_login}/jobs/{job_id}/out/report.html")
    finally:
        (out / "report.html").write_bytes(kept)
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert 'data-ready="1"' in body and "data-missing" not in body and "data-errors" not in body, body
    assert "data-added" not in body and "violates the following Content Security Policy" in dom.stderr
    _keep(shot)


@functools.cache
def _png() -> bytes:
    image = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image, "PNG")
    return image.getvalue()


def test_the_list_is_whole_after_flower_restarts_with_no_memory(flower, store, done_job):
    """The page reads the store: a Flower that forgot every task still lists the job, whole."""
    flower.stop()
    for kept in flower.db.parent.glob(flower.db.name + "*"):
        kept.unlink()
    flower.start()
    tasks = requests.get(f"{flower.base}/api/tasks", auth=LOGIN, timeout=10).json()
    assert not [t for t in tasks.values() if done_job["job_id"] in (t.get("args") or "")]
    row, state = _job_json(flower.base, done_job["job_id"]), store.status(done_job["job_id"])
    assert (row["status"], row["report"]) == ("done", "report.html")
    images = (int(state["images_done"]), int(state["images_total"]))
    assert (row["images_done"], row["images_total"]) == images and images[0] > 0


# --- the rows and the options, on a Redis database of the test's own, no workers ----------------

@pytest.fixture()
def own_store():
    with own_database() as url:
        yield wide_open(JobStore(connect(url)))


def test_a_row_says_what_a_job_does_from_the_store(own_store):
    store = own_store
    older = make_job(store, n_shards=2, allow_failed=True)
    newer = make_job(store, n_shards=3, allow_failed=True)
    gone = make_job(store, n_shards=1)
    store.r.delete(keys.job_state(gone.job_id))  # its keys expired, the index not yet pruned
    job, (s0, s1, _s2) = newer.job_id, newer.shard_ids
    claim(store, job, s0)
    store.progress(job, s0, "t1", 2, 4.5, "w1@test")
    claim(store, job, s1, token="t2")
    finish(store, newer, s1, StepState.FAILED, token="t2", error="<b>bad</b>")
    claim(store, older.job_id, older.shard_ids[0])
    finish(store, older, older.shard_ids[0])

    table = store.jobs_table()
    assert [t["job_id"] for t in table] == [job, older.job_id]  # newest first, the expired one left out
    assert (table[0]["shards"], table[0]["shards_done"], table[0]["shards_failed"]) == (3, 0, 1)
    assert table[0]["running"] == {s0: {"images_per_s": "4.5"}}
    assert (table[1]["shards"], table[1]["shards_done"], table[1]["running"]) == (2, 1, {})
    assert store.jobs_table([older.job_id]) == table[1:]

    live = store.live_workers_by_queue(keys.ALL_QUEUES)
    assert live == {q: 0 for q in keys.ALL_QUEUES}
    row = job_row(store, table[0], live, None)
    # 2 images of the running shard, and 4 the failed one counted before it failed
    assert (row["status"], row["images_done"], row["images_total"], row["images_per_s"]) == ("extracting", 6, 12, 4.5)
    assert row["text"]["stage"] == "extracting, 0/3 shards done" and row["text"]["eta"] == "1.3 s"
    assert row["text"]["errors"] == "1 shard failed" and row["report"] is None
    assert "convoy worker --queues extract" in row["waiting_for"]
    store.heartbeat("e1@test", [keys.EXTRACT_QUEUE], 30)
    row = job_row(store, table[0], store.live_workers_by_queue(keys.ALL_QUEUES), None)
    assert row["waiting_for"] == "" and row["text"]["waiting"] == "-"


def test_options_are_whole_numbers_within_bounds_for_a_live_job(own_store):
    store = own_store
    assert parse_options({"priority": " 3 ", "weight": "", "max_running": "0"}) == {
        "priority": 3, "weight": None, "max_running": 0}
    with pytest.raises(UsageError, match="priority: expected a whole number, got 'abc'"):
        parse_options({"priority": "abc"})

    job = make_job(store, n_shards=1).job_id
    set_options(store, job, priority=-2, max_running=4)
    state = store.status(job)
    assert (state["priority"], state.get("weight", "1"), state["max_running"]) == ("-2", "1", "4")
    for bad in ({"priority": 10}, {"weight": 0}, {"max_running": -1}, {}):
        with pytest.raises(UsageError):
            set_options(store, job, **bad)
    assert store.status(job)["priority"] == "-2"
    with pytest.raises(JobNotFound):
        set_options(store, "no-such-job", priority=1)
    store.end_job(job, JobStatus.CANCELLED)
    with pytest.raises(UsageError):
        set_options(store, job, priority=1)

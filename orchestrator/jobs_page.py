"""The Jobs page inside ``convoy flower``: every job of the broker with its progress, and one job's
steps, with Cancel and its priority, weight and cap on running steps.

Everything is read from the job store (Redis), not from Flower's memory of events, so the page is
right after a Flower restart and shows jobs whose tasks Flower never saw. The handlers are
Flower's own kind (:class:`flower.views.BaseHandler`): the same port and the same login. The
forms' POSTs also need Tornado's XSRF token, which Flower itself does not ask for under basic
auth. Store reads run on Flower's thread pool, so a slow broker never stalls Flower's event loop.

Routes (under Flower's ``--url_prefix`` when it has one):

- ``GET /jobs``: every job, newest first; an inline script polls ``/jobs.json`` every 2 s.
- ``GET /jobs.json``: the same rows as JSON.
- ``GET /jobs/<job>``: one job: its steps by state, the slowest and the failed ones, the forms.
- ``POST /jobs/<job>/cancel`` and ``POST /jobs/<job>/options`` (priority, weight, max_running).
- ``GET /jobs/<job>/out/<file>``: the job's report page in OUT (``report.html``, or a Grad-CAM
  job's ``index.html``) and the images it shows; nothing else of OUT, never through a symlink
  nor out of OUT, and only for an OUT on this machine.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import secrets
import stat
import time
from collections import Counter
from pathlib import Path, PurePosixPath

import tornado.template
import tornado.web
from flower.views import BaseHandler
from redis.exceptions import RedisError
from tornado.ioloop import IOLoop

from convoy.orchestrator import control
from convoy.orchestrator.progress import STAGE_OF, fmt_seconds
from convoy.orchestrator.status import brief, extraction_rate, waiting_for, waiting_words
from convoy.shared import keys, storage
from convoy.shared.errors import BadValue, JobNotFound, UsageError
from convoy.shared.jobstore import JobStore
from convoy.shared.states import JobStatus, StepState, is_final
from convoy.shared.values import whole
from convoy.shared.words import plural

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: How often the pages ask for fresh rows, milliseconds.
POLL_MS = 2000
#: The report page a job leaves in OUT, by kind (``convoy report`` and ``convoy run`` write
#: ``report.html``; a Grad-CAM job's gallery is its ``index.html``).
REPORT_OF = {"extract": "report.html", "cam": "index.html"}
#: What of OUT may be served besides the report page: the images a report shows.
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp", ".bmp": "image/bmp"}
#: The largest file of OUT served, bytes.
MAX_SERVED_BYTES = 64 * 2**20
#: Rows of the slowest steps, and of each list of failures, shown on a job's page.
SLOWEST_SHOWN, FAILURES_SHOWN = 10, 100
#: The form's fields, as :func:`convoy.orchestrator.control.set_options` names them.
OPTION_FIELDS = ("priority", "weight", "max_running")
#: What a redirect after a POST says, by the note it carries (never text from the request).
NOTES = {"cancelled": "The job was cancelled.", "ended": "The job had ended already: nothing was cancelled.",
         "options": "The job's options were changed."}


def report_policy() -> str:
    """The content security policy of a report page served from OUT: of scripts, only the ones
    Convoy writes into its pages (:func:`convoy.shared.gallery.page`, by their hashes) run, so a page
    someone else put in OUT can neither read the dashboard's cookies nor post its forms. Images
    come from the same job's OUT through this server; nothing is sent anywhere."""
    from convoy.shared import gallery

    def digest(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"

    scripts = f"{digest(gallery.GUARD)} {digest(gallery.SCRIPT)} 'unsafe-hashes' {digest(gallery.ON_MISSING)}"
    return (f"default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; script-src {scripts}; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# --- what the pages show ----------------------------------------------------------------------

class JobsPage:
    """The store the pages read, and each job's OUT once read (a job's OUT never changes)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._outs: dict[str, str] = {}

    def out_dirs(self, job_ids: list[str]) -> dict[str, str]:
        missing = [j for j in job_ids if j not in self._outs]
        if missing:
            self._outs.update(self.store.out_dirs(missing))
        return {j: self._outs[j] for j in job_ids if j in self._outs}

    def rows(self) -> list[dict]:
        """Every job of the index, newest first, as the list shows it."""
        table = self.store.jobs_table()
        live = self.store.live_workers_by_queue(keys.ALL_QUEUES)
        ids = [item["job_id"] for item in table]
        outs = self.out_dirs(ids)
        if len(self._outs) > len(outs):  # jobs that left the index
            self._outs = outs
        return [job_row(self.store, item, live, outs.get(item["job_id"])) for item in table]

    def detail(self, job_id: str) -> dict:
        """One job: its row, its steps by state, the slowest and the failed ones, skipped images."""
        kind = self.store.kind_of(job_id)  # JobNotFound for a job this broker does not know
        report = brief(self.store, job_id)
        steps = self.store.steps(job_id)
        now = self.store.now()
        live = self.store.live_workers_by_queue(keys.ALL_QUEUES)
        table = self.store.jobs_table([job_id])
        if not table:  # its keys expired a moment ago
            raise JobNotFound(f"job {job_id} has expired from this broker")
        row = job_row(self.store, table[0], live, self.out_dirs([job_id]).get(job_id))
        row["running_steps"] = report.get("running", row["running_steps"])
        return {"row": row, "kind": kind, "report": report, "counts": sorted(Counter(
                    str(s.get("state", "unknown")) for s in steps.values()).items()),
                "steps_total": len(steps), "slowest": slowest_steps(steps, now),
                "failed": [{"step": name, **s} for name, s in steps.items()
                           if s.get("state") == StepState.FAILED][:FAILURES_SHOWN],
                "skipped": _skipped(self.store, job_id, kind, steps)}


def _final_rate(state: dict, done: int) -> float:
    """The rate an ended job had: an extraction's over its extracting stage (images it extracted,
    reused ones apart), a Grad-CAM job's from its first step running to its end; 0 when unknown."""
    if state.get("kind", "extract") == "extract":
        try:
            extracted = int(json.loads(state.get("summary") or "{}").get("extracted_images", done))
        except (ValueError, TypeError, AttributeError):
            extracted = done
        return extraction_rate(extracted, state)
    seconds = _float(state.get("ended_at")) - _float(state.get("first_running_at"))
    return done / seconds if done and seconds > 0 and _float(state.get("first_running_at")) else 0.0


def job_row(store: JobStore, item: dict, live: dict[str, int], out_dir: str | None) -> dict:
    """One job as the pages show it: raw values, and ``text``, the words of each cell (the page's
    script sets a cell ``data-field=name`` to ``text[name]``)."""
    state, job = item["state"], item["job_id"]
    status = state.get("status", "unknown")
    final = is_final(status)
    done, total = _int(state.get("images_done")), _int(state.get("images_total"))
    running = item.get("running", {})
    rate = _final_rate(state, done) if final else sum(_float(s.get("images_per_s")) for s in running.values())
    eta = (total - done) / rate if rate > 0 and total > done else None
    stage = _stage(item, status)
    percent = 100.0 * done / total if total else (100.0 if status == JobStatus.DONE else 0.0)
    priority, weight = _int(state.get("priority"), 0), _int(state.get("weight"), 1)
    max_running = _int(state.get("max_running"), 0)
    waiting = waiting_words(waiting_for(store, state, live))
    failed = item.get("shards_failed", 0)
    unit = "batch" if state.get("kind") == "cam" else "shard"
    errors = "; ".join(e for e in (state.get("error", ""), f"{plural(failed, unit)} failed" if failed else "") if e)
    report = _report_file(out_dir, state.get("kind", "extract"))
    created = _float(state.get("created_at"))
    return {
        "job_id": job, "kind": state.get("kind", "extract"), "status": status, "final": final, "stage": stage,
        "images_done": done, "images_total": total, "percent": round(percent, 1),
        "images_per_s": round(rate, 2), "eta_s": round(eta, 1) if eta is not None else None,
        "priority": priority, "weight": weight, "max_running": max_running, "running_steps": len(running),
        "waiting_for": waiting, "error": state.get("error", ""), "shards_failed": failed,
        "created_at": created, "out": out_dir or "", "report": report,
        "text": {
            "status": status, "stage": stage or "-", "images": f"{done}/{total}", "percent": f"{percent:.0f}%",
            "rate": f"{rate:.1f}" if rate else "-", "eta": fmt_seconds(eta) if eta is not None else "-",
            "share": f"{priority} / {weight}" + (f", at most {max_running} running" if max_running else ""),
            "running": str(len(running)), "waiting": waiting or "-", "errors": errors or "-",
            "submitted": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if created else "-",
        },
    }


def _stage(item: dict, status: str) -> str:
    """What the job does now, in words: the stage, with how far its shards (or batches) are, or
    the epoch a training is at."""
    try:
        stage = STAGE_OF.get(JobStatus.parse(status), "")
    except ValueError:  # a status this version does not know
        return ""
    if not stage:
        return ""
    epoch = next((s for s in item.get("running", {}).values() if s.get("epochs")), None)
    if epoch:
        return f"{stage}, epoch {epoch.get('epoch', 0)}/{epoch['epochs']}"
    if stage in ("extracting", "Grad-CAM") and item.get("shards"):
        unit = "batches" if item["state"].get("kind") == "cam" else "shards"
        return f"{stage}, {item.get('shards_done', 0)}/{item['shards']} {unit} done"
    return stage


def slowest_steps(steps: dict[str, dict], now: float) -> list[dict]:
    """The steps that took (or, running, have taken so far) the longest, longest first."""
    timed = []
    for name, s in steps.items():
        start = _float(s.get("started_at"))
        if not start:
            continue
        end = _float(s.get("finished_at")) if s.get("state") != StepState.RUNNING else now
        if end >= start:
            timed.append({"step": name, "state": s.get("state", ""), "worker": s.get("worker", ""),
                          "seconds": round(end - start, 2),
                          "images": f"{s.get('done', 0)}/{s['total']}" if s.get("total") else "-"})
    return sorted(timed, key=lambda t: -t["seconds"])[:SLOWEST_SHOWN]


def _skipped(store: JobStore, job_id: str, kind: str, steps: dict[str, dict]) -> list[dict]:
    """The images the job left out, with why: at the scan (an extraction's), then in its steps."""
    items = list(store.spec(job_id).options.get("scan_skipped", [])) if kind == "extract" else []
    items += [i for s in steps.values() for i in (s.get("skipped") or [])]
    return [i for i in items if isinstance(i, dict)][:FAILURES_SHOWN]


def _report_file(out_dir: str | None, kind: str) -> str | None:
    """The report page's name when OUT is a folder of this machine and holds one (a plain file)."""
    name = REPORT_OF.get(kind)
    if not out_dir or not name or storage.is_url(out_dir):
        return None
    try:
        return name if stat.S_ISREG(os.lstat(Path(out_dir) / name).st_mode) else None
    except OSError:
        return None


def read_out_file(out_dir: str, kind: str, rel: str) -> tuple[bytes, str]:
    """(content, type) of ``OUT/rel`` if it is the job's report page or an image, a plain file
    below OUT reached through no symlink; FileNotFoundError else."""
    from convoy.shared.paths import open_beneath

    if storage.is_url(out_dir):
        raise FileNotFoundError(rel)
    suffix = PurePosixPath(rel).suffix.lower()
    if rel == REPORT_OF.get(kind):
        kind_of_file = "text/html; charset=utf-8"
    elif suffix in IMAGE_TYPES:
        kind_of_file = IMAGE_TYPES[suffix]
    else:
        raise FileNotFoundError(rel)
    try:
        fd = open_beneath(out_dir, rel)
    except (OSError, ValueError):
        raise FileNotFoundError(rel) from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SERVED_BYTES:
            raise FileNotFoundError(rel)
        return f.read(MAX_SERVED_BYTES), kind_of_file


def parse_options(form: dict[str, str]) -> dict[str, int | None]:
    """The form's priority, weight and max_running as whole numbers (an empty field: None, kept);
    :class:`UsageError` naming the field for anything else."""
    values: dict[str, int | None] = {}
    for name in OPTION_FIELDS:
        text = (form.get(name) or "").strip()
        try:
            values[name] = whole(text) if text else None
        except BadValue as exc:
            raise UsageError(f"{name.replace('_', ' ')}: {exc}") from None
    return values


def _int(value, default: int = 0) -> int:
    try:
        return int(float(value)) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _float(value) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        return 0.0


# --- the handlers -----------------------------------------------------------------------------

class _PageError(tornado.web.HTTPError):
    """A refusal the page shows as one line (Tornado logs it as a warning, not a traceback)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, "%s", message)
        self.message = message


class _Handler(BaseHandler):
    """Flower's handler (its login), plus: the XSRF token on every POST, Convoy's templates, a
    content security policy, and errors as one line on a page (never a traceback)."""

    def initialize(self, page: JobsPage) -> None:
        self.page = page
        self.nonce = secrets.token_urlsafe(16)

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Cache-Control", "no-store")
        self.set_header("X-Frame-Options", "DENY")

    def _policy(self) -> None:
        self.set_header("Content-Security-Policy", (
            f"default-src 'none'; script-src 'nonce-{self.nonce}'; style-src 'unsafe-inline'; img-src 'self'; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"))

    def check_xsrf_cookie(self) -> None:
        """Tornado calls this before :meth:`prepare` (Flower's app sets ``xsrf_cookies``); the login
        is checked first, so both checks are made there, in that order."""

    @tornado.web.authenticated
    def prepare(self) -> None:
        if self.request.method not in ("GET", "HEAD", "OPTIONS"):
            BaseHandler.check_xsrf_cookie(self)  # Flower's: no cross-site or cross-origin request
            tornado.web.RequestHandler.check_xsrf_cookie(self)  # and the form's token, login or not

    def get_template_path(self) -> str:
        return str(TEMPLATES)

    def create_template_loader(self, template_path: str) -> tornado.template.BaseLoader:
        return tornado.template.Loader(template_path)  # autoescaped (xhtml_escape)

    def show(self, template: str, status: int = 200, **values) -> None:
        self.set_status(status)
        self._policy()
        self.render(template, nonce=self.nonce, poll_ms=POLL_MS, **values)

    async def store_call(self, fn, *args):
        """``fn(*args)`` on Flower's thread pool; store errors as a page's error."""
        try:
            return await IOLoop.current().run_in_executor(None, functools.partial(fn, *args))
        except JobNotFound as exc:
            raise _PageError(404, str(exc)) from None
        except RedisError as exc:
            raise _PageError(503, f"the broker does not answer ({type(exc).__name__}); "
                                  "the Jobs page reads every job from it") from None

    def write_error(self, status_code: int, **kwargs) -> None:
        if status_code == 401:  # Flower's answer, which asks the browser for the login
            return super().write_error(status_code, **kwargs)
        exc = (kwargs.get("exc_info") or (None, None, None))[1]
        if isinstance(exc, _PageError):
            message = exc.message
        elif isinstance(exc, tornado.web.HTTPError):
            message = exc.log_message % exc.args if exc.log_message else self._reason
        else:
            message = "internal error; Flower's log has the details"
        self.show("error.html", status=status_code, message=message)


class JobsView(_Handler):
    async def get(self) -> None:
        rows = await self.store_call(self.page.rows)
        self.show("jobs.html", rows=rows)


class JobsData(_Handler):
    async def get(self) -> None:
        rows = await self.store_call(self.page.rows)
        self.set_header("Content-Type", "application/json")
        for row in rows:
            row["url"] = self.reverse_url("convoy-job", row["job_id"])
            row["report_url"] = (self.reverse_url("convoy-job-file", row["job_id"], row["report"])
                                 if row["report"] else None)
        self.finish(json.dumps({"jobs": rows, "time": time.time()}))


class JobView(_Handler):
    async def get(self, job_id: str) -> None:
        detail = await self.store_call(self.page.detail, job_id)
        self.show("job.html", message="", note=NOTES.get(self.get_query_argument("note", "")), **detail)

    async def failed(self, job_id: str, status: int, message: str) -> None:
        """The job's page again, with the refusal at its top."""
        detail = await self.store_call(self.page.detail, job_id)
        self.show("job.html", status=status, message=message, note=None, **detail)

    def done(self, job_id: str, note: str) -> None:
        self.redirect(self.reverse_url("convoy-job", job_id) + f"?note={note}", status=303)


class CancelJob(JobView):
    async def post(self, job_id: str) -> None:
        cancelled = await self.store_call(control.cancel_job, self.page.store, job_id)
        self.done(job_id, "cancelled" if cancelled else "ended")


class JobOptions(JobView):
    async def post(self, job_id: str) -> None:
        try:
            values = parse_options({name: self.get_body_argument(name, "") for name in OPTION_FIELDS})
            await self.store_call(functools.partial(control.set_options, self.page.store, job_id, **values))
        except UsageError as exc:
            return await self.failed(job_id, 400, str(exc).splitlines()[0] if str(exc) else "bad value")
        self.done(job_id, "options")


class JobFile(_Handler):
    """The job's report page (sandboxed) and the images it shows, from OUT on this machine."""

    async def get(self, job_id: str, rel: str) -> None:
        kind = await self.store_call(self.page.store.kind_of, job_id)
        out = (await self.store_call(self.page.out_dirs, [job_id])).get(job_id)
        if not out:
            raise _PageError(404, f"job {job_id} has no OUT on record")
        try:
            content, kind_of_file = await IOLoop.current().run_in_executor(None, read_out_file, out, kind, rel)
        except FileNotFoundError:
            raise _PageError(404, "no such report file in the job's OUT on this machine") from None
        self.set_header("Content-Type", kind_of_file)
        self.set_header("Content-Security-Policy", report_policy())
        self.finish(content)


# --- into Flower ------------------------------------------------------------------------------

def routes(page: JobsPage) -> list[tornado.web.URLSpec]:
    job = r"/jobs/([^/]+)"
    return [
        tornado.web.url(r"/jobs", JobsView, {"page": page}, name="convoy-jobs"),
        tornado.web.url(r"/jobs\.json", JobsData, {"page": page}, name="convoy-jobs-json"),
        tornado.web.url(job + r"/cancel", CancelJob, {"page": page}, name="convoy-job-cancel"),
        tornado.web.url(job + r"/options", JobOptions, {"page": page}, name="convoy-job-options"),
        tornado.web.url(job + r"/out/(.+)", JobFile, {"page": page}, name="convoy-job-file"),
        tornado.web.url(job, JobView, {"page": page}, name="convoy-job"),
    ]


class NavbarLoader(tornado.template.Loader):
    """Flower's templates, its navbar with one more item: Jobs, after Broker. Where this Flower's
    navbar has no Broker item, it is left as it is."""

    ITEM = ('\n        <li class="nav-item">\n          <a class="nav-link" href="{{ reverse_url(\'convoy-jobs\') }}">'
            'Jobs</a>\n        </li>')

    def _create_template(self, name: str) -> tornado.template.Template:
        if name != "navbar.html":
            return super()._create_template(name)
        text = (Path(self.root) / name).read_text(encoding="utf-8")
        anchor = text.find("reverse_url('broker')")
        end = text.find("</li>", anchor) if anchor >= 0 else -1
        if end >= 0:
            end += len("</li>")
            text = text[:end] + self.ITEM + text[end:]
        return tornado.template.Template(text, name=name, loader=self)


def install(store: JobStore) -> None:
    """Add the Jobs pages to the Flower app this process is about to build: its routes before
    Flower's catch-all, and a Jobs item in its navbar."""
    from flower import urls

    if any(getattr(h, "name", None) == "convoy-jobs" for h in urls.handlers):
        return
    catch_all = [i for i, h in enumerate(urls.handlers) if isinstance(h, tuple) and h[0] == r".*"]
    at = catch_all[0] if catch_all else len(urls.handlers)
    urls.handlers[at:at] = routes(JobsPage(store))
    urls.settings["template_loader"] = NavbarLoader(urls.settings["template_path"])

"""``convoy report OUT``: one page a user can show a colleague, written to ``OUT/report.html``.

Everything comes from files in OUT (the manifest with the run's summary, the training reports,
the Grad-CAM heatmaps), so the page can be made again at any time, with no broker.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from convoy.orchestrator.progress import fmt_seconds
from convoy.orchestrator.sample import sample_note
from convoy.orchestrator.watch import stage_detail
from convoy.shared import storage
from convoy.shared.camjob import HEATMAPS_NAME
from convoy.shared.gallery import ON_MISSING, gallery_section, notes_section, page, skipped_section, write_page
from convoy.shared.manifest import read_manifest
from convoy.shared.storage import Location
from convoy.shared.words import job_weights, plural

REPORT_NAME = "report.html"


def _table(rows: list[tuple], head: tuple | None = None) -> str:
    cells = lambda row, tag: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)  # noqa: E731
    top = f"<tr>{cells(head, 'th')}</tr>" if head else ""
    return "<table>" + top + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows) + "</table>"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _summary(manifest: dict) -> str:
    spec, end, run = manifest["spec"], manifest.get("end", {}), manifest.get("run", {})
    model = spec["model"]
    rows = [("job", manifest["job_id"]), ("status", end.get("status", run.get("status", "unknown"))),
            ("data", spec["data_dir"]), ("images", run.get("images", end.get("images_done", ""))),
            ("shards", len(manifest["shards"])), ("classes", ", ".join(spec.get("class_names") or []) or "none"),
            ("layer", model["layer"]), ("input size", f"{model['input_size_px']} px"),
            ("weights", job_weights(spec)[0])]
    if spec["options"].get("layout") in ("webdataset", "parquet"):
        rows.append(("input", spec["options"]["layout"]))
    formats = ["hdf5", *(spec["options"].get("formats") or [])]  # the HDF5 shard files are always written
    rows.append(("outputs", ", ".join(dict.fromkeys(formats))))
    if run.get("seconds"):
        rows.append(("wall time", fmt_seconds(run["seconds"])))
    if end.get("error"):
        rows.append(("error", end["error"]))
    return "<h2>Job</h2>" + _table(rows)


def _notes(manifest: dict) -> str:
    """What a reader must know before the numbers: random weights, sample data."""
    spec = manifest["spec"]
    return notes_section([n for n in (job_weights(spec)[1], sample_note(spec["data_dir"])) if n])


def _stages(run: dict) -> str:
    if not run.get("stages"):
        return ""
    rows = [(name, fmt_seconds(t), stage_detail(name, run)) for name, t in run["stages"].items()]
    return "<h2>Stages</h2>" + _table(rows, ("stage", "time", ""))


def _metrics(model_dir: Path, label: str, suffix: str) -> str:
    metrics = _read_json(model_dir / f"metrics{suffix}.json")
    if not metrics:
        return ""
    names = metrics.get("class_names", [])
    out = [f"<h2>{label}</h2>", _table([("test accuracy", f"{metrics['test_accuracy']:.4f}"),
                                        ("test loss", f"{metrics['test_loss']:.4f}"),
                                        ("test images", metrics.get("test_images", ""))])]
    per_class = metrics.get("per_class", {})
    if per_class:
        out.append(_table([(n, f"{v['precision']:.3f}", f"{v['recall']:.3f}", v["support"])
                           for n, v in per_class.items()], ("class", "precision", "recall", "images")))
    matrix = metrics.get("confusion_matrix")
    if matrix:
        out.append("<h3>Confusion matrix (rows: true class, columns: predicted)</h3>")
        out.append(_table([(n, *row) for n, row in zip(names, matrix, strict=False)], ("", *names)))
    curves = model_dir / f"curves{suffix}.png"
    if curves.is_file():
        out.append(f'<h3>Training curves</h3><img src="model/{curves.name}" alt="training curves" '
                   f'onerror="{ON_MISSING}" style="max-width:100%">')
    return "".join(out)


def _gallery(out_dir: Path) -> str:
    heatmaps = out_dir / "cam" / HEATMAPS_NAME
    if not heatmaps.is_file():
        return ""
    from convoy.shared.heatmaps import read_attrs, read_rows

    rows, attrs = read_rows(heatmaps), read_attrs(heatmaps)
    names = json.loads(attrs.get("class_names", "[]"))
    return (f"<h2>Grad-CAM ({plural(len(rows.paths), 'image')}, layer {html.escape(str(attrs.get('layer')))})</h2>"
            + gallery_section(rows, names, prefix="cam/"))


def _skipped(manifest: dict) -> str:
    skipped = (manifest.get("summary") or {}).get("skipped", [])
    return skipped_section([(s["path"], s["reason"]) for s in skipped])


def write_report(out_dir: Location) -> Location:
    """OUT/report.html from what OUT holds; returns its path (or URL: for OUT on a store the page
    is built from a local copy of the files it shows, then uploaded)."""
    if storage.is_url(out_dir):
        shown = ["manifest.json", *(f"model/{n}{s}.{e}" for n in ("metrics", "curves") for s in ("", "_finetune")
                                     for e in (("json",) if n == "metrics" else ("png",))),
                 f"cam/{HEATMAPS_NAME}"]
        with storage.local_mirror(out_dir, "report", shown, []) as work:
            storage.upload_file(write_report(work), storage.join(out_dir, REPORT_NAME))
        return storage.join(out_dir, REPORT_NAME)
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    model_dir = out_dir / "model"
    body = "".join((
        _notes(manifest), _summary(manifest), _stages(manifest.get("run", {})),
        _metrics(model_dir, "Classifier", ""), _metrics(model_dir, "Fine-tuned model", "_finetune"),
        _gallery(out_dir), _skipped(manifest),
    ))
    return write_page(out_dir / REPORT_NAME, page(f"Convoy job {manifest['job_id']}", body))

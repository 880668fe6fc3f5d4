"""The Grad-CAM gallery: each image beside its heatmap overlay (each opens at full size), with the
true and predicted class, the probability of the predicted class and its logit, and a mark for
right or wrong; misclassified images first. Notes a reader must see (random weights) come first.

Plain HTML and a few lines of JavaScript (sorting and filtering by class), nothing fetched from
elsewhere, so the page works from a folder, an archive or a mail attachment. The page notes on
``<body>`` any image that fails to load (``data-missing``) and any script error
(``data-errors``): the tests read them from a headless browser.
"""

from __future__ import annotations

import html
from pathlib import Path

from convoy.shared import storage
from convoy.shared.words import plural

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
.controls{margin:.8em 0;display:flex;gap:1em;flex-wrap:wrap;align-items:center}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:2px solid #ccc;border-radius:6px;padding:6px;width:336px;background:#fafafa}
.card.wrong{border-color:#c62828;background:#fff5f5}.card.right{border-color:#2e7d32}
.pair{display:flex;gap:4px}.pair figure{margin:0;flex:1}.pair img{width:162px;height:162px;object-fit:contain;
background:#eee;display:block}.pair figcaption{font-size:11px;color:#666;text-align:center}
.meta{font-size:13px;margin-top:4px}.path{font-size:11px;color:#555;word-break:break-all}
.mark{font-weight:bold;font-size:16px}.right .mark{color:#2e7d32}.wrong .mark{color:#c62828}
.flags{color:#b26a00;font-size:11px}
.note{border-left:4px solid #b26a00;background:#fff8e1;padding:6px 10px;margin:.6em 0}
.pair a{display:block}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
"""

#: The ``onerror`` of every image of a page: counts it as missing (see GUARD).
ON_MISSING = "missing(this)"

# Records what a reader would see as broken (missing images, script errors) on <body>.
GUARD = """
window.addEventListener('error', function (e) {
  var b = document.body || document.documentElement;
  b.dataset.errors = (b.dataset.errors ? b.dataset.errors + ' | ' : '') + (e.message || 'error');
});
function missing(img) {
  img.classList.add('missing');
  document.body.dataset.missing = String(Number(document.body.dataset.missing || 0) + 1);
}
"""

SCRIPT = """
(function () {
  var box = document.getElementById('cards');
  if (!box) { return; }
  var cards = Array.prototype.slice.call(box.querySelectorAll('.card'));
  var cls = document.getElementById('cls'), sort = document.getElementById('sort');
  var wrong = document.getElementById('wrong'), shown = document.getElementById('shown');
  var orders = {
    wrong: function (a, b) { return a.dataset.right - b.dataset.right || a.dataset.pos - b.dataset.pos; },
    low: function (a, b) { return a.dataset.prob - b.dataset.prob; },
    high: function (a, b) { return b.dataset.prob - a.dataset.prob; },
    path: function (a, b) { return a.dataset.path < b.dataset.path ? -1 : 1; }
  };
  function update() {
    var n = 0;
    cards.sort(orders[sort.value]).forEach(function (c) {
      var keep = (cls.value === '' || c.dataset.truth === cls.value || c.dataset.pred === cls.value) &&
                 (!wrong.checked || c.dataset.right === '0');
      c.hidden = !keep; n += keep ? 1 : 0; box.appendChild(c);
    });
    shown.textContent = n + ' shown';
  }
  [cls, sort, wrong].forEach(function (el) { el.addEventListener('change', update); });
  update();
  document.body.dataset.ready = '1';
})();
"""


def _name(class_names: list[str], index: int) -> str:
    if index < 0:
        return "unknown"
    return class_names[index] if index < len(class_names) else f"class {index}"


def _card(row: dict, class_names: list[str], prefix: str) -> str:
    truth, pred = int(row["label"]), int(row["class_index"])
    right = "" if truth < 0 else ("1" if truth == pred else "0")
    state = {"1": "right", "0": "wrong"}.get(right, "")
    mark = {"1": "&#10003; right", "0": "&#10007; wrong"}.get(right, "")
    # Each thumbnail opens its picture at full size (as drawn: DISPLAY_PX at most) in a new tab.
    img = lambda src, alt: (f'<a href="{html.escape(prefix + src)}" target="_blank" rel="noopener" '  # noqa: E731
                            f'title="open the {alt} at full size"><img src="{html.escape(prefix + src)}" '
                            f'alt="{html.escape(alt)}" loading="lazy" onerror="{ON_MISSING}"></a>')
    flags = f'<div class="flags">{html.escape(row["flags"])}</div>' if row["flags"] else ""
    # The class the row explains: the predicted one, or (--top-k) the one ranked 2nd, 3rd, ...
    which, of = ("predicted", "the predicted class") if row["rank"] == 0 else \
        (f"ranked {row['rank'] + 1}", f"the class ranked {row['rank'] + 1}")
    return (
        f'<div class="card {state}" data-truth="{html.escape(_name(class_names, truth))}" '
        f'data-pred="{html.escape(_name(class_names, pred))}" data-right="{right or 1}" '
        f'data-prob="{row["probability"]:.6f}" data-pos="{row["pos"]}" data-path="{html.escape(row["path"])}">'
        f'<div class="pair"><figure>{img(row["original"], "original")}<figcaption>image</figcaption></figure>'
        f'<figure>{img(row["overlay"], "heatmap")}<figcaption>Grad-CAM</figcaption></figure></div>'
        f'<div class="meta"><span class="mark">{mark}</span> '
        f'true <b>{html.escape(_name(class_names, truth))}</b> &middot; {which} '
        f'<b>{html.escape(_name(class_names, pred))}</b><br>probability of {of} {row["probability"]:.3f} '
        f'&middot; logit {row["score"]:.3f}</div><div class="path">{html.escape(row["path"])}</div>{flags}</div>'
    )


def _rows(rows) -> list[dict]:
    out = []
    ranks = getattr(rows, "rank", None)
    ranks = [0] * len(rows.paths) if ranks is None else ranks
    for pos, values in enumerate(zip(rows.paths, rows.class_index, rows.score, rows.probability, rows.label,
                                     rows.flags, rows.overlay, rows.original, ranks, strict=True)):
        path, cls, score, prob, label, flags, overlay, original, rank = values
        out.append({"pos": pos, "path": path, "class_index": int(cls), "score": float(score),
                    "probability": float(prob), "label": int(label), "flags": flags, "overlay": overlay,
                    "original": original, "rank": int(rank)})
    return out


def gallery_section(rows, class_names: list[str], prefix: str = "") -> str:
    """The gallery's controls and cards; image paths are relative to CAMDIR, after ``prefix``."""
    items = _rows(rows)
    wrong = sum(1 for r in items if r["label"] >= 0 and r["label"] != r["class_index"])
    known = sum(1 for r in items if r["label"] >= 0)
    names = sorted({_name(class_names, r["label"]) for r in items if r["label"] >= 0}
                   | {_name(class_names, r["class_index"]) for r in items})
    options = "".join(f'<option value="{html.escape(n)}">{html.escape(n)}</option>' for n in names)
    counts = plural(len(items), "heatmap") + (f", {wrong} of {known} misclassified" if known else "")
    controls = (
        f'<div class="controls"><span>{counts}</span>'
        f'<label>class <select id="cls"><option value="">all</option>{options}</select></label>'
        '<label>sort <select id="sort"><option value="wrong">misclassified first</option>'
        '<option value="low">probability, lowest first</option><option value="high">probability, highest first'
        '</option><option value="path">path</option></select></label>'
        '<label><input type="checkbox" id="wrong"> misclassified only</label><span id="shown"></span></div>'
    )
    cards = "".join(_card(r, class_names, prefix) for r in items)
    return f'{controls}<div class="cards" id="cards">{cards}</div>'


def notes_section(notes: list[str]) -> str:
    """Each note a reader must see before the results (random weights, sample data), or ""."""
    return "".join(f'<p class="note"><strong>Note:</strong> {html.escape(n)}</p>' for n in notes)


def skipped_section(skipped: list[tuple[str, str]]) -> str:
    if not skipped:
        return ""
    items = "".join(f"<li>{html.escape(p)}: {html.escape(r)}</li>" for p, r in skipped)
    return f"<h2>Skipped ({plural(len(skipped), 'image')})</h2><ul>{items}</ul>"


def page(title: str, body: str) -> str:
    """A whole self-contained page around ``body``. Its only scripts are GUARD, SCRIPT and
    ON_MISSING (the Jobs page in Flower serves it with a policy that lets those alone run)."""
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style><script>{GUARD}</script></head><body><h1>{html.escape(title)}</h1>"
        f"{body}<script>{SCRIPT}</script></body></html>"
    )


def write_page(path: Path, text: str) -> Path:
    """Write under a temporary name, then rename: a reader never sees half a page."""
    with storage.atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_gallery(path: Path, rows, class_names: list[str], title: str, notes: list[str] | None = None) -> Path:
    """CAMDIR/index.html, ``notes`` above the cards."""
    body = notes_section(notes or []) + gallery_section(rows, class_names) + skipped_section(rows.skipped)
    return write_page(path, page(title, body))


def cancelled_page(job_id: str, batches_done: int, batches: int) -> str:
    """CAMDIR/index.html of a Grad-CAM job that was cancelled before its gallery was assembled."""
    body = (f"<p>This Grad-CAM job was <strong>cancelled</strong>: {batches_done} of "
            f"{plural(batches, 'batch')} had finished. Overlays already drawn are in "
            f"<code>overlays/</code>; no <code>heatmaps.h5</code> was written. Run <code>convoy cam</code> "
            f"again into this folder to make the whole gallery.</p>")
    return page(f"Grad-CAM {job_id}: cancelled", body)

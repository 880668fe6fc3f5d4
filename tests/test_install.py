"""Convoy installs one name, `convoy`: a built wheel holds nothing else at its top level, and the
editable install the tests run from maps `convoy.*` onto the project's folders without putting
`shared`, `workers` or `orchestrator` on the path. (`convoy run` from a folder of junk packages
with those names is in test_first_hour's `demo`.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import ROOT

SOURCES = ["pyproject.toml", "README.md", "orchestrator", "workers", "shared"]


def test_a_built_wheel_holds_only_convoy_and_its_dist_info(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("convoy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"convoy", wheel.name.split("-py")[0] + ".dist-info"}
    for module in ("convoy/shared/celery_app.py", "convoy/workers/extract.py", "convoy/orchestrator/cli.py",
                   "convoy/orchestrator/templates/jobs.html"):
        assert module in names, module
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "convoy = convoy.orchestrator.cli:main" in entry, entry


def test_the_editable_install_maps_convoy_onto_the_folders_and_installs_nothing_else(tmp_path):
    probe = ("import importlib.util, convoy.shared, convoy.workers.extract, convoy.orchestrator.cli\n"
             "print(convoy.shared.__file__)\n"
             "print(*[n for n in ('shared', 'workers', 'orchestrator') if importlib.util.find_spec(n)])\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          check=True)
    where, others = proc.stdout.splitlines()
    assert where == str(ROOT / "shared" / "__init__.py")
    assert others == "", f"top-level names importable outside the project: {others}"

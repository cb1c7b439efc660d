"""The layers hold (.importlinter: roof > lineage > stages > evaluation > retrieval > training >
data > core; the service imports only inference code; the ground floor imports no project
package), the import graph has no cycle between modules, and importing the service loads no
training loop, Dagster or stage module."""
import subprocess
import sys

import grimp

from core.config import REPO_ROOT

PACKAGES = ("core", "data", "training", "retrieval", "evaluation", "pailitao", "orchestration", "serving")


def test_import_contracts_are_kept():
    r = subprocess.run([str(REPO_ROOT / ".venv/bin/lint-imports") if (REPO_ROOT / ".venv/bin/lint-imports").exists()
                        else "lint-imports", "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_no_import_cycle_between_modules():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    own = sorted(m for m in graph.modules if m.split(".")[0] in PACKAGES)
    cycles = []
    for m in own:
        for imported in graph.find_modules_directly_imported_by(m):
            if imported != m and graph.chain_exists(importer=imported, imported=m):
                cycles.append((m, imported))
    assert not cycles, f"import cycles: {cycles[:10]}"


def test_the_service_imports_no_training_loop_stage_or_dagster():
    probe = ("import sys, serving.app; print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "('lightning', 'dagster', 'orchestration') or m.startswith(('pailitao.stages', 'pailitao.lineage', "
             "'training.modules', 'training.rerank_module'))))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout

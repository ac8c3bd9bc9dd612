"""The install files and the README agree: every README section tools/setup.sh points to exists,
the launch lines a user needs are there, and what the code imports is pinned."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_setup_script_points_to_readme_sections_that_exist():
    readme = (ROOT / "README.md").read_text()
    headings = {m.group(1).strip() for m in re.finditer(r"^#+ (.+)$", readme, re.M)}
    pointers = re.findall(r'README "([^"]+)"', (ROOT / "tools" / "setup.sh").read_text())
    assert pointers
    for section in pointers:
        assert section in headings, f"tools/setup.sh points to README section {section!r}"


def test_readme_says_how_to_launch_on_cpu_and_on_gpu_nodes():
    readme = (ROOT / "README.md").read_text()
    assert "deepspeed --num_gpus 2" in readme                       # CPU: else one process
    assert "--hostfile" in readme and "--num_nodes" in readme        # GPU nodes
    assert "--no-build-isolation deepspeed==" in readme             # the GPU install gets DeepSpeed


def test_pycocoevalcap_is_pinned_and_required():
    constraints = (ROOT / "requirements" / "constraints.txt").read_text()
    assert re.search(r"^pycocoevalcap==", constraints, re.M)
    assert re.search(r"^pycocotools==", constraints, re.M)
    assert '"pycocoevalcap' in (ROOT / "pyproject.toml").read_text()


def test_ci_runs_the_readme_test_command():
    """.ci/run is the README's second command (set up from nothing, then the default tier)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    test_line = next(ln for ln in block.splitlines() if "pytest" in ln).split("#", 1)[0].strip()
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.lstrip().startswith("#")]
    assert test_line in ci, (test_line, ci)

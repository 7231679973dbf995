"""simulations/deploy_scale.py: a loopback consortium of N warm SuperNodes (TLS + node auth) completes a run.

The README's 8-site figures come from ``python simulations/deploy_scale.py --sites 8 --rounds 2`` (about 3
minutes on the shared 2-core machine); the test runs the same script with 4 sites and one round.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedprog.deploy.loopback import synth_sites

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "simulations" / "deploy_scale.py"
TEST_SITES = 4
SUMMARY = re.compile(
    rf"^deploy_scale: {TEST_SITES} sites completed in [\d.]+ s; site RSS median \d+ MiB \(max \d+\); "
    r"coordinator \d+ MiB$"
)


def test_synth_sites_one_cancer_per_hospital() -> None:
    sites, overrides = synth_sites(8, holdout=2)
    assert list(sites) == [f"h{k}" for k in range(8)]
    assert [role for _, role in sites.values()].count("holdout") == 2 and sites["h7"] == ("c7", "holdout")
    assert "data.synth.cancers=[c0,c1,c2,c3,c4,c5,c6,c7]" in overrides
    assert "data.synth.survival.censoring=[0.4,0.5,0.5,0.4,0.5,0.5,0.4,0.5]" in overrides
    with pytest.raises(ValueError, match="holdout=3"):
        synth_sites(3, holdout=3)


def _leftovers(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (the consortium folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.name.isdigit() and marker in command:
            found.append(f"{entry.name}: {command[:200]}")
    return found


@pytest.mark.manual  # ~2 min on 2 cores: `pytest -m manual tests/test_deploy_scale.py`
@pytest.mark.timeout(400)
def test_deploy_scale_script_completes_with_every_site(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--sites", str(TEST_SITES), "--rounds", "1", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert SUMMARY.match(done.stdout.strip().splitlines()[-1]), done.stdout[-1500:]
    record = json.loads((out / f"deploy_scale-{TEST_SITES}.json").read_text())
    assert set(record["roles"]) == {f"h{k}" for k in range(TEST_SITES)}
    assert {"coordinator", *record["roles"]} <= set(record["memory"])
    assert all(record["memory"][name]["peak_rss_mib"] > 0 for name in record["roles"])
    results = json.loads((out / f"sites-{TEST_SITES}" / "run" / "results.json").read_text())
    assert results["status"] == "completed" and results["rounds_completed"] == 1
    assert {s["site"]: s["role"] for s in results["sites"]} == record["roles"]
    assert _leftovers(str(out)) == []  # every SuperLink, SuperNode and SuperExec was stopped by PID

"""The datatrove engine on a real one-node SLURM (slurm-wlm: munged + slurmctld + slurmd on localhost).

    pytest tests/e2e/test_data_slurm.py      # needs root and slurm-wlm (launch/ci/install_slurm.sh); ~4 min

``prepare --engine datatrove --executor slurm --tasks 2 --workers 2 --partition debug`` on the real samples
submits the chained job arrays; task 0 of the last document pass is SIGKILLed mid-stage (the
``LLAMA_DT_TEST_KILL`` hook), its array fails, ``--kill-on-invalid-dep`` cancels the dependent job and the
command fails naming the unfinished tasks. Rerunning the same command submits only the unfinished work (that
one task, then the final merge) and ends with the same documents, token-identical shards and report as the
local engine. Skips (with the reason) only where the machine cannot run the daemons: not root, no binaries.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import REPO_ROOT, require_file
from tests.e2e.slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
pytest.importorskip("datatrove", reason="datatrove is not installed (pip install -e '.[data]')")


@pytest.fixture(scope="module")
def cluster() -> Iterator[SlurmCluster]:
    try:
        slurm = SlurmCluster.start()
    except SlurmUnavailable as err:
        pytest.skip(f"no SLURM cluster on this machine: {err}")
    slurm.env.update({"PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    try:
        yield slurm
    finally:
        slurm.stop()


def _prepare(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data_pipeline", "prepare", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900, start_new_session=True)


def test_slurm_run_killed_task_resumes_to_the_local_engine_output(cluster, tmp_path, shared_data):
    from data_pipeline.dt.engine import SLICES_PER_TASK

    tok = require_file(shared_data / "tokenizers" / "llama2" / "tokenizer.model")
    base = ["--source", f"cc={shared_data / 'commoncrawl'}", "--source", f"c4={shared_data / 'c4'}",
            "--source", f"wiki={shared_data / 'wikipedia' / 'wikitext-2-raw.test.txt'}:wikitext",
            "--tokenizer", str(tok), "--workers", "2"]
    local = _prepare([*base, "--output", str(tmp_path / "local")], {**os.environ, **cluster.env})
    assert local.returncode == 0, local.stderr[-3000:]

    out, marker = tmp_path / "slurm", tmp_path / "kill.marker"
    args = [*base, "--engine", "datatrove", "--executor", "slurm", "--partition", "debug", "--tasks", "2",
            "--output", str(out)]
    first = _prepare(args, {**cluster.env, "LLAMA_DT_TEST_KILL": f"pass4:0:50:{marker}"})
    try:
        assert first.returncode == 2, (first.returncode, first.stdout[-2000:], first.stderr[-3000:])
        # pass4 runs SLICES_PER_TASK slices per SLURM array task: killing slice 0 leaves its array task's slices
        killed = list(range(SLICES_PER_TASK))
        assert "the SLURM jobs ended with unfinished tasks" in first.stderr and f"'pass4': {killed}" in first.stderr
        assert marker.exists() and not (out / "manifest.json").exists()
        second = _prepare(args, cluster.env)
        assert second.returncode == 0, (second.stdout[-2000:], second.stderr[-3000:])
    except BaseException:
        print(cluster.logs())
        raise
    jobs = re.search(r"submitted SLURM jobs (.*?); logs", second.stdout).group(1).split(", ")
    assert len(jobs) == 2, second.stdout  # the killed task's pass, then finalize: nothing else reran
    assert json.loads((out / "dt" / "logs" / "07_pass4" / "ranks_to_run.json").read_text()) == killed
    for s in ("cc", "c4", "wiki"):
        for ext in ("bin", "idx", "docs.jsonl"):
            assert (out / f"{s}.{ext}").read_bytes() == (tmp_path / "local" / f"{s}.{ext}").read_bytes(), (s, ext)
    rs, rl = (json.loads((d / "report.json").read_text()) for d in (out, tmp_path / "local"))
    assert rs["cleaning"]["by_source"] == rl["cleaning"]["by_source"] and rs["read_issues"] == rl["read_issues"]
    assert rs["engine"]["executor"] == "slurm"
    assert "malformed or unusable records: 27" in second.stdout

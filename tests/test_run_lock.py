"""One live run per OUTPUT_DIR (issue 15, bug 5): a second run in a busy folder is refused with
one line naming the holder, a killed run's lock is taken over, and every metrics line and
results row carries the run's id (kept through --resume). Real `python -m classification`
processes on the engine tests' tiny ImageFolder."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sgdet.engine.runlock import LOCK, OutputDirBusy, RunLock
from classification.__main__ import main
from test_engine import make_imagefolder, write_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def _classification(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "classification", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=240, **kwargs)


def _wait_for(path: str, proc, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_second_run_refused_killed_run_taken_over(tmp_path):
    data = make_imagefolder(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    config = write_config(str(tmp_path / "tiny.yaml"), data, out)
    args = ["train", "--config", config, "SOLVER.LR", "0.001", "SOLVER.EPOCHS", "5000"]
    first = subprocess.Popen([sys.executable, "-m", "classification", *args], cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(os.path.join(out, "metrics.jsonl"), first)      # it is training
        second = _classification(*args)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"OUTPUT_DIR {out} is in use by run" in lines[0] and f"pid {first.pid} " in lines[0]
        holder = json.load(open(os.path.join(out, LOCK)))
        assert holder["pid"] == first.pid                          # the refused run left it alone
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert os.path.exists(os.path.join(out, LOCK))                 # kill -9 leaves the file behind

    resumed = _classification(*args[:-2], "SOLVER.EPOCHS", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "taking over" in resumed.stderr and f"pid {first.pid} " in resumed.stderr
    assert not os.path.exists(os.path.join(out, LOCK))             # released at the end

    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    run_ids = {m["run"] for m in metrics}
    assert len(run_ids) == 1 and run_ids == {holder["run_id"]}     # the resumed run kept its id
    rows = open(os.path.join(out, "results.md")).read().splitlines()
    assert rows[0].endswith("| Epochs | Run |")
    assert rows[2].endswith(f"| {holder['run_id']} |")


def test_two_fresh_runs_get_different_ids(tmp_path):
    data = make_imagefolder(str(tmp_path / "data"), n_train=2, n_val=1)
    ids = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        config = write_config(str(tmp_path / f"{name}.yaml"), data, out)
        assert main(["train", "--config", config]) == 0          # in process: two sessions
        metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        ids.append(metrics[-1]["run"])
    assert ids[0] != ids[1]


def test_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    folder = str(tmp_path / "run")
    with RunLock(folder) as outer:
        with RunLock(folder) as inner:                 # a nested session (demos, sweeps)
            assert inner.run_id == outer.run_id
        assert os.path.exists(os.path.join(folder, LOCK))
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from sgdet.engine.runlock import RunLock\n"
             "try:\n    RunLock(sys.argv[1]).acquire()\nexcept Exception as e:\n    print(type(e).__name__, e)",
             folder], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
        assert probe.stdout.startswith("OutputDirBusy ") and f"pid {os.getpid()} " in probe.stdout
    assert not os.path.exists(os.path.join(folder, LOCK))
    with RunLock(folder):                              # free again
        with pytest.raises(OutputDirBusy):
            # another open file description conflicts even inside one process: only the
            # registry makes nesting work, so a lock taken behind its back is refused
            from sgdet.engine import runlock
            saved = dict(runlock._held)
            runlock._held.clear()
            try:
                RunLock(folder).acquire()
            finally:
                runlock._held.update(saved)

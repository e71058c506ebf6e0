"""Fault injection on the real tool: kills, rotten checkpoints, divergence, bad data, disk faults, two runs.

Each test does to ``spark-det pretrain`` what a cluster or a user does to it and asserts that
nothing is lost: the same losses as an uninterrupted run, every final output, one clear error
line with the documented exit code, no traceback.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spark_det.cli import pretrain as pretrain_cli
from spark_det.io import load_file

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "pretrain" / "resnet18_smoke.yaml")
# 4 iterations per epoch at 64 px; test_resnet keeps checkpoints at 5 MB, resnet18 makes writes long enough to kill.
TINY = ("model=test_resnet", "input_size=[64,64]", "decoder_width=32", "batch_size=8", "epochs=2", "vis_images=2",
        "warmup_epochs=1", "save_every_iters=1")


@pytest.fixture(scope="module")
def images(unlabeled_images):
    return unlabeled_images(32)


def pretrain(data, out, *overrides, extra=()):
    """The tool in this process: (exit code, stderr is checked by the caller through capsys)."""
    return pretrain_cli.main(["--recipe", RECIPE, "--data", str(data), "--output", str(out), "--device", "cpu",
                              *extra, *overrides])


def command(data, out, *overrides, extra=()):
    return [sys.executable, "-m", "spark_det", "pretrain", "--recipe", RECIPE, "--data", str(data), "--output",
            str(out), "--device", "cpu", *map(str, extra), *overrides]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    return [r["loss"] for r in records(out)]


def temporaries(out):
    return sorted(p.name for p in Path(out).glob(".*.tmp"))


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory):
    """The uninterrupted tiny run every faulty one is compared with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert pretrain(images, out, *TINY) == 0
    return out


@pytest.fixture(scope="module")
def straight_subprocess(images, tmp_path_factory):
    """The same uninterrupted run as a subprocess with one thread, for the faulty runs made that way."""
    out = tmp_path_factory.mktemp("straight_subprocess") / "run"
    proc = subprocess.run(command(images, out, *TINY), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def kill_when(proc: subprocess.Popen, out: Path, pattern: str, timeout: float = 120, nth: int = 1) -> bool:
    """SIGKILL ``proc`` as soon as the ``nth`` new file matching ``pattern`` appears in ``out``
    (polled every millisecond; temporaries an earlier kill left do not count); False if the
    process ended first."""
    deadline = time.time() + timeout
    left_before = set(out.glob(pattern)) if out.is_dir() else set()
    seen: set = set()
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir():
            seen |= set(out.glob(pattern)) - left_before
        if len(seen) >= nth:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    return False


@pytest.mark.slow
def test_kill_9_during_checkpoint_and_final_export_writes_then_resume_loses_nothing(images, tmp_path):
    # resnet18: 130 MB checkpoints, so a write lasts long enough to be killed in the middle of it.
    common = ("model=resnet18", "input_size=[64,64]", "decoder_width=32", "batch_size=8", "epochs=2",
              "vis_images=2", "warmup_epochs=1", "save_every_iters=2")
    # The uninterrupted run is made as the killed ones are: a subprocess with one thread.
    straight = tmp_path / "straight"
    proc = subprocess.run(command(images, straight, *common), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "killed"
    last = out / "checkpoint-last.pth"
    rng = random.Random(0)
    kills = [  # (what the kill waits for, the how-many-th of it in this process)
        (".checkpoint-last.pth.*.tmp", 1),  # in the middle of the first checkpoint write
        (".checkpoint-last.pth.*.tmp", 2),  # in the middle of the next one, from scratch again: (1, 0) after (0, 2)
        (None, 0),  # at a random moment
        (".encoder-resnet18.pth.*.tmp", 1),  # in the middle of the final export
    ]
    for target, nth in kills:
        proc = subprocess.Popen(command(images, out, *common, extra=("--resume", "auto")), cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if target is None:
            time.sleep(rng.uniform(3.0, 6.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        else:
            assert kill_when(proc, out, target, nth=nth), f"the run ended before writing {target} ({nth})"
        if nth == 2:  # the killed write changed nothing: checkpoint-last.pth is the complete one before it
            state = load_file(last)
            assert (state["epoch"], state["iter"]) == (0, 2)
    assert not (out / "encoder-resnet18.pth").exists()  # the last kill cut the final export short
    proc = subprocess.run(command(images, out, *common, extra=("--resume", "auto")), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "removed" in proc.stdout and "left by an interrupted write" in proc.stdout
    wrote = [line for line in proc.stdout.splitlines() if "wrote the outputs due after epoch 2 that were" in line]
    assert len(wrote) == 1 and "encoder-resnet18.pth" in wrote[0], proc.stdout[-2000:]
    assert temporaries(out) == []
    assert losses(out) == losses(straight)  # each iteration once, bit-exact: resume is exact
    for name in ("encoder-resnet18.pth", "reconstruction-epoch002.png", "checkpoint-last.pth"):
        assert (out / name).is_file(), name
    resumed, uninterrupted = load_file(out / "encoder-resnet18.pth"), load_file(straight / "encoder-resnet18.pth")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert not (out / ".spark-det.lock").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_last_checkpoint_falls_back_to_the_one_before(images, straight, tmp_path, damage, capsys):
    out = tmp_path / "run"
    assert pretrain(images, out, *TINY, "stop_after_iters=3") == 0
    last = out / "checkpoint-last.pth"
    assert (out / "checkpoint-epoch0000-iter000002.pth").is_file()  # keep_checkpoints=2 by default
    data = last.read_bytes()
    last.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": os.urandom(4096)}[damage])
    capsys.readouterr()
    assert pretrain(images, out, *TINY, extra=("--resume", "auto")) == 0
    log = capsys.readouterr().out
    assert "cannot resume from checkpoint-last.pth" in log
    assert "falling back to the older checkpoint checkpoint-epoch0000-iter000002.pth" in log
    assert losses(out) == losses(straight)  # both made in this process: bit-exact
    assert (out / "checkpoint-last.pth.unreadable").is_file()  # set aside, not deleted


def test_no_readable_checkpoint_at_all_is_one_error_line(images, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(images, out, *TINY, "stop_after_iters=2") == 0
    for path in out.glob("checkpoint-*.pth"):
        path.write_bytes(b"")
    capsys.readouterr()
    assert pretrain(images, out, *TINY, extra=("--resume", "auto")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "no checkpoint in" in line and "can be read" in line and "weights_only=False" not in line


def test_a_diverging_run_keeps_finite_checkpoints_and_its_advice_leads_to_a_finished_run(images, tmp_path, capsys):
    out = tmp_path / "run"
    diverging = ("lr=30", "clip_grad=0", "epochs=3", "warmup_epochs=2")
    assert pretrain(images, out, *TINY, *diverging) == 3
    line = one_error_line(capsys.readouterr().err)
    assert "training diverged: loss is" in line and "above max_loss" in line
    for path in out.glob("checkpoint-*.pth"):
        state = load_file(path)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), path
    # Unchanged, a deterministic run diverges at the same iteration again: refused, with the way out.
    assert pretrain(images, out, *TINY, *diverging, extra=("--resume", "auto")) == 2
    assert "resuming unchanged diverges again" in one_error_line(capsys.readouterr().err)
    # The advice: resume from the earliest kept checkpoint with the suggested lr and warm-up.
    for _ in range(3):
        advice = line.split("e.g. --resume ", 1)[1].split()
        checkpoint, suggested = advice[0], advice[1:]
        assert Path(checkpoint).is_file() and suggested[0].startswith("lr=")
        code = pretrain(images, out, *TINY, *diverging, *suggested, extra=("--resume", checkpoint))
        if code == 0:
            break
        assert code == 3
        new_line = one_error_line(capsys.readouterr().err)
        assert new_line != line  # never the identical failure
        line = new_line
    assert code == 0
    assert (out / "encoder-test_resnet.pth").is_file() and not (out / "diverged.json").exists()
    assert list(out.glob("abandoned-*/checkpoint-last.pth"))  # the diverged trajectory's newest, set aside


def diverged_at(line: str) -> tuple[int, int]:
    words = line.split(" at epoch ", 1)[1].split()
    return int(words[0]), int(words[2])


def test_only_checkpoints_confirmed_by_a_finite_loss_are_advised_and_the_advice_works_literally(images, tmp_path,
                                                                                                 capsys):
    # lr=1e6: step 0 makes finite weights of magnitude ~1e6, checkpointed at iteration 1, whose loss is ~1e11.
    assert pretrain(images, tmp_path / "run", *TINY, "lr=1e6") == 3
    line = one_error_line(capsys.readouterr().err)
    assert diverged_at(line) == (0, 1)
    assert "no kept checkpoint is confirmed good" in line and "--resume" not in line
    state = load_file(tmp_path / "run" / "checkpoint-last.pth")  # kept: its weights are finite, just not good
    assert (state["epoch"], state["iter"]) == (0, 1)
    advice = line.split("e.g. ", 1)[1].split()
    assert advice[0] == "--output"  # this folder holds a run: a new run goes elsewhere
    # Followed literally round after round (each round's arguments added to the last: later ones win), the run
    # finishes, and a checkpoint the advice names is never one that diverges at once when resumed.
    args, resumed_at = ["lr=1e6", *advice], None
    for _ in range(8):
        code = pretrain(images, tmp_path / "run", *TINY, *args)
        if code == 0:
            break
        assert code == 3
        line = one_error_line(capsys.readouterr().err)
        if resumed_at is not None:
            assert diverged_at(line) > resumed_at
        advice = line.split("e.g. ", 1)[1].split()
        assert advice[0] == "--resume" or not Path(advice[1]).exists()  # a new run's folder is free
        args += advice
        state = load_file(advice[1]) if advice[0] == "--resume" else None
        resumed_at = (state["epoch"], state["iter"]) if state else None
    assert code == 0


@pytest.mark.parametrize("case", ["unreadable_only", "empty", "missing"])
def test_bad_data_folders_fail_before_anything_is_written(tmp_path, case, capsys):
    data = tmp_path / "data"
    if case != "missing":
        data.mkdir()
    if case == "unreadable_only":
        for i in range(9):
            (data / f"broken{i}.jpg").write_bytes(b"not a jpeg" * i)
    out = tmp_path / "run"
    assert pretrain(data, out, *TINY) == 2
    line = one_error_line(capsys.readouterr().err)
    expected = {"unreadable_only": "none of the 9 images sampled from", "empty": "no images found",
                "missing": "does not exist"}[case]
    assert expected in line
    assert not out.exists()


def test_a_new_run_refuses_to_overwrite_a_run_folder(images, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(images, out, *TINY, "stop_after_iters=1") == 0
    before = (out / "checkpoint-last.pth").read_bytes()
    capsys.readouterr()
    assert pretrain(images, out, *TINY) == 2
    assert "already holds a run" in one_error_line(capsys.readouterr().err)
    assert (out / "checkpoint-last.pth").read_bytes() == before


def test_two_runs_on_one_folder_the_second_is_refused_until_the_first_is_gone(images, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(command(images, out, *TINY, "epochs=200"), cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "metrics.jsonl").exists():
            time.sleep(0.05)
        second = subprocess.run(command(images, out, *TINY, "epochs=200", extra=("--resume", "auto")), cwd=ROOT,
                                env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 5, second.stderr
        line = one_error_line(second.stderr)
        assert f"in use by another spark-det run (pid {first.pid} on" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The first run died without releasing its lock: the next run recognises that and takes over.
    third = subprocess.run(command(images, out, *TINY, "epochs=200", "stop_after_iters=2",
                                   extra=("--resume", "auto")), cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0, third.stderr
    assert f"took over the lock of a run that is no longer alive (pid {first.pid}" in third.stdout
    positions = [(r["epoch"], r["iter"]) for r in records(out)]
    assert positions == sorted(set(positions))  # rewound to the checkpoint: each iteration logged once


class _RunsCode:
    """A pickle that would create a file if it were ever unpickled with code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_file_that_would_run_code_is_refused_by_every_tool(images, tmp_path, capsys):
    from spark_det.cli import convert as convert_cli
    from spark_det.cli import visualize as visualize_cli

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _RunsCode(marker), "epoch": 0, "iter": 0, "rng": [],
                "optimizer": {}, "config": {}}, evil)
    calls = [
        lambda: pretrain(images, tmp_path / "a", *TINY, extra=("--resume", str(evil))),
        lambda: pretrain(images, tmp_path / "b", *TINY, extra=("--init-weights", str(evil))),
        lambda: convert_cli.main([str(evil), "--to", "mmdet", "--output", str(tmp_path / "x.pth")]),
        lambda: visualize_cli.main([str(evil), str(images), "--output", str(tmp_path / "x.png")]),
    ]
    for call in calls:
        assert call() == 1
        line = one_error_line(capsys.readouterr().err)
        assert "holds pickled Python objects" in line and "never runs code" in line
        assert "weights_only=False" not in line and "weights_only` set to `False" not in line
    assert not marker.exists()


def test_visualize_skips_unreadable_images_and_refuses_a_folder_of_them(images, straight, tmp_path, capsys):
    from spark_det.cli import visualize as visualize_cli

    data = tmp_path / "mixed"
    shutil.copytree(images, data)
    (data / "+broken.jpg").write_bytes(b"not a jpeg")  # sorts first
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert visualize_cli.main([str(straight / "checkpoint-last.pth"), str(data), "--num-images", "2",
                                   "--output", str(tmp_path / "grid.png")]) == 0
    assert "(2 images" in capsys.readouterr().out
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG garbage")
    with pytest.warns(UserWarning):
        assert visualize_cli.main([str(straight / "checkpoint-last.pth"), str(broken), "--output",
                                   str(tmp_path / "g2.png")]) == 2
    assert "none of the images in" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "data-workers"])
def test_an_unreadable_image_is_one_warning_line_not_a_python_warning(images, tmp_path, workers):
    data = tmp_path / "mixed"
    shutil.copytree(images, data)
    (data / "broken.png").write_bytes(b"\x89PNG garbage")
    proc = subprocess.run(command(data, tmp_path / "run", *TINY, "epochs=1", f"num_workers={workers}"), cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    about_it = [line for line in proc.stderr.splitlines() if "broken.png" in line]
    assert about_it and all(line.startswith("[data] warning: skipping unreadable image ") for line in about_it)
    assert "UserWarning" not in proc.stderr and "Traceback" not in proc.stderr


def _user_namespace_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d"],
                           capture_output=True)
    return probe.returncode == 0


# A real file system that fills up or is read-only: a size-limited tmpfs mounted in a user namespace
# (no root needed). Where the kernel forbids user namespaces the test is skipped rather than faked:
# an injected OSError would not show how torch.save reports a real full disk.
needs_tmpfs = pytest.mark.skipif(shutil.which("unshare") is None or not _user_namespace_tmpfs(),
                                 reason="cannot mount a tmpfs in a user namespace here")


def in_tmpfs(size: str, script: str) -> subprocess.CompletedProcess:
    """``script`` (sh) with $MNT a fresh tmpfs of ``size``; the tmpfs vanishes when it ends."""
    mount = f"MNT=$(mktemp -d) && mount -t tmpfs -o size={size} tmpfs $MNT && {script}"
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)


def shell(args) -> str:
    """A command line for sh; the output folder is written "$MNT/run" so sh expands it."""
    return " ".join('"$MNT/run"' if a == "MNT_RUN" else f"'{a}'" for a in args)


@needs_tmpfs
def test_a_full_disk_is_one_line_with_exit_4_and_after_freeing_space_the_run_resumes(images, straight_subprocess,
                                                                                      tmp_path):
    # 24 MB with 12 MB taken by other files: two 5 MB checkpoints fit, the third write does not.
    run = shell(command(images, "MNT_RUN", *TINY))
    resume = shell(command(images, "MNT_RUN", *TINY, extra=("--resume", "auto")))
    proc = in_tmpfs("24m", f"""dd if=/dev/zero of="$MNT/other" bs=1M count=12 2>/dev/null
        {run}; echo EXIT=$?; ls -a "$MNT/run" > '{tmp_path}/left'; cp "$MNT/run/checkpoint-last.pth" '{tmp_path}/'
        rm "$MNT/other"; {resume}; echo RESUMED=$?; cp "$MNT/run/metrics.jsonl" '{tmp_path}/'""")
    assert "EXIT=4" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = one_error_line(proc.stderr)  # the resumed run prints no error
    assert "No space left on device" in line and "MiB free there" in line and "unexpected pos" not in line
    assert "the previous checkpoint-last.pth is intact" in line
    # The failed write changed nothing: checkpoint-last.pth is the one before it, the one before that is kept.
    left = (tmp_path / "left").read_text().split()
    assert "checkpoint-epoch0000-iter000001.pth" in left and not [name for name in left if name.endswith(".tmp")]
    kept = load_file(tmp_path / "checkpoint-last.pth")
    assert (kept["epoch"], kept["iter"]) == (0, 2)
    assert "RESUMED=0" in proc.stdout
    # Each iteration once, bit-exact: made as the uninterrupted run was (a subprocess, one thread).
    assert losses(tmp_path) == losses(straight_subprocess)


@needs_tmpfs
def test_a_read_only_output_is_one_line_with_exit_4(images):
    proc = in_tmpfs("4m", f"mount -o remount,ro $MNT && {shell(command(images, 'MNT_RUN', *TINY))}; echo EXIT=$?")
    assert "EXIT=4" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = one_error_line(proc.stderr)
    assert "Read-only file system" in line and "/run" in line

"""Pretraining as clusters run it: other process counts on resume, two nodes, SLURM, elastic restarts, SIGTERM.

Every run here is the real tool under torchrun (gloo on CPU) or under SLURM's variables, compared
with an uninterrupted run that has the same global batch, made as a subprocess with one thread like
every run here. Runs made the same way (same process count, same threads) must agree bit for bit,
an interruption and resume included. Across process counts the order of gloo's reductions changes
the rounding: losses agree to 1e-4; where accumulation replaces processes the BatchNorm statistics
of a forward cover fewer images, so there the bound is 1e-3. Every subprocess has a timeout: nothing
can hang.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ports import free_port

from spark_det.cli import pretrain as pretrain_cli

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "pretrain" / "resnet18_smoke.yaml")
TINY = ("model=test_resnet", "input_size=[64,64]", "decoder_width=32", "batch_size=8", "epochs=2", "vis_images=0",
        "warmup_epochs=1", "save_every_iters=1", "drop_path_rate=0", "dist_timeout_s=60")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(unlabeled_images):
    return unlabeled_images(32)


@pytest.fixture(scope="module")
def straight(images, tmp_path_factory):
    """One uninterrupted process, made as the runs it is compared with are (a subprocess, one thread)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_processes(1, *tool_args(images, out, resume=False))
    return out


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(out, straight, rel=1e-4, exact_first=None):
    """Each iteration once, with the reference's losses: bit-exact for the first ``exact_first``
    iterations (all with ``rel=0``: runs made the same way), within ``rel`` for the rest."""
    mine, reference = records(out), records(straight)
    assert [(r["epoch"], r["iter"]) for r in mine] == [(r["epoch"], r["iter"]) for r in reference]  # each once
    exact = len(reference) if rel == 0 else exact_first or 0
    assert [r["loss"] for r in mine[:exact]] == [r["loss"] for r in reference[:exact]]
    assert [r["loss"] for r in mine] == pytest.approx([r["loss"] for r in reference], rel=rel)
    assert (Path(out) / "encoder-test_resnet.pth").is_file()




def env(**extra):
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK") and
            not k.startswith("SLURM_")}
    return {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def tool_args(images, out, *overrides, resume=True):
    return ["--recipe", RECIPE, "--data", str(images), "--output", str(out), "--device", "cpu", *TINY, *overrides,
            *(["--resume", "auto"] if resume else [])]


def torchrun(nproc, *args, launcher=(), timeout=300, check=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *launcher]
    if not launcher:
        cmd += ["--master_port", str(free_port())]
    proc = subprocess.run([*cmd, "-m", "spark_det", "pretrain", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def run_processes(nproc, *args, accum=1, stop=None):
    """``nproc`` processes (1: a plain process) of the tool, optionally stopped after ``stop`` iterations."""
    extra = [f"accum_steps={accum}"] + ([f"stop_after_iters={stop}"] if stop else [])
    if nproc == 1:
        proc = subprocess.run([sys.executable, "-m", "spark_det", "pretrain", *args, *extra], cwd=ROOT, env=env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc
    return torchrun(nproc, *args, *extra)


@pytest.mark.parametrize("before,after", [((1, 1), (2, 1)), ((2, 1), (1, 1)), ((2, 1), (1, 2))],
                         ids=["1to2", "2to1", "2procs_to_1proc_accum2"])
def test_a_run_resumes_on_another_process_count_with_the_same_losses(images, straight, tmp_path, before, after):
    out = tmp_path / "run"
    run_processes(before[0], *tool_args(images, out), accum=before[1], stop=3)
    resumed = run_processes(after[0], *tool_args(images, out), accum=after[1])
    if before[0] != after[0]:
        assert "per-rank RNG states (drop path) re-derived" in resumed.stdout
    # the iterations before the stop were made as the straight run was when that was one process
    assert_same_run(out, straight, rel=1e-3 if after[1] != before[1] else 1e-4, exact_first=3 if before[0] == 1 else 0)


def test_a_changed_global_batch_on_resume_is_one_error_line(images, tmp_path):
    out = tmp_path / "run"
    run_processes(1, *tool_args(images, out), stop=2)
    proc = subprocess.run([sys.executable, "-m", "spark_det", "pretrain", *tool_args(images, out), "batch_size=16"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "was trained with batch_size=8, this run has 16" in proc.stderr


def together(commands_and_envs, timeout=300):
    """Start the processes at once (the ranks of one job), wait for all; [(returncode, stdout, stderr)]."""
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for cmd, environment in commands_and_envs]
    try:
        outputs = [proc.communicate(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    return [(proc.returncode, *output) for proc, output in zip(procs, outputs)]


def slurm_task(rank, port):
    return env(SLURM_NTASKS="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port))


def test_two_torchrun_agents_on_one_host_train_like_one_process(images, straight, tmp_path):
    out, port = tmp_path / "run", free_port()
    results = together([([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                          "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
                          "-m", "spark_det", "pretrain", *tool_args(images, out, resume=False)], env())
                        for node in (0, 1)])
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert "2 process(es)" in results[0][1] and results[1][1].strip() == ""  # rank 1 (node 1) writes nothing
    assert_same_run(out, straight)


def two_nodes(images, outputs, logs, timeout=240):
    """Two torchrun agents (one process each) as two nodes would run them, node i writing to
    ``outputs[i]``; their output goes to files (a pipe nobody drains would block the workers).
    Returns [(exit code, output)] per node."""
    port, procs = free_port(), []
    for node, (out, log) in enumerate(zip(outputs, logs)):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
                 "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "spark_det",
                 "pretrain", *tool_args(images, out)], cwd=ROOT, env=env(), stdout=f, stderr=subprocess.STDOUT))
    try:
        codes = [proc.wait(timeout=timeout) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    return [(code, Path(log).read_text()) for code, log in zip(codes, logs)]


@pytest.mark.parametrize("case", ["folder_not_shared", "fallback_on_one_node"])
def test_ranks_that_would_resume_from_different_checkpoints_stop_together_with_one_line(images, tmp_path, case):
    shared = tmp_path / "node0"
    assert pretrain_cli.main([*tool_args(images, shared), "stop_after_iters=3"]) == 0
    other = tmp_path / "node1"  # what node 1 sees at the same path on its own disk
    if case == "fallback_on_one_node":  # a copy whose newest checkpoint is damaged: node 1 falls back alone
        shutil.copytree(shared, other)
        (other / "checkpoint-last.pth").write_bytes(b"")
    before = {p.name: p.read_bytes() for p in shared.iterdir() if p.is_file()}
    results = two_nodes(images, [shared, other], [tmp_path / "node0.log", tmp_path / "node1.log"])
    text = results[0][1] + results[1][1]
    assert [code != 0 for code, _ in results] == [True, True], text[-3000:]
    lines = [line for line in text.splitlines() if "error: " in line]
    assert len(lines) == 1 and "the ranks would resume from different checkpoints" in lines[0], text[-3000:]
    expected = "rank 1 from scratch" if case == "folder_not_shared" else "epoch 0 iteration 2"
    assert "rank 0 from " in lines[0] and "epoch 0 iteration 3" in lines[0] and expected in lines[0]
    assert {p.name: p.read_bytes() for p in shared.iterdir() if p.is_file()} == before  # not a step was taken


def test_srun_without_torchrun_reads_the_slurm_variables(images, straight, tmp_path):
    # and each task has a node-local cache: rank 0 indexes the data, rank 1 receives the index
    out, port, caches = tmp_path / "run", free_port(), [tmp_path / "cache0", tmp_path / "cache1"]
    results = together([([sys.executable, "-m", "spark_det", "pretrain", *tool_args(images, out, resume=False)],
                         {**slurm_task(rank, port), "SPARK_DET_CACHE": str(caches[rank])}) for rank in (0, 1)])
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert "2 process(es)" in results[0][1] and "sent the index to 1 rank(s)" in results[0][1]
    built = [sorted(p.read_bytes() for p in cache.glob("data-index/*/*/names.bin")) for cache in caches]
    assert built[0] and built[0] == built[1]
    assert_same_run(out, straight)


@pytest.fixture(scope="module")
def shards(images, tmp_path_factory):
    from spark_det.data.packing import pack_shards

    prefix = tmp_path_factory.mktemp("shards") / "train"
    count = len(pack_shards(str(images), str(prefix), shard_size=4, log=lambda _: None))
    return f"{prefix}-{{000000..{count - 1:06d}}}.tar"


def test_shards_on_two_processes_with_two_workers_each_stop_and_resume_exactly(shards, tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "run"
    run_processes(2, *tool_args(shards, straight, "num_workers=2", resume=False))
    run_processes(2, *tool_args(shards, out, "num_workers=2"), stop=3)
    resumed = run_processes(2, *tool_args(shards, out, "num_workers=2"))
    assert "continues approximately" not in resumed.stdout
    assert_same_run(out, straight, rel=0)  # two processes both times: bit-exact
    other = tmp_path / "other"  # resumed on one process: the documented approximation, and the run completes
    run_processes(2, *tool_args(shards, other, "num_workers=2"), stop=3)
    proc = run_processes(1, *tool_args(shards, other, "num_workers=2"))
    assert "continues approximately" in proc.stdout
    assert [(r["epoch"], r["iter"]) for r in records(other)] == [(r["epoch"], r["iter"]) for r in records(straight)]


def test_ranks_launched_with_different_overrides_stop_with_one_line(images, tmp_path):
    out, port = tmp_path / "run", free_port()
    results = together([([sys.executable, "-m", "spark_det", "pretrain", *tool_args(images, out, resume=False),
                          f"lr={lr}"], slurm_task(rank, port)) for rank, lr in ((0, 1e-3), (1, 2e-3))])
    assert [code for code, _, _ in results] == [2, 2]
    errors = results[0][2] + results[1][2]
    assert "Traceback" not in errors and errors.count("error: ") == 1
    assert "rank 1 was launched differently from rank 0 (differs in lr)" in errors
    assert not out.exists()


def _workers(agent_pid):
    out = subprocess.run(["ps", "--ppid", str(agent_pid), "-o", "pid="], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def test_an_elastic_restart_after_a_killed_worker_loses_and_repeats_nothing(images, straight, tmp_path):
    out = tmp_path / "run"
    # torch's own restart on gloo sometimes fails to connect (pytorch issue 167288): a short
    # dist_timeout_s ends such an attempt in seconds, and the restart budget absorbs it.
    launcher = ["--max-restarts", "8", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *launcher,
                              "-m", "spark_det", "pretrain", *tool_args(images, out), "dist_timeout_s=15"], cwd=ROOT,
                             env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and agent.poll() is None:
            if (out / "metrics.jsonl").is_file() and len(records(out)) >= 3:
                break
            time.sleep(0.02)
        workers = _workers(agent.pid)
        assert len(workers) == 2, "torchrun's workers not found"
        os.kill(workers[-1], signal.SIGKILL)
        stdout, stderr = agent.communicate(timeout=400)
    finally:
        agent.kill()
    assert agent.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "resumed from" in stdout
    assert_same_run(out, straight)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_143(images, straight, tmp_path):
    out = tmp_path / "run"
    # Like a scheduler, signal the whole process group: the data workers (num_workers=2) get it too.
    proc = subprocess.Popen([sys.executable, "-m", "spark_det", "pretrain", *tool_args(images, out, resume=False),
                             "save_every_iters=0", "num_workers=2"], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and len(records(out)) >= 2):
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and stderr.count("error: ") == 1 and "error: SIGTERM: stopped after" in stderr
    logged = len(records(out))
    run_processes(1, *tool_args(images, out), "save_every_iters=0")
    assert_same_run(out, straight, rel=0)  # one process both times: bit-exact
    # the checkpoint was written at the step SIGTERM interrupted: nothing before it was redone
    assert logged >= 2


def test_divergence_under_torchrun_stops_every_rank_with_one_line(images, tmp_path):
    out = tmp_path / "run"
    proc = torchrun(2, *tool_args(images, out, resume=False), "lr=30", "clip_grad=0", "epochs=3", "warmup_epochs=2",
                    check=False)
    assert proc.returncode != 0
    assert proc.stderr.count("error: ") == 1 and "error: training diverged: loss is" in proc.stderr
    assert (out / "diverged.json").is_file() and not (out / ".spark-det.lock").exists()

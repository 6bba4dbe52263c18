"""torchrun (mtt.distributed): the group outlasts rank 0's long work and ends with the run. Two real gloo processes."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def torchrun(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    """`script` run by two processes under torchrun (--standalone: on a free port); it must succeed."""
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", str(path)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return done


def test_ranks_wait_for_rank_0_longer_than_torchs_default_timeout(tmp_path):
    """The others wait at the next all_reduce while rank 0 evaluates, which can take longer than torch's default
    timeout (10 minutes for nccl, 30 for gloo; shortened here to 2 s, against rank 0's 5 s of work)."""
    done = torchrun(tmp_path, """
        import datetime, os, time
        import torch
        import torch.distributed.distributed_c10d as c10d
        c10d.default_pg_timeout = datetime.timedelta(seconds=2)
        from mtt.distributed import ranks

        with ranks(torch.device("cpu")) as procs:
            if procs.is_main:
                time.sleep(5)
            summed = torch.ones(3)
            procs.sum_(summed)
        os.write(1, f"summed: {summed.tolist()}\\n".encode())  # one write: the ranks share the pipe
    """)
    assert done.stdout.splitlines().count("summed: [2.0, 2.0, 2.0]") == 2, done.stdout


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts the process's threads in /proc")
def test_the_process_group_and_its_threads_end_with_ranks(tmp_path):
    """torch._dynamo, first imported while the group runs (the backward walk's torch.func.vjp does), must not keep
    the group alive past ranks(): its gloo worker threads, left to the interpreter's exit, aborted about 1 torchrun
    distillation in 15 after everything was saved."""
    done = torchrun(tmp_path, """
        import os
        import torch
        from mtt.distributed import ranks

        with ranks(torch.device("cpu")) as procs:
            procs.sum_(torch.ones(3))
            import torch._dynamo  # noqa: F401
        threads = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
        os.write(1, f"gloo threads left: {sum('gloo' in name for name in threads)}\\n".encode())  # one write
    """)
    assert done.stdout.splitlines().count("gloo threads left: 0") == 2, done.stdout


def test_more_processes_than_gpus_is_one_clear_error(monkeypatch):
    """torchrun --nproc_per_node=4 on a machine with 2 GPUs: rank 2 has no GPU of its own (checked before CUDA
    is touched, so it runs here without one)."""
    import torch

    from mtt.distributed import ranks
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"torchrun started 4 processes on this machine, which has 2 GPU\(s\).*"
                                         r"--nproc_per_node=2"):
        with ranks(torch.device("cuda")):
            pass


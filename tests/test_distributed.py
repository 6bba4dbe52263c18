"""torchrun support (mtt.distributed): the process group ends with the run. Real torchrun, two gloo processes."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts the process's threads in /proc")
def test_the_process_group_and_its_threads_end_with_ranks(tmp_path):
    """torch._dynamo, first imported while the group runs (the backward walk's torch.func.vjp does), must not keep
    the group alive past ranks(): its gloo worker threads, left to the interpreter's exit, aborted about 1 torchrun
    distillation in 15 after everything was saved."""
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent("""
        import os
        import torch
        from mtt.distributed import ranks

        with ranks(torch.device("cpu")) as procs:
            procs.sum_(torch.ones(3))
            import torch._dynamo  # noqa: F401
        threads = [open(f"/proc/self/task/{t}/comm").read() for t in os.listdir("/proc/self/task")]
        print("gloo threads left:", sum("gloo" in name for name in threads))
    """))
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, str(script)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines().count("gloo threads left: 0") == 2, done.stdout

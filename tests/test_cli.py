"""`python -m mtt` as a user meets it: bad input, interruption, resume, original buffers. Real subprocesses."""
import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import mtt.io as mtt_io
from mtt.cli import build_parser, distill_config
from mtt.data import load_dataset
from mtt.distill import DistillConfig, preset
from mtt.experts import ExpertConfig, train_experts
from mtt.io import LOCK, held_folder
from mtt.networks import get_network
from mtt.synthetic import SyntheticSet

WIDTH = 16
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV = os.environ | {"OMP_NUM_THREADS": "1", "COLUMNS": "200"}  # tiny networks: threads only add contention


def mtt(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtt", *map(str, args)], capture_output=True, text=True, env=ENV,
                          **kw)


def start(*args) -> subprocess.Popen:
    # SIGINT as a terminal delivers it: a suite started in the background (`cmd &` in a script) ignores SIGINT,
    # children inherit that, and Python then keeps ignoring it instead of raising KeyboardInterrupt.
    return subprocess.Popen([sys.executable, "-m", "mtt", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def the_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one `error:` line of a failed command, after checking the exit code and that no trace was printed."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    train_experts(load_dataset("digits"), ExpertConfig(num_experts=2, epochs=4, width=WIDTH), out, device="cpu",
                  progress=False)
    return out


def distill_args(experts, out, *extra):
    return ["distill", "--dataset", "digits", "--ipc", 1, "--buffers", experts, "--out", out, "--preset", "none",
            "--syn-steps", 5, "--expert-epochs", 2, "--max-start-epoch", 2, "--lr-img", 10, "--eval-repeats", 0,
            "--backward", "checkpointed", "--device", "cpu", "--no-progress", *extra]  # one mode: runs are compared


# ----------------------------------------------------------------------------- bad flags

def test_the_original_codes_flags_are_said_as_named_here():
    error = the_error(mtt("distill", "--dataset", "digits", "--ipc", 1, "--buffers", "x", "--out", "x", "--syn_steps",
                          3, "--Iteration=2", "--no_such_flag", 1))
    assert error.endswith("; as the original code's flags are named here: --syn_steps is --syn-steps, --Iteration is "
                          "--iterations (see python -m mtt --help)")


@pytest.mark.parametrize("args,flag", [
    (["experts", "--dataset", "digits", "--out", "x", "--epochs", 0], "--epochs"),
    (["experts", "--dataset", "digits", "--out", "x", "--batch-size", 0], "--batch-size"),
    (["experts", "--dataset", "digits", "--out", "x", "--num-experts", 0], "--num-experts"),
    (["experts", "--dataset", "digits", "--out", "x", "--train-per-class", -5], "--train-per-class"),
    (["experts", "--dataset", "digits", "--out", "x", "--train-per-class", 0], "--train-per-class"),
    (["experts", "--dataset", "digits", "--out", "x", "--lr", -0.1], "--lr"),
    (["experts", "--dataset", "digits", "--out", "x", "--parallel", "two"], "--parallel"),
    (["experts", "--dataset", "digits", "--out", "x", "--model", "ConvNetW32", "--width", 16],
     "ConvNetW32 has width 32, not 16: leave --width out, or use --model ConvNet --width 16"),
    (["experts", "--dataset", "digits", "--out", "x", "--model", "MLP", "--depth", 2],
     "--depth applies to the ConvNet family only, not MLP"),
    (["experts", "--dataset", "digits", "--out", "x", "--momentum", 1], "--momentum: must be in [0, 1)"),
    (["evaluate", "--synthetic", "x.safetensors", "--image-size", 0], "--image-size"),
    (["evaluate", "--synthetic", "x.safetensors", "--width", 0], "--width"),
    (["evaluate", "--synthetic", "x.safetensors", "--plot", "."], "--plot . is a folder"),
    (["evaluate", "--synthetic", "x.safetensors", "--plot", "x.xyz"], "--plot x.xyz: name the chart's format"),
    (["evaluate", "--synthetic", "."], "--synthetic: . is a folder without a synthetic.safetensors"),
    (["evaluate", "--synthetic", "hf://someone/sets/set.safetensors"], "hf:// addresses are for --buffers"),
    (["distill", "--dataset", "digits", "--ipc", 1, "--buffers", "b", "--out", "o", "--method", "datm",
      "--no-soft-labels"], "--label-init onehot"),
    (["distill", "--dataset", "digits", "--ipc", 0, "--buffers", "b", "--out", "o"], "--ipc"),
    (["distill", "--dataset", "digits", "--ipc", 1, "--buffers", "b", "--out", "o", "--lr-img", 0], "--lr-img"),
    (["distill", "--dataset", "digits", "--ipc", 1, "--buffers", "b", "--out", "o", "--backward", "exact"],
     "--backward"),
    (["distill", "--dataset", "digits", "--ipc", 3, "--buffers", "b", "--out", "o"], "--preset none"),
    (["distill", "--dataset", "digits", "--ipc", 1, "--buffers", "b", "--out", "o", "--lr-labels", 5],
     "--lr-labels acts only with --soft-labels"),
    (["distill", "--dataset", "digits", "--ipc", 1, "--buffers", "b", "--out", "o", "--expansion-end", 5],
     "--expansion-end acts only with --current-max-start-epoch"),
    (["distill", "--dataset", "digits", "--ipc", 1, "--buffers", "b", "--out", "o", "--model", "ConvNt"],
     "unknown network 'ConvNt': did you mean 'ConvNet'?"),
    (["evaluate", "--synthetic", "x.safetensors", "--epochs", 0], "--epochs"),
    (["baseline", "--dataset", "digits", "--method", "full", "--ipc", 5], "drop the ipc (5)"),
    (["distill", "--dataset", "digits", "--ipc", 1, "--buffers", "b", "--out", "o", "--preset", "cifar10"],
     "--preset"),
])
def test_a_bad_flag_is_one_error_line_naming_it(tmp_path, args, flag):
    assert flag in the_error(mtt(*args, cwd=tmp_path))
    assert not (tmp_path / "x").exists() and not (tmp_path / "o").exists()  # and nothing was started


@pytest.mark.parametrize("preset", ["paper", "none", "cifar10:10"])
def test_a_dataset_goes_by_its_canonical_name_whatever_the_preset(preset):
    """'CIFAR-10' is cifar10 on every path: the recipes' tables (DATM's) and the experts' metadata use that name."""
    args = ["distill", "--dataset", "CIFAR-10", "--ipc", 1, "--buffers", "b", "--out", "o", "--preset", preset,
            "--method", "datm"]
    config = distill_config(build_parser().parse_args(list(map(str, args))))
    assert (config.dataset, config.ipc) == ("cifar10", 1)
    # DATM's table found under cifar10 (at IPC 1 it has a loss threshold; the borrowed IPC 10 a growing window)
    assert config.loss_threshold == 1.1 if preset != "cifar10:10" else config.current_max_start_epoch == 10
    with pytest.raises(ValueError, match="unknown dataset 'CIFAR-11'"):
        distill_config(build_parser().parse_args(list(map(str, args[:2] + ["CIFAR-11"] + args[3:]))))


def test_max_experts_matches_the_first_ones_and_a_resume_keeps_them(experts, tmp_path):
    run = tmp_path / "run"
    assert mtt(*distill_args(experts, run, "--iterations", 1, "--max-experts", 1)).returncode == 0
    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["experts"])["experts"] == 1
    more = mtt(*distill_args(experts, run, "--iterations", 2, "--max-experts", 2, "--resume"))
    assert "it was distilled from other experts (1 ConvNet experts" in the_error(more)
    assert "it holds 2" in the_error(mtt(*distill_args(experts, tmp_path / "three", "--max-experts", 3)))


def test_distill_dsa_is_the_runs_strategy():
    args = ["distill", "--dataset", "digits", "--ipc", "1", "--buffers", "b", "--out", "o"]
    assert distill_config(build_parser().parse_args(args)).dsa == "color_crop_cutout_flip_scale_rotate"
    assert distill_config(build_parser().parse_args(args + ["--dsa", "none"])).dsa == "none"
    assert "unknown DSA op(s) ['twirl']" in the_error(mtt(*args, "--dsa", "crop_twirl"))


def test_original_zca_is_refused_for_an_mtt_set(tmp_path):
    SyntheticSet(torch.zeros(10, 1, 8, 8), torch.arange(10), 0.01, "digits").save(tmp_path / "set.safetensors")
    error = the_error(mtt("evaluate", "--synthetic", tmp_path / "set.safetensors", "--original-zca"))
    assert "--original-zca is for an original-MTT set (with --original-labels)" in error


def test_an_experts_shard_is_not_taken_for_a_synthetic_set(experts):
    shard = next(experts.glob("experts_*.safetensors"))
    assert "is a shard of expert trajectories, not a synthetic set" in the_error(mtt("evaluate", "--synthetic", shard))


def test_models_are_a_comma_separated_list_spaces_allowed():
    parse = build_parser().parse_args
    assert parse(["evaluate", "--synthetic", "s", "--models", "ConvNet, MLP,"]).models == ["ConvNet", "MLP"]
    assert parse(["baseline", "--dataset", "digits", "--ipc", "1"]).models == ["ConvNet"]


def test_help_shows_defaults():
    text = mtt("experts", "--help").stdout
    assert "(default: 50)" in text and "(default: 0.01)" in text and "(default: 0.0)" in text
    assert "default: the experts'" in mtt("distill", "--help").stdout


# ----------------------------------------------------------------------------- output folders, checked first

@pytest.mark.parametrize("command", [["experts", "--dataset", "digits", "--epochs", 1],
                                     ["demo"]])
def test_out_that_is_a_file_fails_before_any_work(tmp_path, command):
    (tmp_path / "taken").write_text("not a folder")
    started = time.monotonic()
    result = mtt(*command, "--out", tmp_path / "taken", "--device", "cpu", "--no-progress")
    assert "--out" in the_error(result) and "is an existing file" in the_error(result)
    assert time.monotonic() - started < 30  # failed at once, not after training


@pytest.mark.parametrize("command", [["experts", "--dataset", "no-such-dataset"],
                                     ["distill", "--dataset", "digits", "--ipc", 1, "--buffers", "nowhere"]])
def test_a_failed_command_leaves_no_empty_out_behind(tmp_path, command):
    the_error(mtt(*command, "--out", tmp_path / "new", "--device", "cpu"))
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a folder that was there before is the user's
    the_error(mtt(*command, "--out", tmp_path / "kept", "--device", "cpu"))
    assert (tmp_path / "kept").is_dir()


def test_a_failed_command_removes_the_empty_parents_it_made_too(tmp_path):
    the_error(mtt("experts", "--dataset", "no-such-dataset", "--out", tmp_path / "a" / "b" / "c"))
    the_error(mtt("baseline", "--dataset", "no-such-dataset", "--ipc", 1, "--plot", tmp_path / "d" / "e" / "x.png"))
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_fails_before_any_work(tmp_path):
    result = mtt("experts", "--dataset", "digits", "--epochs", 1, "--out", "/proc/mtt-experts", "--no-progress")
    assert "--out /proc/mtt-experts is not writable" in the_error(result)


def test_a_killed_runs_temporary_files_are_cleaned(tmp_path):
    out = tmp_path / "experts"
    out.mkdir()
    stale = out / ".experts_00000-00000.safetensors.k2j4.tmp"
    stale.write_bytes(b"half a shard")
    train_experts(load_dataset("digits").take_per_class(5), ExpertConfig(num_experts=1, epochs=1, width=WIDTH), out,
                  device="cpu", progress=False)
    assert not stale.exists() and (out / "experts_00000-00000.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["epochs"] == 1


def test_a_named_size_is_recorded_as_the_network_has_it(tmp_path):
    result = mtt("experts", "--dataset", "digits", "--model", "ConvNetW32", "--epochs", 1, "--num-experts", 1,
                 "--train-per-class", 5, "--out", tmp_path, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "config.json").read_text())["width"] == 32
    # mtt 0.1 recorded the default width for it: the folder still takes more experts (the shards hold the width).
    record = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(record | {"width": 128}))
    result = mtt("experts", "--dataset", "digits", "--model", "ConvNetW32", "--epochs", 1, "--num-experts", 2,
                 "--train-per-class", 5, "--out", tmp_path, "--no-progress")
    assert result.returncode == 0, result.stderr


def test_segments_default_to_the_number_of_processes_under_torchrun(experts, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distill_config(build_parser().parse_args(map(str, distill_args(experts, tmp_path)))).segments == 2
    given = distill_args(experts, tmp_path, "--segments", 4)
    assert distill_config(build_parser().parse_args(map(str, given))).segments == 4


def test_a_folder_being_written_is_refused_and_a_killed_runs_lock_is_taken_over(experts, tmp_path):
    """Two jobs into one --out (one started twice) would write duplicate experts or interleave a run's files."""
    out = tmp_path / "experts"
    with held_folder(out):  # this test process plays the run already going
        for args in [("experts", "--dataset", "digits", "--epochs", 1, "--width", WIDTH, "--out", out),
                     distill_args(experts, out, "--iterations", 1, "--log", "tensorboard")]:
            error = the_error(mtt(*args))
            assert error.startswith(f"error: {out} is being written by another run (process {os.getpid()} on "
                                    f"{socket.gethostname()}): let it finish, or use another --out. If no such run "
                                    f"is going on, delete {out / LOCK}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK]  # nothing written, no tracker's files either
        with held_folder(out):  # holding it again in the same process: the command line holds what distill holds
            pass
        assert (out / LOCK).exists()
    assert not (out / LOCK).exists()  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK).write_text(f"{socket.gethostname()} {int(dead.stdout)}")  # a run killed with its lock held
    train_experts(load_dataset("digits").take_per_class(5), ExpertConfig(num_experts=1, epochs=1, width=WIDTH), out,
                  device="cpu", progress=False)
    assert (out / "experts_00000-00000.safetensors").exists() and not (out / LOCK).exists()
    (out / LOCK).write_text("elsewhere.example 1")  # another machine's (a shared file system): alive while touched
    with pytest.raises(ValueError, match="process 1 on elsewhere.example"):
        with held_folder(out):
            pass
    long_ago = time.time() - mtt_io.LOCK_STALE_S - 1  # its holder stopped touching it: killed
    os.utime(out / LOCK, (long_ago, long_ago))
    with held_folder(out):
        assert (out / LOCK).read_text() == f"{socket.gethostname()} {os.getpid()}"


def test_a_held_folders_lock_is_touched_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(mtt_io, "LOCK_BEAT_S", 0.05)
    with held_folder(tmp_path):
        os.utime(tmp_path / LOCK, (0, 0))
        time.sleep(0.5)
        assert time.time() - (tmp_path / LOCK).stat().st_mtime < 5


def test_a_full_disk_is_one_line_naming_the_file_and_what_to_do(tmp_path, monkeypatch):
    """The system's ENOSPC, and safetensors' own error for it (a ~30-line traceback from the CLI before)."""
    from safetensors import SafetensorError

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    said = "no space left on the device. Free some, then run the command again \\(a distillation: with --resume\\)"
    with pytest.raises(OSError, match=f"cannot write {re.escape(str(tmp_path / 'history.json'))}: {said}"):
        mtt_io.atomic_write(tmp_path / "history.json", full)

    def safetensors_full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(mtt_io, "save_file", safetensors_full)
    with pytest.raises(OSError, match=f"checkpoint.safetensors: {said}"):
        mtt_io.atomic_save_safetensors({"x": torch.zeros(2)}, tmp_path / "checkpoint.safetensors")
    assert list(tmp_path.iterdir()) == []  # no temporaries left


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_lock_that_could_not_be_written_keeps_no_later_run_out(tmp_path, monkeypatch):
    """An empty lock (the disk full when it was made) kept every later run out for LOCK_STALE_S."""
    real = os.fdopen
    monkeypatch.setattr(mtt_io.os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode)))
    with pytest.raises(OSError, match=r"\.mtt\.lock: no space left on the device"):
        with held_folder(tmp_path):
            pass
    monkeypatch.undo()
    assert not (tmp_path / LOCK).exists()
    with held_folder(tmp_path):
        pass


def test_the_error_that_ended_a_run_is_not_hidden_by_its_lock(tmp_path, monkeypatch):
    """The folder turned read-only mid-run: the lock cannot be removed, and the error to see is the run's."""
    real_unlink = Path.unlink

    def read_only(self, missing_ok=False):
        if self.name == LOCK:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_unlink(self, missing_ok=missing_ok)

    with pytest.raises(OSError, match="cannot write the checkpoint \\(test\\)"):
        with held_folder(tmp_path):
            monkeypatch.setattr(Path, "unlink", read_only)
            raise OSError("cannot write the checkpoint (test)")


def test_a_folder_removed_while_held_is_said_so(tmp_path):
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="was removed or emptied while this run wrote into it"):
        with held_folder(out):
            shutil.rmtree(out)
            (out / "snapshots").mkdir(parents=True)  # the run goes on writing: its writes make the folder again


def test_a_killed_runs_temporaries_are_removed_from_its_snapshots_too(tmp_path):
    """...but not from a folder inside that another run holds, whose writes are in progress."""
    (tmp_path / "snapshots").mkdir()
    stale = [tmp_path / ".checkpoint.safetensors.ab12.tmp", tmp_path / "snapshots" / ".iter_000002.safetensors.x.tmp"]
    live = tmp_path / "other-run" / ".checkpoint.safetensors.cd34.tmp"
    for path in stale:
        path.write_bytes(b"half a file")
    with held_folder(tmp_path / "other-run"):
        live.write_bytes(b"a write in progress")
        with held_folder(tmp_path):  # the same process holds both here: what matters is the other's lock
            assert not any(path.exists() for path in stale) and live.exists()


def test_a_chart_that_cannot_be_saved_loses_no_results(tmp_path, monkeypatch, capsys):
    """The networks were trained (hours, at scale): their numbers are printed and returned (--json) all the same."""
    import mtt.viz
    from mtt.cli import main

    def full(*args, **kwargs):
        raise OSError(f"cannot write {tmp_path / 'chart.png'}: no space left on the device (test)")

    monkeypatch.setattr(mtt.viz, "cross_arch_bars", full)
    assert main(["baseline", "--dataset", "digits", "--ipc", "1", "--method", "random", "--epochs", "1",
                 "--repeats", "1", "--device", "cpu", "--no-progress", "--plot", str(tmp_path / "chart.png"),
                 "--json"]) == 0
    out, err = capsys.readouterr()
    assert "ConvNet" in json.loads(out.splitlines()[-1]) and "warning: no chart: cannot write" in err


# ----------------------------------------------------------------------------- distill: resume and its errors

def test_distill_prints_its_config_saves_it_and_says_where_results_are(experts, tmp_path):
    result = mtt(*distill_args(experts, tmp_path / "run", "--iterations", 2))
    assert result.returncode == 0, result.stderr
    first, last = result.stderr.splitlines()[0], result.stderr.splitlines()[-1]
    assert first.startswith("distill: dataset=digits, ipc=1, model=ConvNet, width=16, depth=3")  # width: the experts'
    assert last.startswith(f"saved: {tmp_path / 'run' / 'synthetic.safetensors'}")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["width"] == WIDTH


def test_resume_into_an_empty_folder_says_it_starts_afresh(experts, tmp_path):
    result = mtt(*distill_args(experts, tmp_path / "run", "--iterations", 1, "--resume"))
    assert result.returncode == 0, result.stderr
    assert "no checkpoint in" in result.stderr and "starting afresh" in result.stderr


def test_a_fresh_run_in_a_used_folder_names_resume(experts, tmp_path):
    assert mtt(*distill_args(experts, tmp_path, "--iterations", 1)).returncode == 0
    assert "add --resume" in the_error(mtt(*distill_args(experts, tmp_path, "--iterations", 1)))


def test_a_checkpoint_that_is_not_one(experts, tmp_path):
    (tmp_path / "checkpoint.safetensors").write_text(json.dumps({"iteration": 3}))
    message = the_error(mtt(*distill_args(experts, tmp_path, "--iterations", 1, "--resume")))
    assert "not a checkpoint mtt can read" in message and "to start afresh, choose another --out" in message


def test_resume_keeps_the_runs_settings_where_no_flag_is_given(experts, tmp_path):
    """`--resume --iterations N` extends the run as it was: the flags left out keep the run's values (here far
    from the digits preset's: 5 steps, lr_img 7, seed 3, checkpointed), not the preset's."""
    settings = ["--lr-img", 7, "--seed", 3]
    assert mtt(*distill_args(experts, tmp_path / "straight", "--iterations", 4, *settings)).returncode == 0
    assert mtt(*distill_args(experts, tmp_path / "run", "--iterations", 2, *settings)).returncode == 0
    resumed = mtt("distill", "--dataset", "digits", "--ipc", 1, "--buffers", experts, "--out", tmp_path / "run",
                  "--resume", "--iterations", 4, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at iteration 2 with settings other than the checkpoint's: iterations 2 -> 4\n" in resumed.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config == json.loads((tmp_path / "straight" / "config.json").read_text())
    assert (config["syn_steps"], config["lr_img"], config["seed"], config["backward"], config["device"]) == (
        5, 7, 3, "checkpointed", "cpu")
    a, b = (SyntheticSet.load(tmp_path / d / "synthetic.safetensors") for d in ("straight", "run"))
    assert torch.equal(a.images, b.images) and a.syn_lr == b.syn_lr


def test_resume_changes_what_is_given_and_refuses_another_method(experts, tmp_path):
    assert mtt(*distill_args(experts, tmp_path, "--iterations", 2)).returncode == 0
    base = ["distill", "--dataset", "digits", "--ipc", 1, "--buffers", experts, "--out", tmp_path, "--resume",
            "--device", "cpu", "--no-progress"]
    assert "follows --method mtt, not datm" in the_error(mtt(*base, "--method", "datm"))
    assert mtt(*base, "--iterations", 3, "--lr-img", 20, "--method", "mtt").returncode == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["changes"] == [{"iteration": 2, "changed": {"lr_img": [10, 20], "iterations": [2, 3]}}]


@pytest.mark.parametrize("flags,message", [
    (["--seed", 5], "--seed: checkpoint 0 vs now 5"),  # what made iteration 0 stays as it was recorded
    (["--init", "noise"], "--init: checkpoint 'real' vs now 'noise'"),
    (["--zca"], "--zca/--no-zca: checkpoint False vs now True"),  # named before the experts are opened
    (["--width", 32], "--width: checkpoint 16 vs now 32"),
    (["--lr-labels", 5], "--lr-labels acts only with --soft-labels, which this run does not use: drop --lr-labels"),
    (["--iterations", 1], "holds a run of 2 iterations, more than --iterations 1"),
])
def test_resume_refuses_what_cannot_change(experts, tmp_path, flags, message):
    assert mtt(*distill_args(experts, tmp_path, "--iterations", 2)).returncode == 0
    result = mtt("distill", "--dataset", "digits", "--ipc", 1, "--buffers", experts, "--out", tmp_path, "--resume",
                 *flags)
    assert message in the_error(result) and "resuming at" not in result.stderr


def test_resuming_with_other_experts_is_refused(experts, tmp_path):
    others = tmp_path / "others"
    train_experts(load_dataset("digits"), ExpertConfig(num_experts=2, epochs=4, width=WIDTH, seed=9), others,
                  device="cpu", progress=False)
    assert mtt(*distill_args(experts, tmp_path / "run", "--iterations", 2)).returncode == 0
    message = the_error(mtt(*distill_args(others, tmp_path / "run", "--iterations", 4, "--resume")))
    assert "other experts" in message and "--buffers" in message


def test_a_diverged_run_continues_with_the_advice_it_gives(experts, tmp_path):
    diverged = mtt(*distill_args(experts, tmp_path, "--iterations", 30, "--lr-lr", 1000))
    message = the_error(diverged)
    assert "diverged" in message and "--resume" in message and "--lr-lr (now 1000)" in message
    resumed = mtt(*distill_args(experts, tmp_path, "--iterations", 30, "--lr-lr", 1e-5, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    history = json.loads((tmp_path / "history.json").read_text())
    assert len(history["loss"]) == 30 and history["changes"][0]["changed"]["lr_lr"] == [1000, 1e-5]


# ----------------------------------------------------------------------------- interruption

def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def read_stderr_until(process: subprocess.Popen, pattern: str, timeout: float = 120) -> str:
    """What the process wrote to stderr up to the first match of `pattern` (and a little after)."""
    deadline, seen = time.monotonic() + timeout, b""
    while not re.search(pattern.encode(), seen):
        assert time.monotonic() < deadline, f"no {pattern!r} on stderr within {timeout} s: {seen!r}"
        chunk = os.read(process.stderr.fileno(), 4096)
        assert chunk, f"process ended before {pattern!r}: {process.communicate()}"
        seen += chunk
    return seen.decode()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_saves_a_checkpoint_and_resume_equals_an_uninterrupted_run(experts, tmp_path, sig):
    # 200 iterations (~35 ms each here): the signal, sent once iteration 5's snapshot is seen, must find the run
    # still going even when this process is slow to be scheduled (with 40, a busy machine once saw it finish first).
    args = ["--iterations", 200, "--checkpoint-every", 1000, "--snapshot-every", 5, "--seed", 4]
    assert mtt(*distill_args(experts, tmp_path / "straight", *args)).returncode == 0

    run = tmp_path / "interrupted"
    with_a_bar = [arg for arg in distill_args(experts, run, *args) if arg != "--no-progress"]
    process = start(*with_a_bar)
    wait_for(run / "snapshots" / "iter_000005.safetensors", process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().split("\n")[-1]  # a line of its own, not written after the progress bar's last \r
    assert last.startswith("interrupted at iteration ")
    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        stopped_at = int(f.metadata()["iteration"])
    assert 5 <= stopped_at < 200  # checkpoint_every is 1000: this checkpoint was written by the interrupt

    stopped = mtt("evaluate", "--synthetic", run, "--epochs", 2, "--repeats", 1, "--device", "cpu", "--no-progress")
    assert stopped.returncode == 0
    assert f"evaluating the set at iteration {stopped_at} of the run's 200" in stopped.stderr

    command = shlex.split(last.split("; continue with: ")[1])  # the command it prints is the one that continues
    assert command[:3] == ["python", "-m", "mtt"] and command[-1] == "--resume"
    resumed = mtt(*command[3:])
    assert resumed.returncode == 0, resumed.stderr
    a = SyntheticSet.load(tmp_path / "straight" / "synthetic.safetensors")
    b = SyntheticSet.load(run / "synthetic.safetensors")
    assert torch.equal(a.images, b.images) and a.syn_lr == b.syn_lr
    losses = [json.loads((tmp_path / d / "history.json").read_text())["loss"] for d in ("straight", "interrupted")]
    assert losses[0] == losses[1]


def test_ctrl_c_during_expert_training_keeps_the_finished_experts(tmp_path):
    out = tmp_path / "experts"
    process = start("experts", "--dataset", "digits", "--num-experts", 3, "--epochs", 30, "--width", WIDTH,
                    "--out", out, "--device", "cpu", "--no-progress")
    wait_for(out / "experts_00000-00000.safetensors", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "experts are finished and kept" in last
    finished = int(last.split("interrupted: ")[1].split(" of 3")[0])
    assert 1 <= finished < 3 and len(json.loads((out / "index.json").read_text())["shards"]) == finished
    again = mtt("experts", "--dataset", "digits", "--num-experts", 3, "--epochs", 30, "--width", WIDTH, "--out", out,
                "--device", "cpu", "--no-progress", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["trained"] == 3 - finished


def test_ctrl_c_during_evaluation_stops_cleanly(experts, tmp_path):
    assert mtt(*distill_args(experts, tmp_path, "--iterations", 1)).returncode == 0
    process = start("evaluate", "--synthetic", tmp_path / "synthetic.safetensors", "--epochs", 100000,
                    "--device", "cpu")
    # Its progress bar showing a rate: training under way (its first draw, "?pass/s", comes while the
    # bar is still being set up, and a fixed sleep fires during start-up when the machine is busy).
    started = read_stderr_until(process, r"[0-9]pass/s")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    stderr = started + stderr
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: evaluate stopped")


# ----------------------------------------------------------------------------- original MTT buffers

def write_original_buffers(folder: Path, experts: int = 2, epochs: int = 3) -> None:
    """replay_buffer_0.pt as the original buffer.py writes it: experts trained on real Fashion-MNIST images,
    each a list of per-epoch lists of parameter tensors (ConvNet-16, .parameters() order)."""
    dataset = load_dataset("fashion-mnist").take_per_class(20)
    trajectories = []
    for seed in range(experts):
        torch.manual_seed(seed)
        net = get_network("ConvNet", 1, 10, (28, 28), width=WIDTH)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        trajectory = [[p.detach().clone() for p in net.parameters()]]
        for _ in range(epochs):
            for batch in torch.randperm(200).split(50):
                opt.zero_grad()
                F.cross_entropy(net(dataset.train_images[batch]), dataset.train_labels[batch]).backward()
                opt.step()
            trajectory.append([p.detach().clone() for p in net.parameters()])
        trajectories.append(trajectory)
    folder.mkdir(parents=True)
    torch.save(trajectories, folder / "replay_buffer_0.pt")


@pytest.mark.skipif(not FASHION_DIR.exists(), reason="apt-get install dataset-fashion-mnist")
def test_distill_from_original_layout_buffers(tmp_path):
    write_original_buffers(tmp_path / "buffers" / "FashionMNIST" / "ConvNet")
    for i, where in enumerate([tmp_path / "buffers", tmp_path / "buffers" / "FashionMNIST" / "ConvNet"]):
        result = mtt("distill", "--dataset", "fashion-mnist", "--ipc", 1, "--buffers", where, "--out",
                     tmp_path / f"run{i}", "--iterations", 2, "--syn-steps", 3, "--max-start-epoch", 1,
                     "--eval-repeats", 0, "--device", "cpu", "--no-progress", "--json")
        assert result.returncode == 0, result.stderr
        assert "width=16" in result.stderr.splitlines()[0]  # read from the files
        assert json.loads(result.stdout.splitlines()[-1])["iterations"] == 2
        synthetic = SyntheticSet.load(tmp_path / f"run{i}" / "synthetic.safetensors")
        assert synthetic.images.shape == (10, 1, 28, 28) and synthetic.width == WIDTH


# ----------------------------------------------------------------------------- the API's own checks

def test_api_arguments_of_the_wrong_kind_get_clear_errors():
    with pytest.raises(TypeError, match="dataset name must be a string"):
        load_dataset(None)
    with pytest.raises(TypeError, match="zca must be True or False, got 'no'"):
        load_dataset("digits", zca="no")
    with pytest.raises(TypeError, match=r"preset\(dataset, ipc\) takes a dataset name and an int, got 'cifar10', '1'"):
        preset("cifar10", "1")
    with pytest.raises(ValueError, match="zca must be True or False, got 'no'"):
        DistillConfig(dataset="digits", ipc=1, zca="no").validate()
    with pytest.raises(ValueError, match="epochs must be an int >= 1, got 0"):
        ExpertConfig(epochs=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        ExpertConfig(lr=-0.1)
    with pytest.raises(ValueError, match="images per class to keep must be an int >= 1, got -5"):
        load_dataset("digits").take_per_class(-5)


def test_log_tensorboard_from_the_command_line(experts, tmp_path):
    pytest.importorskip("tensorboard")
    result = mtt(*distill_args(experts, tmp_path, "--iterations", 2, "--log", "tensorboard"))
    assert result.returncode == 0, result.stderr
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_a_run_and_experts_keep_to_folders_of_their_own(experts, tmp_path):
    """--out and --buffers side by side in every command: one typed for the other must not mix the two folders."""
    shutil.copytree(experts, tmp_path / "experts")
    before = sorted(p.name for p in (tmp_path / "experts").iterdir())
    error = the_error(mtt(*distill_args(tmp_path / "experts", tmp_path / "experts", "--iterations", 1)))
    assert f"--out {tmp_path / 'experts'} holds expert trajectories: give the run a folder of its own" in error
    assert sorted(p.name for p in (tmp_path / "experts").iterdir()) == before
    assert mtt(*distill_args(experts, tmp_path / "run", "--iterations", 1)).returncode == 0
    error = the_error(mtt("experts", "--dataset", "digits", "--epochs", 1, "--width", WIDTH, "--num-experts", 1,
                          "--out", tmp_path / "run", "--device", "cpu", "--no-progress"))
    assert "is not an mtt expert-buffer shard" in error and "not at a run's" in error


def test_an_unwritable_plot_fails_before_the_evaluation(tmp_path):
    result = mtt("baseline", "--dataset", "digits", "--ipc", 1, "--plot", "/proc/mtt/bars.png", "--device", "cpu")
    assert "--plot /proc/mtt is not writable" in the_error(result)


def test_torchrun_splits_the_segments_and_equals_one_process(experts, tmp_path):
    """2 gloo processes, 4 segments: each rank unrolls 2, gradients are summed; the evaluation's 3 networks are
    split over the ranks (1 and 2) and gathered in seed order; rank 0 writes."""
    args = ["--iterations", 4, "--segments", 4, "--seed", 2, "--json", "--eval-repeats", 3, "--eval-epochs", 2,
            "--eval-every", 2]
    single = mtt(*distill_args(experts, tmp_path / "single", *args))
    assert single.returncode == 0, single.stderr
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "mtt"]
    double = subprocess.run([*torchrun, *map(str, distill_args(experts, tmp_path / "double", *args))],
                            capture_output=True, text=True, env=ENV)
    assert double.returncode == 0, double.stderr
    assert len([line for line in double.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0's summary only
    a = SyntheticSet.load(tmp_path / "single" / "synthetic.safetensors")
    b = SyntheticSet.load(tmp_path / "double" / "synthetic.safetensors")
    torch.testing.assert_close(b.images, a.images, rtol=1e-4, atol=1e-5)
    assert b.syn_lr == pytest.approx(a.syn_lr, rel=1e-5)
    histories = [json.loads((tmp_path / d / "history.json").read_text()) for d in ("single", "double")]
    assert histories[1]["loss"] == pytest.approx(histories[0]["loss"], rel=1e-5)
    evals = [[(e["iteration"], e["runs"]) for e in history["evals"]] for history in histories]
    assert [i for i, _ in evals[1]] == [0, 2, 4] and all(len(runs) == 3 for _, runs in evals[1])
    assert evals[1][0] == evals[0][0]  # iteration 0: the same images, so the very same accuracies, in seed order
    for (_, double_runs), (_, single_runs) in zip(evals[1][1:], evals[0][1:]):  # images equal to round-off
        assert double_runs == pytest.approx(single_runs, abs=1.0)
    uneven = mtt(*distill_args(experts, tmp_path / "uneven", "--segments", 3), "--iterations", 1)
    assert uneven.returncode == 0  # one process: any K


def test_torchrun_prints_an_error_once_and_gives_each_rank_its_line(tmp_path):
    """Bad input fails every process alike: one `error:` line (rank 0's), not one per process, and torchrun's failure
    summary shows each rank's line where it said "To enable traceback see ...". A rank that fails alone (its GPU
    ran out of memory) is named there too: rank 1 prints nothing and hands its line to torchrun's error file."""
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "mtt"]
    bad = ["distill", "--dataset", "digits", "--ipc", "1", "--buffers", str(tmp_path / "none"), "--device", "cpu",
           "--out", str(tmp_path / "run")]
    result = subprocess.run([*torchrun, *bad], capture_output=True, text=True, env=ENV)
    assert result.returncode != 0
    said = f"error: no expert buffers at {tmp_path / 'none'}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(said), result.stderr
    assert result.stderr.count(f"traceback : {said}") == 2, result.stderr
    assert "To enable traceback" not in result.stderr

    error_file = tmp_path / "rank1" / "error.json"
    error_file.parent.mkdir()
    alone = subprocess.run([sys.executable, "-m", "mtt", *bad], capture_output=True, text=True,
                           env=ENV | {"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_ERROR_FILE": str(error_file)})
    assert alone.returncode == 2 and alone.stderr == ""
    assert json.loads(error_file.read_text())["message"]["message"].startswith(said)


def test_torchrun_teacher_labels_are_the_mean_over_all_segments(experts, tmp_path):
    """TESLA's labels with 4 segments on 2 ranks: every rank holds (and rank 0 saves) the mean of all 4
    segments' teacher labels, not of its own 2."""
    args = ["--iterations", 2, "--segments", 4, "--seed", 2, "--teacher-labels"]
    assert mtt(*distill_args(experts, tmp_path / "single", *args)).returncode == 0
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "mtt"]
    double = subprocess.run([*torchrun, *map(str, distill_args(experts, tmp_path / "double", *args))],
                            capture_output=True, text=True, env=ENV)
    assert double.returncode == 0, double.stderr
    a, b = (SyntheticSet.load(tmp_path / d / "synthetic.safetensors") for d in ("single", "double"))
    assert a.label_logits is not None
    torch.testing.assert_close(b.label_logits, a.label_logits, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- plot

def test_experts_that_learned_little_are_named_as_such(tmp_path):
    weak = tmp_path / "weak"
    train_experts(load_dataset("digits"), ExpertConfig(num_experts=1, epochs=2, width=WIDTH, lr=1e-3), weak,
                  device="cpu", progress=False)
    result = mtt(*distill_args(weak, tmp_path / "run", "--iterations", 1, "--max-start-epoch", 1, "--expert-epochs", 1))
    # Said before the run starts: with such experts the step size diverges at once, which the error blames on the
    # distillation's learning rates.
    assert re.search(r"note: the experts reach only \d+\.\d % test accuracy after their last epoch \(chance: 10 %\)",
                     result.stderr), result.stderr


def test_plot_draws_a_runs_figures(experts, tmp_path):
    run = tmp_path / "run"
    assert mtt(*distill_args(experts, run, "--iterations", 4, "--snapshot-every", 2)).returncode == 0
    result = mtt("plot", run, "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])["figures"]
    assert [Path(f).name for f in figures] == ["synthetic.png", "evolution.png", "curves.png"]
    assert all(Path(f).parent == run / "plots" and Path(f).read_bytes()[:4] == b"\x89PNG" for f in figures)

    (run / "checkpoint.safetensors").rename(tmp_path / "moved")  # a run copied without it: its final set drawn
    result = mtt("plot", run, "--buffers", experts, "--format", "svg", "--out", tmp_path / "figures", "--device", "cpu")
    assert result.returncode == 0 and "stopped at" not in result.stderr, result.stderr
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [
        "curves.svg", "evolution.svg", "experts.svg", "synthetic.svg", "trajectories.svg"]
    assert "holds no distillation run" in the_error(mtt("plot", experts))
    other = tmp_path / "other"
    train_experts(load_dataset("digits"), ExpertConfig(num_experts=2, epochs=4, width=WIDTH, seed=9), other,
                  device="cpu", progress=False)
    (tmp_path / "moved").rename(run / "checkpoint.safetensors")
    assert "was distilled from other experts" in the_error(mtt("plot", run, "--buffers", other))
    assert "no such folder" in the_error(mtt("plot", tmp_path / "nowhere"))


def test_plot_into_a_full_disk_names_the_figures_it_saved_before(experts, tmp_path, monkeypatch, capsys):
    from mtt import viz
    from mtt.cli import main

    run = tmp_path / "run"
    assert mtt(*distill_args(experts, run, "--iterations", 2)).returncode == 0

    def full(*args, path, **kwargs):
        raise OSError(f"cannot write {path}: no space left on the device (test)")

    monkeypatch.setattr(viz, "training_curves", full)
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"saved: {run / 'plots' / 'synthetic.png'}" in err and f"saved: {run / 'plots' / 'evolution.png'}" in err
    assert f"error: cannot write {run / 'plots' / 'curves.png'}: no space left" in err


def test_a_run_extended_and_stopped_is_drawn_and_named_as_it_stopped(experts, tmp_path):
    """After a finished run was resumed for more and stopped, its synthetic.safetensors is out of date: plot draws
    the checkpoint's set, and evaluate names the checkpoint among the sets to choose from."""
    run = tmp_path / "run"
    assert mtt(*distill_args(experts, run, "--iterations", 2)).returncode == 0
    process = start("distill", "--dataset", "digits", "--ipc", 1, "--buffers", experts, "--out", run, "--resume",
                    "--iterations", 100000, "--checkpoint-every", 100000, "--snapshot-every", 1)
    wait_for(run / "snapshots" / "iter_000004.safetensors", process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    with safe_open(str(run / "checkpoint.safetensors"), "pt") as f:
        stopped_at = int(f.metadata()["iteration"])
    result = mtt("plot", run)
    assert f"stopped at iteration {stopped_at} of 100000: drawing the set its checkpoint.safetensors holds" in \
        result.stderr
    message = the_error(mtt("evaluate", "--synthetic", run))
    assert f"or {run / 'checkpoint.safetensors'} (iteration {stopped_at}: the run was resumed after its end" in message


def test_a_snapshot_out_of_its_run_is_named_as_one(experts, tmp_path):
    assert mtt(*distill_args(experts, tmp_path / "run", "--iterations", 1)).returncode == 0
    snapshot = tmp_path / "run" / "snapshots" / "iter_000000.safetensors"  # in its run: --dataset as for a set
    assert mtt("evaluate", "--synthetic", snapshot, "--dataset", "digits", "--epochs", 1, "--repeats", 1,
               "--device", "cpu", "--no-progress").returncode == 0
    assert "distilled digits; drop --dataset" in the_error(mtt("evaluate", "--synthetic", snapshot, "--dataset",
                                                               "fashion-mnist"))
    shutil.copy(tmp_path / "run" / "snapshots" / "iter_000000.safetensors", tmp_path / "copy.safetensors")
    assert "looks like a distillation run's snapshot" in the_error(mtt("evaluate", "--synthetic",
                                                                        tmp_path / "copy.safetensors"))

"""The whole pipeline on an offline dataset, small enough for a laptop CPU: `python -m mtt demo`.

experts -> distillation at IPC 1 -> evaluation of the distilled set against random real
images of the same size -> report.md with the table, the image grid and the curves.
Every stage resumes from what an earlier run left in the output folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtt.buffers import ExpertBuffers
from mtt.data import Dataset, load_dataset
from mtt.distill import DistillConfig, distill, preset
from mtt.evaluate import EvalConfig, evaluate, evaluate_baseline
from mtt.experts import ExpertConfig, train_experts
from mtt.io import atomic_write_json, atomic_write_text, ensure_writable_dir
from mtt.synthetic import SyntheticSet


@dataclass
class QuickConfig:
    """A small offline run: the demo, and the notebooks' configuration under CI."""

    dataset: str = "digits"
    ipc: int = 1
    width: int = 32             # ConvNet-32: 16x cheaper than the paper's 128 and still learns digits
    num_experts: int = 4
    expert_epochs_trained: int = 20
    iterations: int = 100
    syn_steps: int = 10
    eval_epochs: int = 300
    eval_repeats: int = 5
    seed: int = 0

    def expert_config(self) -> ExpertConfig:
        return ExpertConfig(num_experts=self.num_experts, epochs=self.expert_epochs_trained, width=self.width,
                            parallel=self.num_experts, seed=self.seed)

    def distill_overrides(self) -> dict[str, Any]:
        """Changes to the (dataset, ipc) preset; evaluation is done once at the end instead."""
        return dict(width=self.width, iterations=self.iterations, syn_steps=self.syn_steps, eval_repeats=0,
                    snapshot_every=max(1, self.iterations // 10), checkpoint_every=25, seed=self.seed)

    def distill_config(self, device: str) -> DistillConfig:
        return preset(self.dataset, self.ipc, device=device, **self.distill_overrides())

    def eval_config(self, progress: bool = True) -> EvalConfig:
        return EvalConfig(epochs=self.eval_epochs, repeats=self.eval_repeats, width=self.width, seed=self.seed,
                          progress=progress)


@dataclass
class QuickRun:
    dataset: Dataset
    buffers: ExpertBuffers
    synthetic: SyntheticSet
    run_dir: Path


def quick_run(out_dir: str | Path, device: str = "auto", config: QuickConfig | None = None,
              progress: bool = True) -> QuickRun:
    """Experts then distillation into out_dir/experts and out_dir/distill, reusing what is already there."""
    config = config or QuickConfig()
    out = ensure_writable_dir(out_dir)  # before training, not after
    dataset = load_dataset(config.dataset)
    train_experts(dataset, config.expert_config(), out / "experts", device=device, progress=progress)
    buffers = ExpertBuffers.open(out / "experts")
    run = out / "distill"
    if (run / "synthetic.safetensors").exists():
        synthetic = SyntheticSet.load(run / "synthetic.safetensors")
    else:
        synthetic = distill(config.distill_config(device), dataset, buffers, run,
                            resume=(run / "checkpoint.safetensors").exists(), progress=progress)
    return QuickRun(dataset, buffers, synthetic, run)


def run_demo(out_dir: str | Path = "demo", device: str = "auto", config: QuickConfig | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run every stage into out_dir; return (and save as results.json) the comparison."""
    from mtt import viz

    config = config or QuickConfig()
    out = Path(out_dir)
    run = quick_run(out, device, config, progress)
    dataset, synthetic = run.dataset, run.synthetic
    eval_config = config.eval_config(progress)
    distilled = evaluate(synthetic.images, synthetic.labels, dataset.test_images, dataset.test_labels,
                         dataclasses.replace(eval_config, lr=synthetic.syn_lr), device)
    random_real = evaluate_baseline(dataset, config.ipc, "random", ["ConvNet"], eval_config, device)["ConvNet"]
    results = {"dataset": config.dataset, "ipc": config.ipc, "distilled": distilled.to_dict(),
               "random_real": random_real.to_dict(), "syn_lr": synthetic.syn_lr,
               "config": dataclasses.asdict(config)}
    atomic_write_json(out / "results.json", results)

    viz.image_grid(synthetic, dataset, path=out / "synthetic.png")
    viz.training_curves(run.run_dir, path=out / "curves.png")
    student = viz.student_paths_for(run.run_dir, run.buffers, dataset, expert=0, start_epoch=0)
    viz.trajectory_pca(run.buffers, experts=[0], student_paths=[student], path=out / "trajectories.png")
    atomic_write_text(out / "report.md", _report(results, config))
    return results


def results_table(results: dict[str, Any]) -> str:
    d, r = results["distilled"], results["random_real"]
    return (f"| set ({results['dataset']}, IPC {results['ipc']}) | ConvNet test accuracy (%) |\n|---|---|\n"
            f"| distilled (MTT) | {d['mean']:.1f} +- {d['std']:.1f} |\n"
            f"| random real | {r['mean']:.1f} +- {r['std']:.1f} |\n")


def _report(results: dict[str, Any], config: QuickConfig) -> str:
    runs = ", ".join(f"{x:.1f}" for x in results["distilled"]["runs"])
    return f"""# mtt demo: {config.dataset}, {config.ipc} image per class

{results_table(results)}
Each accuracy is the mean +- std of {config.eval_repeats} ConvNet-{config.width} networks trained from
scratch for {config.eval_epochs} epochs on the set (SGD momentum 0.9, lr x 0.1 at half, DSA) and
tested on the real test set; distilled runs: {runs}. Learned step size: {results['syn_lr']:.4g}.

Experts: {config.num_experts} ConvNet-{config.width} trained {config.expert_epochs_trained} epochs.
Distillation: {config.iterations} iterations of {config.syn_steps} unrolled steps.

## Distilled images
![synthetic images](synthetic.png)

## Matching loss and learned step size
![curves](curves.png)

## Expert trajectory and the student's path (PCA)
![trajectories](trajectories.png)
"""

"""How far TESLA's approximate gradient is from the exact one on real iterations.

Draws `--iterations` segments (expert, start epoch, minibatches, DSA) as a distillation run of the
preset would, from real-image initialisation, and reports per segment the cosine similarity of
the image gradient (and the relative error of the step-size gradient) of `--backward tesla`
against the exact `checkpointed` one, with the same randomness.

    python bench/tesla_gradient.py --buffers runs/methods/digits-ipc1/experts --dataset digits --ipc 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mtt.buffers import ExpertBuffers  # noqa: E402
from mtt.data import load_dataset  # noqa: E402
from mtt.distill import initial_state, preset  # noqa: E402
from mtt.networks import get_network  # noqa: E402
from mtt.unroll import Student, plan_steps, unroll  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--buffers", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--ipc", type=int, required=True)
    parser.add_argument("--width", type=int, default=None, help="default: the experts'")
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()

    buffers = ExpertBuffers.open(args.buffers)
    dataset = load_dataset(args.dataset)
    width = args.width or buffers.meta.convnet_size()[0]
    config = preset(args.dataset, args.ipc, width=width, device="cpu")
    state = initial_state(config, dataset, torch.device("cpu"))
    student = Student(get_network(config.model, dataset.channels, dataset.num_classes, dataset.im_size, width,
                                  config.depth))
    g = torch.Generator().manual_seed(0)
    cosines, lr_errors = [], []
    for _ in range(args.iterations):
        expert = int(torch.randint(len(buffers), (), generator=g))
        start = int(torch.randint(config.max_start_epoch, (), generator=g))
        plans = plan_steps(len(state.images), config.syn_steps, config.batch_syn, tuple(state.images.shape[1:]),
                           config.dsa, g, torch.device("cpu"))
        theta0, target = buffers.snapshot(expert, start), buffers.snapshot(expert, start + config.expert_epochs)
        exact, tesla = (unroll(student, theta0, target, state.images, state.syn_lr, plans, labels=state.labels,
                               mode=mode, allow_approximate=True) for mode in ("checkpointed", "tesla"))
        cosines.append(torch.nn.functional.cosine_similarity(exact.grad_images.flatten(), tesla.grad_images.flatten(),
                                                             dim=0).item())
        lr_errors.append(abs(tesla.grad_lr.item() - exact.grad_lr.item()) / abs(exact.grad_lr.item()))
        print(f"expert {expert} start {start}: cosine(images) {cosines[-1]:.4f}, "
              f"step-size gradient relative error {lr_errors[-1]:.3f}", flush=True)
    print(f"cosine(images) mean {statistics.mean(cosines):.4f}, min {min(cosines):.4f}, max {max(cosines):.4f}; "
          f"step-size gradient relative error median {statistics.median(lr_errors):.3f} "
          f"({args.dataset} IPC {args.ipc}, ConvNet-{width}, {config.syn_steps} steps, {args.iterations} segments)")


if __name__ == "__main__":
    main()

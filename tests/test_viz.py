"""Plots from a small real run on digits: every figure renders, saves a PNG that decodes, and the
numbers behind it (pixels, PCA projections, student paths) are right."""
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from PIL import Image

from mtt import viz
from mtt.buffers import ExpertBuffers, write_shard
from mtt.data import load_dataset
from mtt.distill import DistillConfig, distill, load_snapshots
from mtt.evaluate import EvalResult
from mtt.experts import ExpertConfig, train_experts
from mtt.io import atomic_save_safetensors
from mtt.synthetic import SyntheticSet


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz")
    dataset = load_dataset("digits")
    train_experts(dataset, ExpertConfig(num_experts=2, epochs=3, width=16), root / "experts", device="cpu",
                  progress=False)
    buffers = ExpertBuffers.open(root / "experts")
    config = DistillConfig(dataset="digits", ipc=1, width=16, syn_steps=4, expert_epochs=1, max_start_epoch=2,
                           lr_img=10, iterations=4, eval_repeats=0, snapshot_every=2, device="cpu")
    synthetic = distill(config, dataset, buffers, root / "run", progress=False)
    return SimpleNamespace(dataset=dataset, buffers=buffers, dir=root / "run", synthetic=synthetic, config=config)


def assert_png(path, min_size=(300, 150), max_size=(4000, 4000)):
    """A PNG that decodes, with a width and height in the given ranges; returns its size."""
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        width, height = image.size
    assert min_size[0] <= width <= max_size[0] and min_size[1] <= height <= max_size[1], image.size
    return width, height


def test_display_pixels_are_in_unit_range(run):
    pixels = viz.display_pixels(run.synthetic.images, run.dataset)
    assert pixels.shape == run.synthetic.images.shape
    assert pixels.min() >= 0 and pixels.max() <= 1
    # each image is stretched to [0, 1] after clipping at 2.5 std, like the paper's figures
    assert torch.allclose(pixels.amax((1, 2, 3)), torch.ones(10)) and torch.all(pixels.amin((1, 2, 3)) == 0)
    plain = viz.display_pixels(run.synthetic.images, "digits", clip=None)
    assert plain.min() >= 0 and plain.max() <= 1
    assert torch.equal(viz.display_pixels(run.synthetic.images, "Digits", clip=None), plain)  # any spelling
    with pytest.raises(ValueError, match="unknown dataset 'digitz'"):
        viz.display_pixels(run.synthetic.images, "digitz")


def test_display_pixels_undo_zca_and_normalisation(run):
    whitened = run.dataset.with_zca()
    real = run.dataset.denormalize(run.dataset.train_images[:6])
    shown = viz.display_pixels(whitened.train_images[:6], whitened, clip=None)
    assert torch.allclose(shown, real.clamp(0, 1), atol=1e-4)
    # a set's own ZCA can be passed with a plain dataset or just the dataset's name
    assert torch.allclose(viz.display_pixels(whitened.train_images[:6], "digits", zca=whitened.zca, clip=None),
                          shown, atol=1e-6)


def test_image_grid_one_per_class(run, tmp_path):
    fig = viz.image_grid(run.synthetic, run.dataset, path=tmp_path / "grid.png")
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == [str(c) for c in range(10)]
    width, height = assert_png(tmp_path / "grid.png")
    assert width > 3 * height  # IPC 1: the classes side by side


def test_image_grid_rows_per_class(run, tmp_path):
    images = run.synthetic.images.repeat_interleave(3, 0)  # class-ordered, 3 per class
    names = [f"class {c}" for c in range(10)]
    fig = viz.image_grid(images, run.dataset, class_names=names, path=tmp_path / "rows.png")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert ax.images[0].get_array().shape[0] > ax.images[0].get_array().shape[1]  # 10 rows of 3
    assert_png(tmp_path / "rows.png")
    capped = viz.image_grid(images, run.dataset, labels=torch.arange(10).repeat_interleave(3), ipc=1)
    assert len([ax for ax in capped.axes if ax.get_visible()]) == 10
    with pytest.raises(ValueError, match="pass labels"):
        viz.image_grid(images[:7], run.dataset)


def test_image_evolution(run, tmp_path):
    fig = viz.image_evolution(run.dir, run.dataset, classes=[0, 3, 7], path=tmp_path / "evolution.png")
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "2", "4"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "3", "7"]
    assert_png(tmp_path / "evolution.png")
    two = viz.image_evolution(run.dir, run.dataset, max_columns=2)
    assert [t.get_text() for t in two.axes[0].get_xticklabels()] == ["0", "4"]  # first and last kept
    with pytest.raises(FileNotFoundError, match="no snapshots"):
        viz.image_evolution(tmp_path, run.dataset)


def test_evolution_gif_has_a_frame_per_snapshot(run, tmp_path):
    path = viz.evolution_gif(run.dir, run.dataset, tmp_path / "evolution.gif", fps=5)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.n_frames == len(load_snapshots(run.dir)) == 3
        assert gif.info["duration"] == 200


def test_training_curves(run, tmp_path):
    fig = viz.training_curves(run.dir, path=tmp_path / "curves.png")
    assert [ax.get_title() for ax in fig.axes] == ["Matching loss", r"Learned step size $\alpha$",
                                                   "Evaluation accuracy"]
    assert len(fig.axes[0].lines[0].get_ydata()) == 4
    width, height = assert_png(tmp_path / "curves.png")
    assert width > 2 * height
    history = viz.load_history(run.dir) | {"evals": [{"iteration": 0, "mean": 40.0, "std": 2.0, "runs": []},
                                                     {"iteration": 4, "mean": 55.0, "std": 1.0, "runs": []}]}
    with_evals = viz.training_curves(history)
    assert list(with_evals.axes[2].lines[0].get_ydata()) == [40.0, 55.0]


def test_expert_accuracy_shows_each_expert_and_the_epochs_the_run_matched(run, tmp_path):
    fig = viz.expert_accuracy(run.buffers, run.dir, path=tmp_path / "experts.png")
    ax = fig.axes[0]
    curves = [line.get_ydata() for line in ax.lines]
    for k in range(2):  # each expert's accuracy after epochs 1..3, in %, then their mean, then chance (10 classes)
        np.testing.assert_allclose(curves[k], 100 * run.buffers.test_acc(k).double().numpy())
    np.testing.assert_allclose(curves[2], (curves[0] + curves[1]) / 2)
    assert list(curves[3]) == [10.0, 10.0]
    # starts from [0, 2), targets 1 epoch later: the run matches epochs 0-2
    assert viz.matched_epochs(run.dir) == (0, 2) == viz.matched_epochs(run.config)  # after the run, or before it
    (span,) = ax.patches
    assert span.get_x() == 0 and span.get_width() == 2
    assert ax.get_legend().get_texts()[-1].get_text() == "matched by the run: epochs 0-2"
    assert_png(tmp_path / "experts.png")
    # without the run, no span; experts that recorded no accuracy (the original's files): said so
    assert not viz.expert_accuracy(run.buffers).axes[0].patches
    trajectories = torch.stack([run.buffers.trajectory(0)])
    write_shard(tmp_path / "bare" / "experts_00000-00000.safetensors", trajectories, run.buffers.meta, [0])
    bare = viz.expert_accuracy(ExpertBuffers.open(tmp_path / "bare"))
    assert [t.get_text() for t in bare.axes[0].texts] == ["these experts recorded no test accuracy"]


def test_training_curves_of_a_run_still_going(run, tmp_path):
    shutil.copy(run.dir / "checkpoint.safetensors", tmp_path)  # no history.json yet
    assert viz.load_history(tmp_path)["loss"] == viz.load_history(run.dir / "history.json")["loss"]
    viz.training_curves(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a distillation run"):
        viz.load_history(tmp_path / "nothing")
    (tmp_path / "history.json").write_text('{"loss": [1, 2,')  # damaged: named, with what to do
    with pytest.raises(ValueError, match=r"history.json is damaged, not valid JSON .*: delete it"):
        viz.training_curves(tmp_path)


def test_student_path_starts_at_the_expert_snapshot(run):
    student = viz.student_paths_for(run.dir, run.buffers, run.dataset, expert=1, start_epoch=1)
    assert student.params.shape == (5, run.buffers.meta.num_params)  # syn_steps 4 from the run's config
    assert torch.equal(student.params[0], run.buffers.snapshot(1, 1))
    assert (student.start_epoch, student.target_epoch) == (1, 2) and 0 < student.loss < 10
    again = viz.student_paths_for(run.synthetic, run.buffers, run.dataset, 1, 1, syn_steps=2)
    assert again.params.shape[0] == 3 and torch.equal(again.params, student.params[:3])  # same seed, same draws
    with pytest.raises(ValueError, match="within"):
        viz.student_paths_for(run.dir, run.buffers, run.dataset, expert=0, start_epoch=3)


def test_a_student_against_other_experts_is_refused(run, tmp_path):
    """The figure would set the run's images against experts it never matched: refused, as --resume refuses them."""
    dataset = load_dataset("digits")
    train_experts(dataset, ExpertConfig(num_experts=2, epochs=3, width=16, seed=7), tmp_path / "other", device="cpu",
                  progress=False)
    with pytest.raises(ValueError, match="was distilled from other experts .* pass the --buffers the run was"):
        viz.student_paths_for(run.dir, ExpertBuffers.open(tmp_path / "other"), dataset, expert=0, start_epoch=0)
    train_experts(dataset, ExpertConfig(num_experts=1, epochs=3, width=8), tmp_path / "narrow", device="cpu",
                  progress=False)
    with pytest.raises(ValueError, match="not the experts the set was distilled through .*parameter 0"):
        viz.student_paths_for(run.synthetic, ExpertBuffers.open(tmp_path / "narrow"), dataset, 0, 0)


@pytest.mark.parametrize("relative", [True, False])
def test_pca_projections(run, relative):
    pca = viz.fit_trajectory_pca(run.buffers, dims=3, relative=relative)
    assert pca.experts == [0, 1] and [p.shape for p in pca.paths] == [(4, 3), (4, 3)]
    expert_points = pca.transform(run.buffers.trajectory(1), expert=1)
    assert torch.allclose(torch.from_numpy(expert_points), torch.from_numpy(pca.paths[1]), atol=1e-4)
    student = viz.student_paths_for(run.dir, run.buffers, run.dataset, expert=1, start_epoch=2)
    start = pca.transform(student.params, expert=1)[0]
    assert abs(start - pca.paths[1][2]).max() < 1e-4
    if relative:
        assert abs(pca.paths[0][0] - pca.paths[1][0]).max() < 1e-4  # every expert starts at the same point
        with pytest.raises(ValueError, match="pass expert="):
            pca.transform(student.params)


def test_trajectory_pca_plots(run, tmp_path):
    student = viz.student_paths_for(run.dir, run.buffers, run.dataset, expert=0, start_epoch=0)
    fig = viz.trajectory_pca(run.buffers, student_paths=[student], path=tmp_path / "pca2d.png")
    (ax,) = fig.axes
    assert "PC1" in ax.get_xlabel() and "PC2" in ax.get_ylabel()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "expert 0" in labels and any(label.startswith("student") for label in labels)
    assert_png(tmp_path / "pca2d.png")
    fig3 = viz.trajectory_pca(run.buffers, experts=[0, 1], student_paths=[student], dims=3,
                              path=tmp_path / "pca3d.png")
    assert fig3.axes[0].name == "3d" and "PC3" in fig3.axes[0].get_zlabel()
    assert_png(tmp_path / "pca3d.png")
    raw = viz.trajectory_pca(run.buffers, student_paths=[student.params], relative=False)  # a bare [N+1, P] path
    assert len(raw.axes[0].lines) > 0


def bar_heights(fig: Figure) -> list[list[float]]:
    return [[bar.get_height() for bar in c] for c in fig.axes[0].containers if isinstance(c, BarContainer)]


def test_cross_arch_bars(tmp_path):
    results = {"ConvNet": {"mean": 60.0, "std": 1.0}, "ResNet18": {"mean": 41.0, "std": 2.0}}
    fig = viz.cross_arch_bars(results, {"ConvNet": 64.3, "ResNet18": 46.4}, path=tmp_path / "bars.png")
    assert isinstance(fig, Figure)
    assert_png(tmp_path / "bars.png")
    assert bar_heights(fig) == [[60.0, 41.0], [64.3, 46.4]]  # ours, then the paper's
    # Each value above its error bar's cap, not on it.
    assert [(t.get_text(), t.xy[1]) for t in fig.axes[0].texts] == [("60.0", 61.0), ("41.0", 43.0), ("64.3", 64.3),
                                                                     ("46.4", 46.4)]
    named = viz.cross_arch_bars(results, label="random real", chance=10.0)
    assert [t.get_text() for t in named.axes[0].get_legend().get_texts()] == ["chance (10 %)", "random real"]
    # Every way an evaluation is written down; a model the paper has no number for gets no paper bar.
    mixed = {"ConvNet": EvalResult(62.1, 0.8, []), "VGG11": (48.0, 0.9), "AlexNet": 30.5, "SwinT": 28.0}
    assert bar_heights(viz.cross_arch_bars(mixed, {"ConvNet": 64.3})) == [[62.1, 48.0, 30.5, 28.0], [64.3]]
    assert isinstance(viz.cross_arch_bars(results), Figure)
    # The format the suffix names: PDF and SVG for papers, not PNG bytes under another name.
    viz.cross_arch_bars(results, path=tmp_path / "bars.pdf")
    viz.training_curves({"loss": [1.0, 0.5], "syn_lr": [0.01, 0.02], "evals": []}, path=tmp_path / "curves.svg")
    assert (tmp_path / "bars.pdf").read_bytes().startswith(b"%PDF")
    assert b"<svg" in (tmp_path / "curves.svg").read_bytes()[:1000]
    with pytest.raises(ValueError, match="cannot save a figure as .*curves.xyz: use one of .*\\.pdf"):
        viz.training_curves({"loss": [1.0], "syn_lr": [0.01], "evals": []}, path=tmp_path / "curves.xyz")


def test_synthetic_set_round_trip_feeds_the_plots(run, tmp_path):
    loaded = SyntheticSet.load(run.dir / "synthetic.safetensors")
    viz.image_grid(loaded, "digits", path=tmp_path / "from_name.png")
    assert_png(tmp_path / "from_name.png")


def test_figures_of_the_wrong_data_are_refused(run):
    """A set drawn with another dataset's statistics, or a stopped ZCA run with un-whitened ones, would show noise."""
    with pytest.raises(ValueError, match="the set is of digits, not cifar10"):
        viz.image_grid(run.synthetic, "cifar10")
    with pytest.raises(ValueError, match="the images have 1 channels but cifar10 images 3"):
        viz.image_grid(run.synthetic.images, "cifar10")
    with pytest.raises(ValueError, match="ipc must be >= 1"):
        viz.image_grid(run.synthetic, run.dataset, ipc=0)
    with pytest.raises(ValueError, match="2 class names for 10 classes"):
        viz.image_grid(run.synthetic, run.dataset, class_names=["a", "b"])
    with pytest.raises(ValueError, match="max_columns must be >= 1"):
        viz.image_evolution(run.dir, run.dataset, max_columns=0)


def test_a_stopped_zca_run_is_drawn_in_its_own_space(run, tmp_path):
    zca = run.dataset.with_zca()
    train_experts(zca, ExpertConfig(num_experts=1, epochs=3, width=16), tmp_path / "experts", device="cpu",
                  progress=False)
    config = DistillConfig(dataset="digits", ipc=1, width=16, syn_steps=2, expert_epochs=1, max_start_epoch=2,
                           lr_img=10, iterations=2, eval_repeats=0, snapshot_every=1, device="cpu", zca=True)
    distill(config, zca, ExpertBuffers.open(tmp_path / "experts"), tmp_path / "run", progress=False)
    (tmp_path / "run" / "synthetic.safetensors").unlink()  # as a run still going has it
    with pytest.raises(ValueError, match=r"distils in ZCA-whitened space .*\(load_dataset\('digits', zca=True\)\)"):
        viz.image_evolution(tmp_path / "run", "digits")
    shown = viz.image_evolution(tmp_path / "run", zca)
    assert isinstance(shown, Figure)
    # and plain experts are no match for a ZCA set when a student is unrolled
    zca_set = SyntheticSet(torch.zeros(10, 1, 8, 8), torch.arange(10), 0.01, "digits", zca=zca.zca,
                           config={"width": 16})
    with pytest.raises(ValueError, match="experts were trained without ZCA, the set distilled with"):
        viz.student_paths_for(zca_set, run.buffers, run.dataset, expert=0, start_epoch=0)


def test_cross_arch_bars_without_a_paper_number_or_results():
    fig = viz.cross_arch_bars({"ConvNet": 50.0, "MLP": 30.0}, paper={"ConvNet": None, "MLP": 40.0})
    assert bar_heights(fig) == [[50.0, 30.0], [40.0]]
    with pytest.raises(ValueError, match="no results to draw"):
        viz.cross_arch_bars({})


def test_figures_show_themselves_in_a_notebook(run):
    """A notebook cell's value is rendered by IPython's display formatter: without pyplot's inline backend set up
    (viz never goes through pyplot), a plain Figure would show as the text "<Figure size ...>"."""
    from IPython.core.formatters import DisplayFormatter

    for fig in (viz.training_curves(run.dir), viz.cross_arch_bars({"ConvNet": 50.0}),
                viz.image_evolution(run.dir, run.dataset)):
        data, _ = DisplayFormatter().format(fig)
        assert data["image/png"].startswith(b"\x89PNG")


def test_image_evolution_spaces_its_columns_evenly(tmp_path):
    """Every k-th snapshot, not rounded picks: 11 snapshots in 8 columns skipped 20, 50 and 80 unevenly."""
    (tmp_path / "snapshots").mkdir()
    for iteration in range(0, 101, 10):
        atomic_save_safetensors({"images": torch.rand(10, 1, 8, 8), "syn_lr": torch.tensor(0.01)},
                         tmp_path / "snapshots" / f"iter_{iteration:06d}.safetensors")
    fig = viz.image_evolution(tmp_path, "digits")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "20", "40", "60", "80", "100"]
    assert "first of each class" not in fig.axes[0].get_title()


def test_the_3d_view_does_not_look_along_a_path():
    """A path running along matplotlib's default line of sight shows as a stub there: another view is chosen."""
    fig = viz._figure(6, 5)
    ax = fig.add_subplot(projection="3d")
    elev, azim = np.radians([30, -60])
    along = np.outer(np.linspace(0, 1, 10), [np.cos(elev) * np.cos(azim), np.cos(elev) * np.sin(azim), np.sin(elev)])
    ax.plot(*along.T)
    ax.plot([0, 1], [0, 1], [0, 0])
    ax.set_xlim(-1, 1), ax.set_ylim(-1, 1), ax.set_zlim(-1, 1)
    ax.set_box_aspect((1, 1, 1))
    assert viz._view_that_shows(ax, [line.get_data_3d() for line in ax.lines]) != (30.0, -60.0)
    ax.lines[0].remove()  # nothing along the line of sight: matplotlib's view stays
    assert viz._view_that_shows(ax, [line.get_data_3d() for line in ax.lines]) == (30.0, -60.0)

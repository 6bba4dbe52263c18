"""The two backward modes against an independent plain-autograd unroll, in float64."""
import dataclasses
import time

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mtt.augment import DEFAULT_STRATEGY, apply_params
from mtt.networks import get_network
from mtt.unroll import (EAGER_STEPS, CompileFailed, StepPlan, Steps, Student, checkpointed_after_out_of_memory,
                        choose_backward, free_memory, full_graph_bytes, graphs_that_fit, memory_share, plan_steps,
                        student_path, unroll)

IPC, CLASSES, STEPS, BATCH = 3, 4, 6, 5  # batch_syn (5) < synthetic set (12): minibatches cycle


def reference_unroll(net, theta_start, theta_target, images, syn_lr, plans, labels=None, label_logits=None):
    """Textbook MTT written from scratch: a list of per-parameter tensors, create_graph everywhere."""
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    sizes = [p.numel() for p in net.parameters()]
    start = list(torch.split(theta_start, sizes))
    params = [t.reshape(s).clone().requires_grad_() for t, s in zip(start, shapes)]
    for plan in plans:
        x = apply_params(images[plan.indices], plan.augment)
        out = functional_call(net, {n: p for n, p in zip(names, params)}, (x,))
        if label_logits is None:
            ce = F.cross_entropy(out, labels[plan.indices])
        else:
            ce = F.cross_entropy(out, F.softmax(label_logits[plan.indices], dim=1))
        grads = torch.autograd.grad(ce, params, create_graph=True)
        params = [p - syn_lr * g for p, g in zip(params, grads)]
    final = torch.cat([p.flatten() for p in params])
    num = ((final - theta_target) ** 2).sum()
    den = ((theta_start - theta_target) ** 2).sum()
    return num / den


def make_problem(channels: int = 1):
    torch.manual_seed(0)
    net = get_network("ConvNet", channels, CLASSES, (8, 8), width=8).double()
    student = Student(net)
    theta_start = torch.cat([p.detach().flatten() for p in net.parameters()])
    theta_target = theta_start + 0.05 * torch.randn_like(theta_start)
    images = torch.randn(IPC * CLASSES, channels, 8, 8, dtype=torch.float64)
    labels = torch.arange(CLASSES).repeat_interleave(IPC)
    syn_lr = torch.tensor(0.05, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    plans = plan_steps(len(images), STEPS, BATCH, (channels, 8, 8), DEFAULT_STRATEGY, generator, torch.device("cpu"))
    return net, student, theta_start, theta_target, images, labels, syn_lr, plans


@pytest.fixture
def problem():
    return make_problem()


def reference_grads(net, theta_start, theta_target, images, syn_lr, plans, **labels):
    images = images.clone().requires_grad_()
    syn_lr = syn_lr.clone().requires_grad_()
    leaves = [images, syn_lr]
    if "label_logits" in labels:
        labels["label_logits"] = labels["label_logits"].clone().requires_grad_()
        leaves.append(labels["label_logits"])
    loss = reference_unroll(net, theta_start, theta_target, images, syn_lr, plans, **labels)
    return loss.item(), torch.autograd.grad(loss, leaves)


def assert_close(ours, reference):
    assert torch.allclose(ours, reference, rtol=1e-6, atol=1e-12 * reference.abs().max().item()), \
        f"max relative error {((ours - reference).abs().max() / reference.abs().max()).item():.2e}"


def test_plans_cover_the_set_with_small_batches(problem):
    plans = problem[-1]
    assert [len(p.indices) for p in plans] == [2, 5, 5, 2, 5, 5]  # randperm(12).split(5), popped from the end
    assert sorted(torch.cat([p.indices for p in plans[:3]]).tolist()) == list(range(12))
    assert len({p.augment.op for p in plans}) > 1


@pytest.mark.parametrize("mode", ["full", "checkpointed"])
def test_gradients_match_plain_autograd_hard_labels(problem, mode):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    ref_loss, (ref_images, ref_lr) = reference_grads(net, theta_start, theta_target, images, syn_lr, plans,
                                                     labels=labels)
    result = unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, mode=mode)
    assert abs(result.loss - ref_loss) <= 1e-9 * ref_loss
    assert_close(result.grad_images, ref_images)
    assert_close(result.grad_lr, ref_lr)
    assert ref_images.abs().sum() > 0 and ref_lr.abs() > 0  # the check is not vacuous


@pytest.mark.parametrize("mode", ["full", "checkpointed"])
def test_gradients_match_plain_autograd_soft_labels(problem, mode):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    logits = 2.0 * F.one_hot(labels, CLASSES).double() + 0.1 * torch.randn(len(labels), CLASSES, dtype=torch.float64)
    ref_loss, (ref_images, ref_lr, ref_logits) = reference_grads(net, theta_start, theta_target, images, syn_lr,
                                                                 plans, label_logits=logits)
    result = unroll(student, theta_start, theta_target, images, syn_lr, plans, label_logits=logits, mode=mode)
    assert abs(result.loss - ref_loss) <= 1e-9 * ref_loss
    assert_close(result.grad_images, ref_images)
    assert_close(result.grad_lr, ref_lr)
    assert_close(result.grad_label_logits, ref_logits)


@pytest.mark.parametrize("kept", [1, STEPS // 2, STEPS, STEPS + 3])
@pytest.mark.parametrize("soft", [False, True])
def test_checkpointed_keeping_graphs_matches_plain_autograd(problem, kept, soft):
    """The walk differentiating the graphs the forward path kept for its last steps, instead of re-running them."""
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    kw = {"label_logits": 2.0 * F.one_hot(labels, CLASSES).double()} if soft else {"labels": labels}
    ref_loss, ref_grads = reference_grads(net, theta_start, theta_target, images, syn_lr, plans, **kw)
    result = unroll(student, theta_start, theta_target, images, syn_lr, plans, mode="checkpointed", kept_graphs=kept,
                    **kw)
    assert abs(result.loss - ref_loss) <= 1e-9 * ref_loss
    for ours, reference in zip((result.grad_images, result.grad_lr, result.grad_label_logits), ref_grads):
        assert_close(ours, reference)


def segments_near(theta_start, images, segments):
    """K segments' starts and targets near the problem's start, and plans drawn for K segments."""
    torch.manual_seed(5)
    starts = theta_start + 0.05 * torch.randn(segments, len(theta_start), dtype=torch.float64)
    targets = starts + 0.05 * torch.randn_like(starts)
    plans = plan_steps(len(images), STEPS, BATCH, (1, 8, 8), DEFAULT_STRATEGY, torch.Generator().manual_seed(2),
                       torch.device("cpu"), segments=segments)
    return starts, targets, plans


@pytest.mark.parametrize("mode, segments, match", [("tesla", 1, "final"), ("checkpointed", 2, "closest")])
def test_kept_graphs_change_nothing_but_the_recomputation(problem, mode, segments, match):
    """TESLA's walk, and K segments matched at their closest steps (some before the last, whose kept graphs go
    unused): the same gradients with graphs kept as without."""
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    if segments > 1:
        theta_start, theta_target, plans = segments_near(theta_start, images, segments)
    args = (student, theta_start, theta_target, images, syn_lr, plans)
    options = dict(labels=labels, mode=mode, match=match, allow_approximate=mode == "tesla")
    walked, kept = unroll(*args, **options), unroll(*args, kept_graphs=STEPS - 2, **options)
    if match == "closest":
        assert min(walked.matched_step) < STEPS  # the check covers graphs kept past the matched step
    assert kept.loss == walked.loss and kept.matched_step == walked.matched_step
    for name in ("grad_images", "grad_lr"):
        assert_close(getattr(kept, name), getattr(walked, name))


def test_kept_graphs_are_for_the_eager_walk_only(problem):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    args = (student, theta_start, theta_target, images, syn_lr, plans)
    for bad in (dict(mode="full", kept_graphs=2), dict(mode="checkpointed", kept_graphs=-1),
                dict(mode="checkpointed", kept_graphs=2, compiler="aot_eager")):
        with pytest.raises(ValueError, match="kept_graphs="):
            unroll(*args, labels=labels, **bad)


def test_inputs_are_left_untouched(problem):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    before = images.clone()
    unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels)
    assert torch.equal(images, before) and not images.requires_grad and not theta_start.requires_grad


def test_bad_arguments(problem):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    with pytest.raises(ValueError, match="exactly one"):
        unroll(student, theta_start, theta_target, images, syn_lr, plans)
    with pytest.raises(ValueError, match="backward mode"):
        unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, mode="tesla")
    with pytest.raises(ValueError, match="parameters"):
        student(theta_start[:-1], images)


def test_student_path_ends_where_the_unroll_ends(problem):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    path = student_path(student, theta_start, images, syn_lr, plans, labels=labels)
    assert path.shape == (STEPS + 1, student.num_params)
    assert torch.equal(path[0], theta_start)
    result = unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, mode="full")
    assert torch.allclose(path[-1], result.final_params, rtol=0, atol=1e-12)


def test_auto_times_both_exact_modes_and_keeps_the_faster(problem):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    choice = choose_backward(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, repeats=1)
    assert set(choice.seconds) == {"full", "checkpointed"} and all(t > 0 for t in choice.seconds.values())
    assert choice.mode == min(choice.seconds, key=choice.seconds.get)
    with pytest.raises(ValueError, match="choose_backward"):  # auto is a choice, not a mode of unroll
        unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, mode="auto")


def test_auto_skips_full_when_its_graph_would_not_fit(problem):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    graph = full_graph_bytes(student, theta_start, images, syn_lr, plans, labels)
    assert len(plans[0].indices) < len(plans[1].indices)  # the first step draws the smaller last chunk...
    # ...and the estimate counts every step as one with the largest minibatch
    assert graph == len(plans) * full_graph_bytes(student, theta_start, images, syn_lr, plans[1:2], labels) > 0
    choice = choose_backward(student, theta_start, theta_target, images, syn_lr, plans, labels=labels,
                             free_bytes=graph)  # full would need all of it: over the 50 % share, half of it fits
    assert choice.mode == "checkpointed" and choice.seconds == {} and "more than 50%" in choice.reason
    assert choice.kept_graphs == STEPS // 2 and f"the last {STEPS // 2} of {STEPS} steps fit" in choice.reason
    compiled = choose_backward(student, theta_start, theta_target, images, syn_lr, plans, labels=labels,
                               free_bytes=graph, compiler="aot_eager")  # timed: eager keeping 3, or compiled
    assert compiled.mode == "checkpointed" and set(compiled.seconds) == {"checkpointed", "compiled checkpointed"}
    assert compiled.kept_graphs == (0 if compiled.compiled else STEPS // 2)  # a compiled walk recomputes every step


def test_full_runs_whole_on_an_80gb_card_where_the_original_was_timed():
    """CIFAR-100 IPC 10, 20 steps: `full`'s graph is estimated at 56,858 MiB (58,187 MiB measured on an H200). On
    an 80 GB card (~78 GiB free) it runs whole, as the original's published time did; with as much RAM free a CPU
    run keeps the graphs that fit in half of it, since running out there ends the process."""
    graph, free = 56_858 * 2**20, 78 * 2**30
    assert memory_share(torch.device("cuda")) == 0.85 and memory_share(torch.device("cpu")) == 0.5
    assert graphs_that_fit(graph, 20, free, memory_share(torch.device("cuda"))) == 20
    assert graphs_that_fit(graph, 20, free, memory_share(torch.device("cpu"))) == 14
    assert graphs_that_fit(graph, 20, 40 * 2**30, 0.85) == 12  # an A100 40GB: the last 12 steps' graphs
    assert graphs_that_fit(graph, 20, None, 0.5) == 20  # free memory unknown: nothing to go by


def test_torchrun_processes_on_one_machine_split_its_ram(monkeypatch):
    """Each torchrun process chooses its backward against its share of the RAM, not all of it (on a GPU each
    has its own)."""
    whole = free_memory(torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert free_memory(torch.device("cpu")) == pytest.approx(whole / 4, rel=0.25)  # MemAvailable moves meanwhile


def test_after_full_ran_out_of_memory_half_of_its_graphs_are_kept_where_they_fit():
    graph, gib = 56_858 * 2**20, 2**30
    cpu = torch.device("cpu")
    choice = checkpointed_after_out_of_memory(cpu, "full ran out", graph, 20, free_bytes=78 * gib)
    assert (choice.mode, choice.kept_graphs) == ("checkpointed", 10)
    assert choice.reason == "full ran out; keeping the graphs of the last 10 of 20 steps"
    assert checkpointed_after_out_of_memory(cpu, "", graph, 20, free_bytes=40 * gib).kept_graphs == 7  # 50 % fits
    assert checkpointed_after_out_of_memory(cpu, "kept ran out", 0, 20, free_bytes=78 * gib).kept_graphs == 0


def segment_plans(plans, k):
    """Segment k's own plans out of plans drawn for K segments (its indices and its rows of the DSA draw)."""
    out = []
    for plan in plans:
        b = plan.indices.shape[1]
        rows = {f.name: getattr(plan.augment, f.name)[k * b:(k + 1) * b] for f in dataclasses.fields(plan.augment)
                if isinstance(getattr(plan.augment, f.name), torch.Tensor)}
        out.append(StepPlan(plan.indices[k], dataclasses.replace(plan.augment, batch_size=b, **rows)))
    return out


@pytest.mark.parametrize("mode", ["full", "checkpointed"])
@pytest.mark.parametrize("soft", [False, True])
def test_k_segments_equal_the_mean_of_k_separate_unrolls(problem, mode, soft):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    K = 3
    starts, targets, plans = segments_near(theta_start, images, K)
    assert len({plan.augment.op for plan in plans}) > 1 and {p.indices.shape[0] for p in plans} == {K}
    kw = {"label_logits": torch.randn(len(images), CLASSES, dtype=torch.float64)} if soft else {"labels": labels}
    together = unroll(student, starts, targets, images, syn_lr, plans, mode=mode, **kw)
    apart = [unroll(student, starts[k], targets[k], images, syn_lr, segment_plans(plans, k), mode=mode, **kw)
             for k in range(K)]
    assert together.loss == pytest.approx(sum(r.loss for r in apart) / K, rel=1e-12)
    for name in ["grad_images", "grad_lr"] + (["grad_label_logits"] if soft else []):
        mean = sum(getattr(r, name) for r in apart) / K
        assert torch.allclose(getattr(together, name), mean, rtol=1e-6, atol=1e-12), name
    assert torch.allclose(together.final_params, torch.stack([r.final_params for r in apart]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode, soft, segments, match", [
    ("checkpointed", False, 1, "final"), ("checkpointed", True, 1, "final"), ("tesla", False, 1, "final"),
    ("checkpointed", False, 2, "closest"), ("full", False, 1, "final"), ("full", True, 2, "closest")])
def test_compiled_steps_equal_the_eager_steps(problem, mode, soft, segments, match):
    """The student's steps in torch.func, traced whole by torch.compile (fullgraph: no graph breaks), with every
    DSA op: the same gradients as eager autograd, in the walk and in `full` (autograd differentiating the
    compiled step once). aot_eager runs what AOTAutograd traced without generating kernels (inductor's own code
    generation is checked on the GPU: bench/gpu_suite.py)."""
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    traced = []

    def backend(graph, example_inputs):
        traced.append(graph)
        return torch._dynamo.backends.debugging.aot_eager(graph, example_inputs)

    if segments > 1:
        theta_start, theta_target, plans = segments_near(theta_start, images, segments)
    assert len({plan.augment.op for plan in plans}) > 1
    kw = {"label_logits": torch.randn(len(images), CLASSES, dtype=torch.float64)} if soft else {"labels": labels}
    args = (student, theta_start, theta_target, images, syn_lr, plans)
    options = dict(mode=mode, match=match, allow_approximate=mode == "tesla", **kw)
    eager = unroll(*args, **options)
    compiled = unroll(*args, compiler=backend, **options)
    assert traced  # the steps went through the compiler
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-12) and compiled.matched_step == eager.matched_step
    for name in ["grad_images", "grad_lr"] + (["grad_label_logits"] if soft else []):
        assert_close(getattr(compiled, name), getattr(eager, name))
    assert torch.allclose(compiled.final_params, eager.final_params, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["checkpointed", "full"])
def test_steps_replayed_as_cuda_graphs_equal_the_eager_steps(problem, mode):
    """compiler="cudagraphs" (dynamo's backend: the traced steps replayed as CUDA graphs) copies each step's
    outputs out of the graph's memory, which the next replay reuses. On the CPU the graphs themselves are skipped,
    so this checks the rest of the path; the replays are checked on the GPU (bench/gpu_suite.py's cuda-tests)."""
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    args = (student, theta_start, theta_target, images, syn_lr, plans)
    eager = unroll(*args, labels=labels, mode=mode)
    replayed = unroll(*args, labels=labels, mode=mode, compiler="cudagraphs")
    assert replayed.loss == pytest.approx(eager.loss, rel=1e-12)
    assert_close(replayed.grad_images, eager.grad_images)
    assert_close(replayed.grad_lr, eager.grad_lr)


def slowed(steps: Steps, seconds: float) -> Steps:
    """The same step functions, each call `seconds` slower."""
    def slow(step):
        def run(*args):
            time.sleep(seconds)
            return step(*args)
        return run
    return Steps(*(slow(step) for step in steps))


@pytest.mark.parametrize("faster", ["eager", "compiled"])
def test_auto_with_a_compiler_keeps_compiled_steps_only_where_they_are_faster(problem, monkeypatch, faster):
    """With a compiler `auto` times each mode eager and compiled and keeps the fastest: compiling pays on a GPU
    and not on a CPU. The "compiled" steps here are the eager ones, and whichever side is slowed loses."""
    import mtt.unroll
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem
    slow = slowed(EAGER_STEPS, 0.05)
    monkeypatch.setattr(mtt.unroll, "EAGER_STEPS", slow if faster == "compiled" else EAGER_STEPS)
    monkeypatch.setattr(mtt.unroll, "_compiled_steps", lambda backend: EAGER_STEPS if faster == "compiled" else slow)
    choice = choose_backward(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, repeats=1,
                             compiler="test-backend")
    assert set(choice.seconds) == {"full", "checkpointed", "compiled full", "compiled checkpointed"}
    assert choice.compiled == (faster == "compiled") and choice.kept_graphs == 0
    assert choice.reason == (f"{'compiled ' if choice.compiled else ''}{choice.mode} was the fastest of full, "
                             "checkpointed, compiled full, compiled checkpointed; compiled by test-backend")


def test_auto_leaves_out_a_mode_that_does_not_compile(problem, monkeypatch):
    """A compiler that fails on `full`'s step (the one autograd differentiates afterwards) and not on the walk's:
    `auto` times compiled `checkpointed` only, and says why `full` was left out; when neither compiles, it runs
    eager and says why."""
    import mtt.unroll
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem

    def cannot(*args):
        raise CompileFailed("test-backend", "RuntimeError: no backward here")

    args = (student, theta_start, theta_target, images, syn_lr, plans)
    monkeypatch.setattr(mtt.unroll, "_compiled_steps", lambda backend: EAGER_STEPS._replace(graph=cannot))
    choice = choose_backward(*args, labels=labels, repeats=1, compiler="test-backend")
    assert set(choice.seconds) == {"full", "checkpointed", "compiled checkpointed"}
    assert choice.reason.endswith("; compiled by test-backend; full could not be compiled (RuntimeError: no "
                                  "backward here)")
    monkeypatch.setattr(mtt.unroll, "_compiled_steps", lambda backend: Steps(cannot, cannot, cannot))
    eager = choose_backward(*args, labels=labels, repeats=1, compiler="test-backend")  # a run goes on, eager
    assert not eager.compiled and set(eager.seconds) == {"full", "checkpointed"}
    assert eager.reason == (f"{eager.mode} was faster; full could not be compiled (RuntimeError: no backward here); "
                            "checkpointed could not be compiled (RuntimeError: no backward here)")


def test_a_compiler_that_fails_is_one_clear_error(problem):
    net, student, theta_start, theta_target, images, labels, syn_lr, plans = problem

    def broken(graph, example_inputs):
        raise RuntimeError("no C compiler here")

    with pytest.raises(CompileFailed, match="could not compile the student's steps: .*no C compiler here.*--compile"):
        unroll(student, theta_start, theta_target, images, syn_lr, plans, labels=labels, compiler=broken)

"""The demo's configurations (no training here: the demo itself takes minutes)."""
import dataclasses

from mtt.demo import QuickConfig
from mtt.distill import preset


def test_ci_configuration_is_the_small_one_without_evaluation_during_distillation():
    # The notebooks run this under CI: it must stay as cheap as it was.
    quick = QuickConfig()
    assert (quick.width, quick.num_experts, quick.expert_epochs_trained, quick.iterations, quick.syn_steps,
            quick.eval_epochs, quick.eval_repeats) == (32, 4, 20, 100, 10, 300, 5)
    assert quick.distill_overrides()["eval_repeats"] == 0
    assert quick.distill_config("cpu").eval_repeats == 0


def test_demo_configuration_evaluates_during_distillation_for_the_accuracy_curve():
    demo = QuickConfig.demo()
    config = demo.distill_config("cpu")
    config.validate()
    assert config.eval_every > 0 and config.eval_repeats > 0
    assert config.eval_every < config.iterations
    # The curve uses the table's protocol, so its last point is comparable with the table.
    assert config.eval_epochs == demo.eval_config().epochs
    # The final table stays honest: 5 networks each, the same epochs for both sets.
    assert demo.eval_config().repeats == 5


def test_demo_configuration_distils_at_the_preset_width_from_experts_long_enough():
    demo = QuickConfig.demo()
    config = demo.distill_config("cpu")
    assert demo.width == preset("digits", 1).width == config.width
    assert demo.expert_config().width == demo.width and demo.expert_config().parallel == demo.num_experts
    assert config.max_start_epoch + config.expert_epochs <= demo.expert_epochs_trained


def test_demo_takes_changes():
    demo = QuickConfig.demo(seed=3, iterations=10)
    assert demo.seed == 3 and demo.iterations == 10 and demo.width == QuickConfig.demo().width
    assert demo.distill_config("cpu").seed == 3
    assert dataclasses.replace(demo, curve_every=0).distill_config("cpu").eval_repeats == 0

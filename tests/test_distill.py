import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim as ts
from torchslim.core.models import build_model, mlp
from torchslim.errors import ConfigError
from torchslim.evaluate.metrics import agreement
from torchslim.train.fit import TrainConfig
from torchslim.train.losses import FeatureLoss, SoftTargetLoss, logits_of
from torchslim.transforms.distill import DistillConfig, capture, derive_student, distill, student_kwargs


def test_soft_target_loss_is_hintons_mix_of_labels_and_scaled_kl():
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 0])
    T = 3.0
    p_t = F.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean() * T * T
    assert SoftTargetLoss(T, 1.0)(s, t, y) == pytest.approx(float(kl), rel=1e-5)
    assert SoftTargetLoss(T, 0.0)(s, t, y) == pytest.approx(float(F.cross_entropy(s, y)), rel=1e-6)
    assert SoftTargetLoss(T, 0.5)(s, s.clone(), y) == pytest.approx(0.5 * float(F.cross_entropy(s, y)), rel=1e-5)
    # tuple, dict and attribute outputs carry the logits too
    assert SoftTargetLoss(T, 1.0)((s, "aux"), {"logits": t, "hidden": s}) == pytest.approx(float(kl), rel=1e-5)
    assert logits_of(type("Out", (), {"logits": t})()) is t
    with pytest.raises(ConfigError, match="cannot find the logits"):
        logits_of({"a": s, "b": t})


def test_soft_targets_gradients_keep_their_size_across_temperatures():
    s, t = torch.randn(64, 10) * 3, torch.randn(64, 10) * 3
    sizes = []
    for T in (2.0, 8.0, 20.0):
        x = s.clone().requires_grad_()
        SoftTargetLoss(T, 1.0)(x, t).backward()
        sizes.append(float(x.grad.norm()))
    assert max(sizes) / min(sizes) < 4  # unscaled, the gradient would shrink as 1 / T (10x here)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SoftTargetLoss(temperature=0), "temperature=0"),
        (lambda: SoftTargetLoss(temperature=-2.0), "temperature=-2.0"),
        (lambda: SoftTargetLoss(alpha=1.5), "alpha=1.5"),
        (lambda: TrainConfig(temperature=0.0), "temperature"),
        (lambda: SoftTargetLoss()(torch.zeros(2, 10), torch.zeros(2, 5)), "same number of classes"),
        (lambda: FeatureLoss((2, 8, 4, 4), (2, 8), "hint"), "different ranks"),
        (lambda: FeatureLoss((2, 8), (2, 8), "attention"), "attention transfer compares conv feature maps"),
        (lambda: FeatureLoss((2, 8), (2, 8), "cosine"), "feature loss kind"),
        (lambda: DistillConfig(features=(("a",),)), "pairs"),
        (lambda: DistillConfig(features=(("a", "b"),), cache_teacher=True), "cache_teacher"),
        (lambda: DistillConfig(feature_kind="l1"), "feature_kind"),
    ],
)
def test_bad_losses_and_configs_are_clear_errors(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_feature_losses_project_widths_and_compare_attention_maps():
    hint = FeatureLoss((2, 8, 6, 6), (2, 16, 3, 3), "hint")
    assert isinstance(hint.projection, nn.Conv2d) and hint.projection.in_channels == 8
    fs, ft = torch.randn(2, 8, 6, 6, requires_grad=True), torch.randn(2, 16, 3, 3)
    hint(fs, ft).backward()
    assert fs.grad is not None and hint.projection.weight.grad is not None
    dense = FeatureLoss((4, 32), (4, 300), "hint")
    assert isinstance(dense.projection, nn.Linear) and dense(torch.randn(4, 32), torch.randn(4, 300)) > 0
    same = FeatureLoss((4, 10), (4, 10), "hint")
    assert same.projection is None and same(torch.ones(4, 10), torch.ones(4, 10)) == 0
    att = FeatureLoss((2, 8, 6, 6), (2, 64, 6, 6), "attention")
    f = torch.rand(2, 8, 6, 6)
    assert att(f, f.repeat(1, 8, 1, 1)) == pytest.approx(0.0, abs=1e-6)  # the same map, any width
    assert att(f, torch.rand(2, 64, 6, 6)) > 0 and not list(att.parameters())


def test_capture_records_named_outputs_without_changing_the_model(digits_mlp):
    x = torch.randn(3, 1, 8, 8)
    before = digits_mlp(x)
    with capture(digits_mlp, ["fc1", "fc2"]) as feats:
        out = digits_mlp(x)
    assert torch.equal(out, before) and feats["fc1"].shape == (3, 300) and feats["fc2"].shape == (3, 100)
    assert not digits_mlp.fc1._forward_hooks  # removed afterwards
    with pytest.raises(ConfigError, match="no layer 'fc4'.*did you mean.*fc"):
        with capture(digits_mlp, ["fc4"]):
            pass


def _student():
    torch.manual_seed(1)
    return mlp(in_features=64, width=24, depth=1)


def test_distill_trains_a_smaller_student_towards_its_teacher_and_the_cache_changes_nothing(digits, digits_mlp):
    train = TrainConfig(epochs=6, lr=1e-2, temperature=4.0, distill_weight=0.7)
    student = _student()
    before = agreement(student, digits_mlp, digits.eval_loader())
    teacher_state = copy.deepcopy(digits_mlp.state_dict())
    result = distill(student, DistillConfig(train=train), digits, teacher=digits_mlp)
    assert result.history[-1] < result.history[0] and result.seconds > 0
    assert agreement(student, digits_mlp, digits.eval_loader()) > max(0.85, before)
    cached = _student()
    distill(cached, DistillConfig(train=train, cache_teacher=True), digits, teacher=digits_mlp)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), cached.state_dict().values()))
    assert not digits_mlp.training and all(torch.equal(v, teacher_state[k]) for k, v in digits_mlp.state_dict().items())


def test_feature_pairs_train_a_projection_and_dict_outputs_work(digits, digits_mlp):
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _student()

        def forward(self, x):
            return {"logits": self.net(x), "extra": 1}

    student = DictOut()
    train = TrainConfig(epochs=2, lr=3e-3)
    result = distill(
        student, DistillConfig(train=train, features=(("net.hidden.0", "fc1"),)), digits, teacher=digits_mlp
    )
    assert result.projections == 1 and result.history[-1] < result.history[0]


@pytest.mark.parametrize(
    "student, config, message",
    [
        (
            lambda: mlp(in_features=64, width=8, depth=1, num_classes=5),
            DistillConfig(),
            "teacher predicts 10 classes but the student 5",
        ),
        (_student, DistillConfig(features=(("hidden.7", "fc1"),)), "student has no layer 'hidden.7'"),
        (_student, DistillConfig(features=(("hidden.0", "fc9"),)), "teacher has no layer 'fc9'"),
    ],
)
def test_distill_refuses_mismatched_pairs_before_training(digits, digits_mlp, student, config, message):
    model = student()
    kept = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=message):
        distill(model, config, digits, teacher=digits_mlp)
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())


def test_students_derive_from_zoo_teachers_by_width_and_depth():
    assert derive_student("resnet_mini", {}, width=0.5).fc.in_features == 64  # 4 x (32 / 2)
    assert student_kwargs("resnet_mini", {"width": 32}, width=0.25) == {"width": 8}
    small = derive_student("mlp", {"width": 1200}, width=2 / 3, depth=1)
    assert [layer.out_features for layer in small.hidden] == [800]
    shallow = derive_student("resnet_mini", {}, width=0.5, depth=2)  # drops the last block
    assert (
        not hasattr(shallow, "layer3")
        and shallow.fc.in_features == 32
        and shallow(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    )
    mobile = derive_student("mobilenet_mini", {}, width=1.0, depth=3)
    assert len(mobile.blocks) == 3 and mobile(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    for bad, message in (
        (lambda: derive_student("lenet5", {}), "no width argument"),
        (lambda: derive_student("resnet_mini", {}, width=0), "width=0"),
        (lambda: derive_student("concat_net", {}, depth=1), "fixed depth"),
        (lambda: derive_student("resnet_mini", {"blocks": 2}, depth=3), "depth=3"),
        (lambda: build_model("resnet_mini", blocks=0), "1 to 3 blocks"),
        (lambda: derive_student("mlp", {"depth": 2}, depth=3), "depth=3"),
        (lambda: derive_student("vgg", {}), "unknown model"),
    ):
        with pytest.raises(ConfigError, match=message):
            bad()
    assert ts.derive_student is derive_student and ts.distill is distill


DISTILL_RECIPE = """
name: tiny_distill
model: {name: mlp, kwargs: {in_features: 64, width: 64, depth: 2}}
data: {name: digits, batch_size: 64, eval_batch_size: 200, calib_size: 128}
baseline: {epochs: 6, lr: 0.003}
steps:
  - distill:
      width: 0.5
      depth: 1
      train: {epochs: 6, lr: 0.01, temperature: 4, distill_weight: 0.7}
      features: [[hidden.0, hidden.1]]
  - prune: {sparsity: 0.5, finetune: null}
latency: {batches: [4], repeats: 3, warmup: 1}
outputs: {dir: "OUT", artifact: "{name}.tslim"}
"""


def test_recipe_distill_step_reports_teacher_and_students_side_by_side(tmp_path, compress_cli):
    output, report = compress_cli(DISTILL_RECIPE)
    d = report["distillation"]
    assert d["student"] == {"name": "mlp", "kwargs": {"in_features": 64, "width": 32, "depth": 1}}
    assert d["projections"] == 1  # the student's 32 hidden units projected onto the teacher's 64
    assert d["teacher"]["params"] > d["student_distilled"]["params"] == d["student_alone"]["params"]
    assert d["student_distilled"]["accuracy"] > 0.75 and d["student_alone"]["accuracy"] > 0.5
    assert report["compressed"]["params"] == d["student_distilled"]["params"]  # the student was then pruned and saved
    assert "distillation" in output and "## Distillation" in (tmp_path / "report.md").read_text()
    restored = ts.load(tmp_path / "tiny_distill.tslim")  # the file names the student's zoo builder
    assert [layer.out_features for layer in restored.hidden] == [32]


@pytest.mark.parametrize(
    "step, message",
    [
        ("  - distill: {width: 0.5, train: {temperature: 0}}\n", "temperature"),
        ("  - distill: {width: 0.5, student: {name: lenet5}}\n", "exactly one of student"),
        ("  - distill: {depth: 1, student: {name: lenet5}}\n", "depth derives"),
        ("  - distill: {width: 0.5, depth: 3}\n", "depth=3"),
    ],
)
def test_bad_distill_steps_are_recipe_errors(step, message):
    from torchslim.errors import RecipeError
    from torchslim.recipe.schema import parse_recipe

    text = DISTILL_RECIPE.replace(DISTILL_RECIPE.split("steps:\n")[1].split("latency")[0], step)
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text)
    moved = DISTILL_RECIPE.replace("  - prune: {sparsity: 0.5, finetune: null}\n", "").replace(
        "steps:\n", "steps:\n  - prune: {sparsity: 0.5}\n"
    )
    with pytest.raises(RecipeError, match=r"steps: \['prune', 'distill'\]: steps run in the order \['distill'"):
        parse_recipe(moved)


def test_a_student_with_other_classes_stops_the_recipe_with_a_clear_error(tmp_path):
    from typer.testing import CliRunner

    from torchslim.cli import app

    text = DISTILL_RECIPE.replace(
        "      width: 0.5\n      depth: 1\n", "      student: {name: mlp, kwargs: {in_features: 64, num_classes: 5}}\n"
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text.replace("OUT", str(tmp_path)))
    printed = CliRunner().invoke(app, ["compress", str(recipe)], env={"COLUMNS": "250"})
    assert printed.exit_code == 2 and "teacher predicts 10 classes but the student 5" in printed.output
    assert not (tmp_path / "tiny_distill.tslim").exists()


def test_relation_loss_compares_token_relations_across_widths():
    """MiniLM relations: zero for the same features, defined across different widths, and it
    pulls a student's token relations towards the teacher's."""
    from torchslim.train.losses import FeatureLoss

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 7, 32, generator=g)
    loss = FeatureLoss((2, 7, 16), (2, 7, 32), "relation")
    assert loss.relation_heads == 8 and loss.projection is None
    assert float(FeatureLoss((2, 7, 32), (2, 7, 32), "relation")(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 7, 16, generator=g, requires_grad=True)
    first = float(loss(student, teacher).detach())
    opt = torch.optim.Adam([student], lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        loss(student, teacher).backward()
        opt.step()
    assert float(loss(student, teacher).detach()) < 0.3 * first
    with pytest.raises(ConfigError, match="token features"):
        FeatureLoss((2, 8), (2, 8), "relation")
    with pytest.raises(ConfigError, match="feature kind 'nope'"):
        ts.DistillConfig(features=(("a", "b", "nope"),))

"""qat.autoquant: sensitivity, exact allocation under a budget, the config it writes."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import yaml
from test_export import batches, build, synthetic, train
from torch import nn

import qat
from qat.auto import InfeasibleBudget, Problem, autoquant, brute_force, solve
from qat.auto.layers import find_layers, group_layers
from qat.nn.base import weight_quantizers
from qat.summary import model_size

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained() -> dict[str, nn.Module]:
    out = {}
    for name in ("textcnn", "bilstm"):
        m = build(name)
        train(m, 15)
        out[name] = m.eval()
    return out


def calib(n: int = 64, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    return batches(synthetic(n, seed), 32)


def weight_bits(model: nn.Module) -> dict[str, tuple[int, str]]:
    return {f"{m}.{p}": (q.spec.bits, q.spec.mode) for m, _, p, q in weight_quantizers(model)}


# ---- the integer program ------------------------------------------------------------------
def _random_problem(rng: random.Random, groups: int, options: int, kinds: int) -> Problem:
    costs = [[rng.uniform(-0.1, 1.0) for _ in range(options)] for _ in range(groups)]
    usage = {f"k{i}": [[rng.randint(1, 60) for _ in range(options)] for _ in range(groups)]
             for i in range(kinds)}
    caps = {k: float(rng.randint(sum(min(r) for r in u), sum(max(r) for r in u)))
            for k, u in usage.items()}
    return Problem(costs, usage, caps)


@pytest.mark.parametrize("seed", range(12))
def test_solver_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    p = _random_problem(rng, groups=rng.randint(1, 6), options=rng.randint(1, 4),
                        kinds=rng.randint(1, 2))
    best = brute_force(p)
    if best is None:
        with pytest.raises(InfeasibleBudget):
            solve(p)
        return
    got = solve(p)
    assert p.fits(got)
    assert p.total(got) == pytest.approx(p.total(best), rel=1e-9, abs=1e-12)


def test_solver_budget_on_the_boundary_and_infeasible() -> None:
    p = Problem([[0.0, 1.0], [0.0, 5.0]], {"bytes": [[10, 5], [10, 5]]}, {"bytes": 15.0})
    assert solve(p) == [1, 0]  # exactly 15: the cheaper of the two ways to fit
    p.caps["bytes"] = 9.0
    with pytest.raises(InfeasibleBudget, match="smallest assignment needs 10"):
        solve(p)


# ---- budgets on real (toy) models -----------------------------------------------------------
@pytest.mark.parametrize("zeros", ["codes", "structural"])
@pytest.mark.parametrize("budget", [0.15, 0.2, 0.3, 0.5])
def test_size_budget_is_respected_exactly(trained, budget: float, zeros: str) -> None:
    """The prepared model's size is the predicted size (``codes``: exactly; ``structural``: at
    most, also after the weights moved), within the budget, and the choice is the brute-force
    optimum of the measured scores."""
    model = trained["textcnn"]
    config, report = autoquant(model, calib(), budget=budget, calibration_batches=2,
                               zeros=zeros)
    prepared = qat.prepare(model, config)[0]
    size = model_size(prepared)
    assert size <= report.predicted_bytes <= budget * report.float_bytes
    if zeros == "codes":
        assert size == report.predicted_bytes
    else:
        moved = copy.deepcopy(model)
        with torch.no_grad():  # "training" moves every weight that is not exactly zero
            for p in moved.parameters():
                p.add_(torch.randn_like(p) * p.std() * (p != 0))
        assert model_size(qat.prepare(moved, config)[0]) <= report.predicted_bytes
    assert report.float_bytes == model_size(model)
    p = Problem([[r.sensitivity[c] for c in report.labels] for r in report.rows],
                {"bytes": [[r.nbytes[c] for c in report.labels] for r in report.rows]},
                {"bytes": float(int(budget * report.float_bytes) - report.fixed_bytes)})
    best = brute_force(p)
    assert report.total_sensitivity == pytest.approx(p.total(best), rel=1e-9, abs=1e-15)
    chosen = {r.group: r.chosen for r in report.rows}
    bits = weight_bits(prepared)
    names = {"int8": (8, "int"), "int4": (4, "int"), "ternary": (2, "ternary")}
    assert bits["classifier.weight"] == names[chosen["classifier"]]
    assert bits["convs.0.weight"] == bits["convs.1.weight"] == names[chosen["convs.0 (+1)"]]


def test_bits_and_bitops_budgets(trained) -> None:
    model = trained["bilstm"]
    config, report = autoquant(model, calib(), budget={"bits": 5.0, "bitops": 0.02},
                               act_bits=(8, 4), calibration_batches=2)
    assert report.used["avg_bits"] <= 5.0
    assert report.used["bitops_ratio"] <= 0.02 + 1e-12
    numel = {r.group: r.params for r in report.rows}
    wbits = {"int8": 8, "int4": 4, "ternary": 2}
    avg = sum(wbits[r.chosen.split("/")[0]] * numel[r.group] for r in report.rows) / sum(
        numel.values())
    assert avg == pytest.approx(report.used["avg_bits"])
    prepared = qat.prepare(model, config)[0]
    lstm = next(r for r in report.rows if r.group == "lstm")
    a = int(lstm.chosen.split("/a")[1])
    assert prepared.lstm.input_quant.spec.bits == a  # the activation width is applied too
    assert model_size(prepared) == report.predicted_bytes


def test_infeasible_budget_is_one_clear_error(trained) -> None:
    with pytest.raises(ValueError, match=r"cannot be met.*smallest choice is .* B"):
        autoquant(trained["textcnn"], calib(), budget=0.01, calibration_batches=1)


@pytest.mark.parametrize("kwargs, match", [
    ({"budget": 1.5}, "fraction"), ({"budget": 0.2, "kind": "watts"}, "kind 'watts'"),
    ({"budget": 0.2, "method": "magic"}, "method='magic'"),
    ({"budget": 0.2, "weight_bits": (9,)}, "weight width 9"),
    ({"budget": 0.2, "act_bits": (1,)}, "activation width 1"),
    ({"budget": 0.2, "calibration_batches": 0}, "calibration_batches"),
    ({"budget": 0.2, "config": {"weight": None}}, "quantizes no weight"),
    ({"budget": 0.2, "groups": ["nothing*"]}, "matches no quantizable layer"),
])
def test_bad_arguments(trained, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        autoquant(trained["textcnn"], calib(32), **kwargs)


def test_callers_model_untouched(trained) -> None:
    model = trained["bilstm"]
    before = copy.deepcopy(model.state_dict())
    autoquant(model, calib(), budget=0.3, calibration_batches=1, method="hessian",
              hutchinson_samples=2)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("quant" in type(m).__name__.lower() for m in model.modules())


# ---- sensitivity ------------------------------------------------------------------------------
class Fragile(nn.Module):
    """Embedding -> a -> fragile -> c -> classifier. ``fragile``'s rows each hold one huge
    weight on an input that is always zero (ReLU of a negative constant), so a per-row scale
    set by it rounds the small weights that carry the signal to zero: it alone ruins the
    output at 4 bits and below, while its float function is ordinary."""

    def __init__(self, vocab: int = 60, d: int = 24, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embedding = nn.Embedding(vocab, d)
        self.a = nn.Linear(d, d)
        self.fragile = nn.Linear(d, d)
        self.c = nn.Linear(d, d)
        self.classifier = nn.Linear(d, classes)
        with torch.no_grad():
            self.a.weight[0].zero_()
            self.a.bias[0] = -1.0  # feature 0 is always 0 after the ReLU
            self.fragile.weight[:, 0] = 40.0

    def forward(self, input_ids, attention_mask=None, **kw):  # noqa: ANN001
        h = self.embedding(input_ids).mean(1)
        h = torch.relu(self.a(h))
        h = torch.relu(self.fragile(h))
        return self.classifier(torch.relu(self.c(h)))


@pytest.mark.parametrize("method, estimator", [("measured", "ggn"), ("hessian", "ggn"),
                                               ("hessian", "hvp")])
def test_sensitivity_ranks_the_fragile_layer_first(method: str, estimator: str) -> None:
    model = Fragile()
    train(model, 40)
    config, report = autoquant(model.eval(), calib(), budget=0.5, method=method,
                               estimator=estimator, hutchinson_samples=8, calibration_batches=2)
    # (at ternary the second-order estimate of the fragile layer falls below the embedding's:
    # all its small weights removed is a small perturbation in norm, a large one in effect)
    for fmt in ("int4", "ternary") if method == "measured" else ("int4",):
        ranked = sorted(report.rows, key=lambda r: -r.sensitivity[fmt])
        assert ranked[0].group == "fragile", [(r.group, r.sensitivity[fmt]) for r in ranked]
    # a budget that affords one 8-bit layer of its size gives it to the fragile one
    row = next(r for r in report.rows if r.group == "fragile")
    budget = report.uniform["int4/a8"]["bytes"] + row.nbytes["int8"] - row.nbytes["int4"]
    config, report = autoquant(model, calib(), budget=budget, kind="bytes", method=method,
                               estimator=estimator, hutchinson_samples=8,
                               calibration_batches=2, weight_bits=(4, 8))
    assert {r.group: r.chosen for r in report.rows}["fragile"] == "int8"


def test_methods_agree_on_order_of_formats(trained) -> None:
    """Every group is more sensitive at fewer bits, by either method."""
    for method in ("measured", "hessian"):
        _, report = autoquant(trained["textcnn"], calib(), budget=0.3, method=method,
                              calibration_batches=2, hutchinson_samples=4)
        for r in report.rows:
            s = r.sensitivity
            assert s["int8"] < s["int4"] < s["ternary"], (method, r)


# ---- groups and the config ------------------------------------------------------------------
def test_groups_move_together() -> None:
    m = build("textcnn")
    pm = qat.prepare(m, {})[0]
    pm(**{k: v for k, v in calib(8)[0].items() if k != "labels"})  # ties the convs' inputs
    groups = group_layers(pm, find_layers(pm))
    names = [g.names for g in groups]
    assert ["convs.0", "convs.1"] in names and ["embedding"] in names
    by = {g.names[0]: g for g in groups}
    assert by["convs.0"].act_choice and not by["embedding"].act_choice
    assert "shared input" in by["convs.0"].why
    merged = group_layers(pm, find_layers(pm), patterns=["c*"])  # convs and classifier
    assert [g.names for g in merged] == [["embedding"], ["convs.0", "convs.1", "classifier"]]


def test_bert_projections_are_one_group_and_rules_are_patterns() -> None:
    pytest.importorskip("transformers")
    model = build("bert")
    train(model, 5)
    config, report = autoquant(model.eval(), calib(), budget=0.22, calibration_batches=1,
                               zeros="codes")
    qkv = [r for r in report.rows if r.group.endswith("attention.self.query (+2)")]
    assert len(qkv) == 2 and all(len(r.layers) == 3 for r in qkv)
    assert all(r.sensitivity.keys() == {"int8", "int4", "ternary"} for r in report.rows)
    assert len(config["overrides"]) < len(report.rows)  # patterns, not one rule per layer
    prepared = qat.prepare(model, config)[0]
    assert model_size(prepared) == report.predicted_bytes
    bits = weight_bits(prepared)
    for r in qkv:
        got = {bits[f"{n}.weight"] for n in r.layers}
        assert len(got) == 1


def test_yaml_is_a_quant_config_that_trains(trained, tmp_path) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    model = trained["textcnn"]
    config, report = autoquant(model, calib(), budget=0.2, calibration_batches=2)
    text = report.yaml(config, unit="epoch", start=0)
    assert text.startswith("# automatic mixed precision")
    node = yaml.safe_load(text)
    assert node["_target_"] == "qat.callbacks.QuantizationCallback"
    cb = instantiate(OmegaConf.create(node))
    prepared = qat.prepare(model, cb.config)[0]
    assert weight_bits(prepared) == weight_bits(qat.prepare(model, config)[0])
    assert model_size(prepared) == report.predicted_bytes
    table = str(report)
    for r in report.rows:
        assert r.group in table
    assert "uniform int4/a8" in table and "chosen:" in table


def test_sparsity_counts_in_sizes(trained) -> None:
    """Sizes taken with the weights magnitude-pruned as announced equal model_size of the
    model pruned so; the same budget then affords more bits."""
    model = trained["textcnn"]
    dense_cfg, dense = autoquant(model, calib(), budget=0.2, calibration_batches=1,
                                 zeros="codes")
    cfg, sparse = autoquant(model, calib(), budget=0.2, calibration_batches=1, zeros="codes",
                            sparsity={"convs.*": 0.8, "classifier": 0.8})
    assert sparse.used["avg_bits"] >= dense.used["avg_bits"]
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("convs.0", "convs.1", "classifier"):
            w = pruned.get_submodule(name).weight
            k = round(0.8 * w.numel())
            w.view(-1)[w.abs().flatten().argsort(stable=True)[:k]] = 0
    assert model_size(qat.prepare(pruned, cfg)[0]) == sparse.predicted_bytes


def test_uniform_rows_are_what_the_allocation_pays(trained) -> None:
    """The uniform formats the report compares against: their bytes are the sum of the groups'
    bytes at that format, and a uniform config prepared for real has exactly that size."""
    model = trained["textcnn"]
    _, report = autoquant(model, calib(), budget=0.5, calibration_batches=1)
    for label, u in report.uniform.items():
        fmt = label.split("/")[0]
        assert u["bytes"] == report.fixed_bytes + sum(r.nbytes[fmt] for r in report.rows)
    w4 = qat.prepare(model, {"weight": {"bits": 4}})[0]
    assert model_size(w4) == report.uniform["int4/a8"]["bytes"]


def test_expected_sparsity_from_a_prune_config() -> None:
    from qat.auto import expected_sparsity

    node = {"_target_": "qat.prune.PruningCallback", "targets": ["type:Conv1d"],
            "schedule": {"kind": "cubic", "initial_sparsity": 0.0, "final_sparsity": 0.8}}
    got = expected_sparsity(node, build("textcnn"))
    assert got == {"convs.0": 0.8, "convs.0.*": 0.8, "convs.1": 0.8, "convs.1.*": 0.8}
    optional = {**node, "targets": ["type:Conv1d?", "type:LSTM?"]}  # '?': may match none
    assert expected_sparsity(optional, build("textcnn")) == got
    one_shot = {**node, "schedule": {"kind": "one_shot", "sparsity": 0.5}}
    assert set(expected_sparsity(one_shot, build("textcnn")).values()) == {0.5}
    assert expected_sparsity({}, build("textcnn")) is None
    assert expected_sparsity(None, build("textcnn")) is None


@pytest.mark.parametrize("name", ["bilstm", "transformer"])
def test_predicted_size_is_model_size_for_lstm_and_attention(name: str) -> None:
    """LSTM weights (every gate) and attention in-projections are counted as model_size
    counts them."""
    model = build(name)
    config, report = autoquant(model.eval(), calib(), budget=0.25, calibration_batches=1,
                               zeros="codes")
    assert model_size(qat.prepare(model, config)[0]) == report.predicted_bytes

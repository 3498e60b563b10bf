"""A method from outside krunch: registered from this test module, it plans, allocates, compresses, saves and
loads without any other file knowing its name."""

from __future__ import annotations

from typing import Any, Literal

import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

import krunch
from krunch import methods
from krunch.errors import KrunchError
from krunch.methods import CompressionMethod, LayerKind
from krunch.runtime.base import CompressedLayer, quantize_config_json
from krunch.spec import JobSpec


class KeptRowsLinear(CompressedLayer):
    """y[rows] = W[rows] x + b[rows], the other outputs only their bias: the `rank` rows kept."""

    method = "keep-rows"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, quantize_config: dict | None = None) -> None:
        super().__init__(quantize_config)
        self.in_features, self.out_features, self.rank, self.has_bias = in_features, out_features, rank, bias
        self.add_factor("rows", (rank, in_features))
        self.register_buffer("index", torch.zeros(rank, dtype=torch.long))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "bias": self.has_bias, "quantize_config": quantize_config_json(self.quantize_config)}  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.out_features)
        out[..., self.index] = self.linear(x, "rows")
        return out if self.bias is None else out + self.bias

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.out_features, self.in_features)
        dense[self.index] = self.factor("rows")
        return dense


class KeepRowsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    order: Literal["norm", "first"] = "norm"


class KeepRows(CompressionMethod):
    name = "keep-rows"
    description = "keep the output rows of largest norm (or the first ones)"
    kinds = (LayerKind.LINEAR,)
    options = KeepRowsOptions

    def rank_caps(self, plan):
        return [plan.weight_shape[0]]

    def params_for_ranks(self, plan, ranks):
        return ranks[0] * plan.weight_shape[1]

    def spectra(self, plan, weight, gram):
        return [weight.detach().double().norm(dim=1).sort(descending=True).values]  # dropped rows' energy: the tail

    def build(self, plan, module, ranks, gram):
        norms = module.weight.norm(dim=1)
        order = norms.argsort(descending=True) if plan.options.order == "norm" else torch.arange(len(norms))
        index = order[: ranks[0]].sort().values
        layer = KeptRowsLinear(module.in_features, module.out_features, ranks[0], module.bias is not None,
                               quantize_config_json(plan.quantize))  # fmt: skip
        layer.index.copy_(index)
        layer.set_factor("rows", module.weight[index])
        return layer.finish_from(module)


@pytest.fixture
def keep_rows():
    methods.register(KeepRows)
    yield KeepRows
    methods.unregister("keep-rows")


def model() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 32))
    with torch.no_grad():  # rows of decaying norm, so that which rows are kept matters
        for layer in (net[0], net[2]):
            layer.weight.mul_(torch.logspace(0, -2, layer.out_features)[torch.randperm(layer.out_features)][:, None])
    return net


def test_a_registered_method_runs_end_to_end_and_reloads(keep_rows, tmp_path):
    net, x = model(), torch.randn(5, 48)
    recipe = {"rules": [{"match": "0", "method": "keep-rows", "rank": {"fixed": 16}, "options": {"order": "norm"}},
                        {"match": "2", "method": "keep-rows", "rank": {"energy": 0.9}}]}  # fmt: skip
    result = krunch.compress(net, recipe, progress=False)
    first, second = result.module[0], result.module[2]
    assert isinstance(first, KeptRowsLinear) and first.rank == 16
    expected_rows = net[0].weight.norm(dim=1).argsort(descending=True)[:16].sort().values
    assert torch.equal(first.index, expected_rows)
    kept_energy = second.to_dense().pow(2).sum() / net[2].weight.pow(2).sum()
    assert kept_energy >= 0.9 and second.rank < 32  # rank read from the method's own spectrum
    dense_first = nn.Linear(48, 64)
    dense_first.load_state_dict(net[0].state_dict())
    with torch.no_grad():
        dense_first.weight[[i for i in range(64) if i not in set(expected_rows.tolist())]] = 0
    assert torch.allclose(first(x), dense_first(x), atol=1e-6)
    assert {row["method"] for row in result.layers()} == {"keep-rows"}

    krunch.save(result, tmp_path / "kept")
    loaded = krunch.load(tmp_path / "kept", model=model())
    assert isinstance(loaded[0], KeptRowsLinear)
    assert torch.allclose(loaded(x), result.module(x), atol=1e-6)


def test_the_budget_allocates_a_registered_method_and_int8_stores_its_factor(keep_rows):
    net = model()
    result = krunch.compress(net, {"target": {"paramRatio": 0.5}, "rules": [{"match": "*", "method": "keep-rows"}],
                                   "quantize": {"bits": 8}}, progress=False)  # fmt: skip
    layers = [result.module[0], result.module[2]]
    assert all(isinstance(layer, KeptRowsLinear) for layer in layers)
    assert sum(layer.rank * layer.in_features for layer in layers) <= 0.5 * (48 * 64 + 64 * 32)
    assert all(layer.kernels() == {"rows": layer.rows.kernel()[0].value} for layer in layers)


def test_a_registered_method_validates_its_rules_and_shows_in_the_schema(keep_rows):
    with pytest.raises(KrunchError, match=r"recipe\.rules\[0\]\.options\.order: Input should be 'norm' or 'first'"):
        krunch.compress(model(), {"rules": [{"match": "0", "method": "keep-rows", "rank": {"fixed": 4}, "options": {"order": "x"}}]})
    with pytest.raises(KrunchError, match=r"recipe\.rules\[0\]\.method: keep-rows applies to Linear, but 0 is a Conv2d"):
        krunch.compress(nn.Sequential(nn.Conv2d(3, 8, 3)), {"rules": [{"match": "0", "method": "keep-rows", "rank": {"fixed": 4}}]})
    with pytest.raises(KrunchError, match=r"options: method svd takes no options"):
        krunch.compress(model(), {"rules": [{"match": "0", "method": "svd", "rank": {"fixed": 4}, "options": {"order": "x"}}]})
    schema = JobSpec.model_json_schema()
    assert "keep-rows" in schema["$defs"]["Rule"]["properties"]["method"]["enum"]


def test_names_are_checked_and_built_ins_cannot_be_replaced():
    class Svd(KeepRows):
        name = "svd"

    class Bad(KeepRows):
        name = "Bad Name"

    with pytest.raises(ValueError, match="already registered"):
        methods.register(Svd)
    with pytest.raises(ValueError, match="lower-case"):
        methods.register(Bad)
    with pytest.raises(ValueError, match="built in"):
        methods.unregister("svd")
    assert "keep-rows" not in methods.names()

"""The conformance kit names what it did not test, and names its failures."""

from __future__ import annotations

import pytest
import torch

from petlsearch.plugins import create_plugin
from petlsearch.plugins.mechanisms.hooks import WeightDelta
from petlsearch.plugins.testing import CHECKS, ConformanceError, PluginConformance, check_plugin, run_check


def test_checks_that_do_not_apply_are_skipped_with_their_reason() -> None:
    report = check_plugin(create_plugin("adapter"), families=("bert",))  # not mergeable
    skipped = {(check, family): reason for check, family, reason in report.skipped}
    assert set(skipped) == {("check_merge", "bert")} and "not mergeable" in skipped["check_merge", "bert"]
    assert ("check_merge", "bert") not in report.passed and ("check_gate_zero", "bert") in report.passed
    prefix = check_plugin(create_plugin("prefix_tuning"), families=("bert",))
    assert ("check_identity_at_init", "bert") in {(c, f) for c, f, _ in prefix.skipped}


def test_a_declared_known_failure_is_reported_as_skipped() -> None:
    report = check_plugin(create_plugin("lora"), families=("bert",), expected_failures={"check_merge": "known"})
    assert ("check_merge", "bert", "known") in report.skipped


class _Transposed(WeightDelta):
    """An update in the wrong layout: (out, in) on every layer, wrong on GPT-2's Conv1D (in, out)."""

    def __init__(self, site, cfg) -> None:
        super().__init__(site)
        self.d = torch.nn.Parameter(torch.zeros(site.out_features, site.in_features))

    def delta_weight(self) -> torch.Tensor:
        return self.d


def test_an_exception_inside_a_plugin_becomes_one_named_failure() -> None:
    lora = type(create_plugin("lora"))
    wrong = type("Transposed", (lora,), {
        "name": "transposed", "mergeable": False,
        "count": lambda self, site, cfg: site.in_features * site.out_features,
        "build": lambda self, site, cfg: _Transposed(site, cfg)})
    with pytest.raises(ConformanceError, match=r"\[transposed\] check_gate_zero on gpt2: raised \w+Error: .*"
                                               r"shape of the parameter"):
        run_check(wrong(), "check_gate_zero", "gpt2")


def test_a_plugin_that_forgets_a_constructor_argument_fails_the_clone_check() -> None:
    lora = type(create_plugin("lora"))

    def init(self, roles=("attn.q",)) -> None:
        self.hidden_roles = roles  # stored under another name: clone() cannot read it back

    forgetful = type("Forgetful", (lora,), {"name": "forgetful", "__init__": init,
                                            "sites": lambda self, graph: lora(roles=self.hidden_roles).sites(graph)})
    with pytest.raises(ConformanceError, match=r"\[forgetful\] check_clone on bert: "):
        run_check(forgetful(roles=("attn.v",)), "check_clone", "bert")


class TestAdapterThroughThePytestBase(PluginConformance):
    """The pytest base runs one test per check; the merge check, which does not apply, is skipped."""

    families = ("bert",)

    @pytest.fixture
    def plugin(self):
        return create_plugin("adapter")


def test_the_pytest_base_has_a_test_per_check() -> None:
    tests = {n for n in dir(PluginConformance) if n.startswith("test_")}
    assert tests == {"test_" + name.removeprefix("check_") for name in CHECKS}
    with pytest.raises(pytest.skip.Exception, match="not mergeable"):
        TestAdapterThroughThePytestBase().test_merge(create_plugin("adapter"))

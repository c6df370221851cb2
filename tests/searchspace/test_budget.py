from __future__ import annotations

import pytest

from petlsearch.errors import BudgetError
from petlsearch.searchspace.budget import Budget, parse_memory, parse_params


@pytest.mark.parametrize("spec, fraction, params", [
    ("0.01%", 1e-4, None), ("1%", 0.01, None), ("1e-4", 1e-4, None), ("0.001", 1e-3, None),
    ("25k", None, 25_000), ("1.2M", None, 1_200_000), ("300", None, 300), ("2B", None, 2_000_000_000),
])
def test_parameter_forms(spec: str, fraction: float | None, params: int | None) -> None:
    f, p = parse_params(spec)
    assert p == params
    assert f == pytest.approx(fraction) if fraction is not None else f is None


@pytest.mark.parametrize("spec, bytes_", [("2GiB", 2 * 2**30), ("500MB", 500_000_000), ("512MiB", 2**29),
                                          ("1.5GB", 1_500_000_000)])
def test_memory_forms(spec: str, bytes_: int) -> None:
    assert parse_memory(spec) == bytes_
    assert Budget.parse(spec).memory == bytes_  # a memory string given as --budget is a memory budget


@pytest.mark.parametrize("bad", ["", "abc", "-1%", "0%", "150%", "1e400", "12 parameters", "5kk", "nan", "2GiBs"])
def test_bad_budgets_are_one_line_errors(bad: str) -> None:
    with pytest.raises(BudgetError) as info:
        Budget.parse(bad)
    assert "\n" not in str(info.value)
    if bad:
        assert "0.01%" in str(info.value) or "GiB" in str(info.value) or "fraction" in str(info.value) \
            or "parameter count" in str(info.value)


def test_limits_and_head() -> None:
    b = Budget.parse("0.01%").bind(22_700_000, head_params=770)
    assert b.total == b.limit == 2270
    assert b.fits(2270) and not b.fits(2271)
    with_head = Budget.parse("0.01%", include_head=True).bind(22_700_000, head_params=770)
    assert with_head.total == 2270 and with_head.limit == 1500  # the head pays first
    assert with_head.fits(1500) and not with_head.fits(1501)
    assert "the head's 770 included" in with_head.describe()
    with pytest.raises(BudgetError, match="bind it first"):
        _ = Budget.parse("0.01%").limit
    both = Budget.parse("25k", "1GiB")
    assert both.limit == 25_000  # an absolute budget needs no backbone
    assert not both.fits(10, memory=2**31) and both.fits(10, memory=2**29)
    assert not both.fits(10, memory=int(0.96 * 2**30))  # estimates keep 5% headroom
    assert Budget.from_dict(with_head.to_dict()) == with_head
    assert Budget.from_dict(both.to_dict()) == both

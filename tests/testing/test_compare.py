"""testing.compare: the one error measure of reports and the one assertion of equivalence tests."""

import pytest
import torch

from megatron_fapool.testing.compare import assert_rel_close, rel_err


def _by_hand(a, ref):
    fin = torch.isfinite(ref)
    return ((a[fin].double() - ref[fin].double()).abs().max() / ref[fin].double().abs().max()).item()


def test_rel_err_is_max_abs_over_max_abs_in_any_chunking():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 50, 3, 4, generator=g)
    x = ref + 1e-3 * torch.randn(ref.shape, generator=g)
    for chunk in (1, 7, 50, 1000):
        assert rel_err(x, ref, chunk=chunk) == pytest.approx(_by_hand(x, ref), rel=1e-12)
    # the reference's non-finite entries are left out; NaN where the reference is finite is NaN
    ref[0, 3, 0, 0] = x[0, 3, 0, 0] = float("inf")
    ref[1, 40, 2, 1] = float("-inf")
    assert rel_err(x, ref, chunk=7) == pytest.approx(_by_hand(x, ref), rel=1e-12)
    assert rel_err(x[0, 0], ref[0, 0]) == pytest.approx(_by_hand(x[0, 0], ref[0, 0]), rel=1e-12)  # 2-D, 1-D below
    assert rel_err(x[0, 0, 0], ref[0, 0, 0]) == pytest.approx(_by_hand(x[0, 0, 0], ref[0, 0, 0]), rel=1e-12)
    x[1, 20, 0, 0] = float("nan")
    assert torch.isnan(torch.tensor(rel_err(x, ref, chunk=7)))
    assert rel_err(torch.zeros(3, 4), torch.zeros(3, 4)) == 0.0
    with pytest.raises(ValueError, match="shape mismatch"):
        rel_err(x, ref[:, :10])


def test_assert_rel_close_bound_and_non_finite_pattern():
    ref = torch.tensor([1.0, -4.0, float("-inf"), 2.0], dtype=torch.float64)
    assert_rel_close(ref + torch.tensor([4e-6, 0.0, 0.0, -4e-6], dtype=torch.float64), ref, rel=1e-6)  # 4e-6 <= 1e-6 * 4
    with pytest.raises(AssertionError):
        assert_rel_close(ref + torch.tensor([5e-6, 0.0, 0.0, 0.0]), ref, rel=1e-6)
    with pytest.raises(AssertionError):  # -inf must stay -inf
        assert_rel_close(torch.tensor([1.0, -4.0, -1e30, 2.0]), ref, rel=1e-6)
    with pytest.raises(AssertionError, match="dq"):
        assert_rel_close(torch.tensor([float("nan"), -4.0, float("-inf"), 2.0]), ref, rel=1e-6, msg="dq")

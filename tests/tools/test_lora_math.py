"""The tools' maths against float64 references written from the definitions sd-scripts uses."""

from __future__ import annotations

import pytest
import torch

from library.tools.lora_files import LoraWeights
from library.tools.lora_math import choose_rank, lora_delta
from library.tools.lora_ops import low_rank, resize, summed_updates

DTYPE = torch.float64


def random_module(out: int, inp: int, rank: int, alpha: float, kernel: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if kernel:
        return LoraWeights(
            torch.randn(rank, inp, kernel, kernel, generator=g, dtype=DTYPE),
            torch.randn(out, rank, 1, 1, generator=g, dtype=DTYPE),
            alpha,
        )
    return LoraWeights(
        torch.randn(rank, inp, generator=g, dtype=DTYPE),
        torch.randn(out, rank, generator=g, dtype=DTYPE),
        alpha,
    )


def dense(w: LoraWeights) -> torch.Tensor:
    """scale * up @ down by the definition of a kxk conv LoRA: the 1x1 up applied after the kxk down."""
    up = w.up.reshape(w.up.shape[0], w.rank)
    return (w.alpha / w.rank) * torch.einsum("or,r...->o...", up, w.down)


def truncation(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(matrix.flatten(1), full_matrices=False)
    return (U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]).reshape(matrix.shape)


def test_lora_delta_matches_the_definition_for_linear_and_conv():
    for w in (random_module(6, 5, 3, 1.5), random_module(6, 5, 3, 1.5, kernel=3)):
        torch.testing.assert_close(lora_delta(w.down, w.up, w.alpha / w.rank), dense(w))


@pytest.mark.parametrize("kernel", [None, 3])
def test_resize_gives_the_rank_r_truncated_svd_of_the_update(kernel):
    modules = {"m": random_module(12, 10, 8, 4.0, kernel)}
    resized, reports = resize(modules, 3, 2, None, None, torch.device("cpu"))
    r = 2 if kernel else 3
    assert resized["m"].rank == r and reports[0].new_rank == r
    assert resized["m"].alpha == pytest.approx(4.0 / 8 * r)  # the old scale is kept
    torch.testing.assert_close(
        dense(resized["m"]), truncation(dense(modules["m"]), r), rtol=1e-10, atol=1e-10
    )


def reference_rank(S: list[float], method: str, target: float, max_rank: int) -> int:
    """sd-scripts' rules, written out with loops: an index found on the singular values, clamped to
    [1, len(S) - 1], plus one; then capped at max_rank."""
    n = len(S)
    if method == "sv_ratio":
        index = sum(1 for s in S if s > S[0] / target)
    else:
        values = [s * s for s in S] if method == "sv_fro" else list(S)
        goal = target * target if method == "sv_fro" else target
        total, running, index = sum(values), 0.0, n
        for i, v in enumerate(values):
            running += v
            if running / total >= goal:
                index = i
                break
        index += 1
    return min(max(1, min(index, n - 1)) + 1, max_rank)


@pytest.mark.parametrize(
    "method, target",
    [
        ("sv_ratio", 4.0),
        ("sv_ratio", 30.0),
        ("sv_fro", 0.9),
        ("sv_fro", 0.99),
        ("sv_cumulative", 0.5),
        ("sv_cumulative", 0.8),
    ],
)
def test_dynamic_methods_pick_the_rank_their_rule_defines(method, target):
    S = [10.0, 6.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1]
    rank = choose_rank(torch.tensor(S, dtype=DTYPE), 8, method, target)
    assert rank == reference_rank(S, method, target, 8)
    # and through resize: a module with exactly these singular values keeps that rank
    U, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1), dtype=DTYPE))
    module = LoraWeights(torch.eye(8, dtype=DTYPE), U @ torch.diag(torch.tensor(S, dtype=DTYPE)), 8.0)
    resized, _ = resize({"m": module}, 8, 8, method, target, torch.device("cpu"))
    assert resized["m"].rank == rank


def test_dynamic_rank_examples():
    S = torch.tensor([10.0, 6.0, 3.0, 2.0, 1.0], dtype=DTYPE)
    assert (
        choose_rank(S, 8, "sv_ratio", 4.0) == 4
    )  # 10, 6 and 3 exceed 10/4: index 3, rank 4 (sd-scripts adds 1)
    assert choose_rank(S, 2, "sv_ratio", 4.0) == 2  # capped at --new_rank
    assert choose_rank(torch.zeros(4, dtype=DTYPE), 4, None, None) == 1  # a zero update keeps rank 1


def test_svd_merge_sums_updates_then_truncates():
    a = {"m": random_module(9, 7, 4, 2.0, seed=1)}
    b = {"m": random_module(9, 7, 2, 1.0, seed=2)}
    total = summed_updates([("a", a), ("b", b)], [0.6, -1.2], torch.device("cpu"))
    expected = 0.6 * dense(a["m"]) - 1.2 * dense(b["m"])
    torch.testing.assert_close(total["m"].dense(), expected)
    merged = low_rank(total, 3, 3, 1.0)
    assert merged["m"].alpha == 3.0
    torch.testing.assert_close(dense(merged["m"]), truncation(expected, 3), rtol=1e-10, atol=1e-10)
    clipped = low_rank(total, 3, 3, 0.9)["m"]  # a quantile below 1 clips the factors' largest entries
    high = torch.quantile(torch.cat([merged["m"].up.flatten(), merged["m"].down.flatten()]), 0.9)
    assert clipped.up.abs().max() <= high + 1e-12 and clipped.down.abs().max() <= high + 1e-12


def test_product_svd_is_the_svd_of_the_product():
    from library.tools.lora_math import product_svd

    w = random_module(40, 30, 5, 5.0, seed=3)
    U, S, Vh = product_svd(w.up, w.down)
    dense_S = torch.linalg.svdvals(w.up @ w.down)
    torch.testing.assert_close(S, dense_S[:5], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, w.up @ w.down, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(U.T @ U, torch.eye(5, dtype=DTYPE), rtol=0, atol=1e-12)  # orthonormal
    torch.testing.assert_close(Vh @ Vh.T, torch.eye(5, dtype=DTYPE), rtol=0, atol=1e-12)


def test_dynamic_rules_see_the_zero_singular_values_of_the_whole_matrix():
    """A thin S (rank 4 of a 12 x 10 layer) is padded to the 10 values sd-scripts' full SVD gives: the rule's
    index clamp is the same, and the rank is never more than the nonzero values."""
    S = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=DTYPE)
    padded = torch.cat([S, torch.zeros(6, dtype=DTYPE)])
    ours, full = rank_of(S, padded, "sv_cumulative", 0.5)
    assert ours == full == 3  # 4 + 3 >= 0.5 * 10 at index 1: index 2, rank 3
    assert choose_rank(S, 8, "sv_ratio", 100.0, length=10) == 4  # the full rule says 5: a zero direction


def rank_of(S, padded, method, target):
    return choose_rank(S, 8, method, target, length=len(padded)), reference_rank(
        padded.tolist(), method, target, 8
    )


def test_svd_merge_to_a_rank_above_the_sum_pads_zero_directions():
    a = {"m": random_module(9, 7, 2, 2.0, seed=4)}
    merged = low_rank(summed_updates([("a", a)], [1.0], torch.device("cpu")), 5, 5, 1.0)["m"]
    assert merged.rank == 5  # the rank asked for, as sd-scripts' full SVD gives
    torch.testing.assert_close(dense(merged), dense(a["m"]), rtol=1e-10, atol=1e-12)

"""Tests of egpo.py: one per property of an equation, on small hand-checkable groups, then the
verifier, the sampler, the command line end to end (tiny model, offline) and its errors.

    pytest -q
"""
import copy
import dataclasses
import gc
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import types
import weakref
from pathlib import Path

import pytest
import torch

import egpo

HERE = Path(__file__).resolve().parent
torch.set_num_threads(1)  # as the tiny demo itself: as fast for a 0.14M-parameter model, and no oversubscription
SPEC_KEYS = """step reward_mean acc entropy_mean entropy_correct entropy_incorrect weight_mean weight_min
weight_max groups_all_correct groups_all_wrong groups_mixed confident_correct fragile_correct
overconfident_wrong exploratory_wrong auroc_confidence loss kl clip_frac grad_norm completion_len
time_sample time_update tokens_per_s""".split()
# A small, fast run of the offline default; tests add what they vary.
QUICK = ["--steps", "2", "--sft-steps", "4", "--sft-target", "0", "--eval-size", "8", "--prompts-per-step", "2",
         "--group-size", "4", "--max-new-tokens", "30"]


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def random_groups(n_groups=200, group_size=8, seed=0):
    """Random binary rewards (mixed, all-wrong and all-correct groups) and entropies."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(n_groups, 1, generator=g).expand(-1, group_size)
    rewards = (torch.rand(n_groups, group_size, generator=g) < p).float().view(-1)
    entropy = (torch.rand(n_groups * group_size, generator=g) * 3).view(-1)
    return rewards, entropy


# ---------------------------------------------------------------- Eq. 5: entropy proxy
def test_entropy_is_the_masked_mean_negative_log_likelihood():
    logprobs = t([-1.0, -2.0, -3.0, -50.0], [-0.5, -99.0, -99.0, -99.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert torch.allclose(egpo.sequence_entropy(logprobs, mask), t(2.0, 0.5))


def test_a_response_with_no_entropy_token_has_no_entropy():
    h = egpo.sequence_entropy(t([-1.0, -2.0], [-3.0, -4.0]), torch.tensor([[0, 0], [1, 1]]))
    assert math.isnan(h[0]) and h[1] == 3.5


def test_entropy_is_detached():
    logprobs = t([-1.0, -2.0]).requires_grad_()
    assert not egpo.sequence_entropy(logprobs, torch.ones(1, 2)).requires_grad


def test_answer_span_is_the_tokens_after_the_last_think_end():
    end = [7, 8]  # '</think>' as two tokens
    response = torch.tensor([[1, 7, 8, 2, 7, 8, 3, 4, 0],   # two markers: after the last one
                             [1, 2, 3, 4, 5, 6, 0, 0, 0],   # none: the whole response
                             [1, 2, 7, 8, 0, 0, 0, 0, 0],   # marker last: nothing after it
                             [1, 7, 8, 5, 6, 0, 7, 8, 9]])  # a marker in the padding does not count
    mask = torch.tensor([[1] * 8 + [0], [1] * 6 + [0] * 3, [1] * 4 + [0] * 5, [1] * 5 + [0] * 4]).bool()
    span = egpo.answer_mask(response, mask, end).long().tolist()
    assert span == [[0, 0, 0, 0, 0, 0, 1, 1, 0], [1] * 6 + [0] * 3, [0] * 9, [0, 0, 0, 1, 1, 0, 0, 0, 0]]
    assert egpo.answer_mask(response, mask, [99]).tolist() == mask.tolist()  # single-token marker, absent


# ---------------------------------------------------------------- Eq. 2: GRPO advantage
def test_grpo_advantages_equal_hand_values():
    # group 1: mean 0.25, unbiased std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5
    adv = egpo.grpo_advantages(t(1, 0, 0, 0, 1, 1, 0, 0), group_size=4, eps=0.0)
    s = math.sqrt(1 / 3)  # group 2: mean 0.5, std sqrt(4 * 0.25 / 3)
    assert torch.allclose(adv, t(1.5, -0.5, -0.5, -0.5, 0.5 / s, 0.5 / s, -0.5 / s, -0.5 / s))


def test_grpo_advantages_are_zero_for_uniform_groups():
    adv = egpo.grpo_advantages(t(1, 1, 1, 0, 0, 0), group_size=3)
    assert adv.tolist() == [0.0] * 6


# ---------------------------------------------------------------- Eqs. 7-8: confidence weight, asymmetric clamp
A = 0.5 / math.sqrt(1 / 3)  # GRPO's |A| in a group of 4 with two right answers


def test_raw_weight_is_group_mean_entropy_over_own_entropy():
    w_hat = egpo.confidence_ratio(t(0.5, 2.0, 0.5, 2.0), group_size=4, eps_h=0.0)
    assert torch.allclose(w_hat, t(2.5, 0.625, 2.5, 0.625))
    assert egpo.confidence_ratio(t(1.0), 1).item() == pytest.approx(1 / (1 + 1e-5))  # eps_H = 1e-5


def test_responses_without_entropy_are_left_out_of_the_group_mean_and_get_weight_one():
    w_hat = egpo.confidence_ratio(t(1.0, float("nan"), 3.0, 2.0, float("nan"), float("nan")), 3, eps_h=0.0)
    assert torch.allclose(w_hat, t(2.0, 1.0, 2 / 3, 1.0, 1.0, 1.0))  # Hbar = 2 from the valid two


def test_asymmetric_calibration_matches_the_worked_example():
    adv_hat = egpo.egpo_advantages(t(1, 1, 0, 0), t(0.5, 2.0, 0.5, 2.0), group_size=4)
    # w^ = (2.5, 0.625, 2.5, 0.625) -> c = (2, 0.8, 2, 0.8) -> w = (max(1, 2), max(1, 0.8), min(1, 2), min(1, 0.8))
    assert torch.allclose(adv_hat, t(2 * A, A, -A, -0.8 * A), atol=1e-5)


def test_calibration_keeps_every_sign():
    rewards, entropy = random_groups()
    adv = egpo.grpo_advantages(rewards, 8)
    for calibration in ("asymmetric", "symmetric", "neg-only", "pos-only"):
        adv_hat = egpo.egpo_advantages(rewards, entropy, 8, calibration=calibration)
        mixed = adv != 0
        assert mixed.sum() > 100
        assert torch.equal(torch.sign(adv_hat[mixed]), torch.sign(adv[mixed]))


def test_correct_answers_are_never_down_weighted():
    rewards, entropy = random_groups()
    adv = egpo.grpo_advantages(rewards, 8)
    adv_hat = egpo.egpo_advantages(rewards, entropy, 8)
    pos = adv > 0
    assert (adv_hat[pos] >= adv[pos]).all()
    assert (adv_hat[pos] / adv[pos]).max() == pytest.approx(2.0)  # lambda_max is reached


def test_failures_are_never_up_weighted():
    rewards, entropy = random_groups()
    adv = egpo.grpo_advantages(rewards, 8)
    adv_hat = egpo.egpo_advantages(rewards, entropy, 8)
    neg = adv < 0
    assert (adv_hat[neg].abs() <= adv[neg].abs()).all()
    assert (adv_hat[neg] / adv[neg]).min() == pytest.approx(0.8)  # lambda_min is reached
    all_wrong = rewards.view(-1, 8).amax(1).repeat_interleave(8) == 0
    assert (adv_hat[all_wrong] >= -1).all() and (adv_hat[all_wrong] <= -0.8).all()  # NSR: at most GRPO's -1


def test_weight_one_everywhere_and_no_nsr_is_grpo_bit_for_bit():
    rewards, entropy = random_groups()
    same = egpo.egpo_advantages(rewards, entropy, 8, lambda_min=1.0, lambda_max=1.0, nsr="off")
    assert torch.equal(same, egpo.grpo_advantages(rewards, 8))


@pytest.mark.parametrize("calibration,weights", [  # the worked example's group under Table 2's C1-C3
    ("symmetric", (2, 0.8, 2, 0.8)),  # C1: c for everyone: a fragile correct answer is weakened
    ("neg-only", (2, 0.8, 1, 0.8)),   # C2: correct c, wrong min(1, c)
    ("pos-only", (2, 1, 2, 0.8)),     # C3: correct max(1, c), wrong c: an overconfident failure is up-weighted
])
def test_table2_clamp_ablations(calibration, weights):
    adv_hat = egpo.egpo_advantages(t(1, 1, 0, 0), t(0.5, 2.0, 0.5, 2.0), 4, calibration=calibration)
    assert torch.allclose(adv_hat, t(*weights) * t(A, A, -A, -A), atol=1e-5)


def test_unknown_calibration_is_rejected():
    with pytest.raises(ValueError):
        egpo.egpo_advantages(t(1, 0), t(1, 1), 2, calibration="sideways")


# ---------------------------------------------------------------- Eqs. 10, 13: negative-sample reinforcement
def test_all_wrong_groups_are_pushed_down_confident_failures_fully():
    entropy = t(0.2, 0.5, 1.0, 2.3)  # Hbar = 1.0, w^ = (5, 2, 1, 0.43): min(1, clip(w^, 0.8, 2))
    adv_hat = egpo.egpo_advantages(t(0, 0, 0, 0), entropy, 4)
    assert torch.allclose(adv_hat, t(-1, -1, -1, -0.8), atol=1e-4)  # eps_H moves the third by 1e-5
    assert egpo.grpo_advantages(t(0, 0, 0, 0), 4).abs().sum() == 0  # where GRPO has no signal


def test_nsr_flat_and_off():
    entropy = t(0.2, 0.5, 1.0, 2.3)
    assert egpo.egpo_advantages(t(0, 0, 0, 0), entropy, 4, nsr="flat").tolist() == [-1.0] * 4  # C4
    assert egpo.egpo_advantages(t(0, 0, 0, 0), entropy, 4, nsr="off").tolist() == [0.0] * 4    # as GRPO
    mixed = egpo.egpo_advantages(t(1, 1, 0, 0), t(0.5, 2.0, 0.5, 2.0), 4)
    for nsr in ("flat", "off"):  # mixed groups are untouched
        assert torch.equal(egpo.egpo_advantages(t(1, 1, 0, 0), t(0.5, 2.0, 0.5, 2.0), 4, nsr=nsr), mixed)


def test_all_correct_groups_get_zero():
    adv_hat = egpo.egpo_advantages(t(1, 1, 1, 1), t(0.1, 0.2, 3.0, 0.4), 4)
    assert adv_hat.tolist() == [0.0] * 4


# ---------------------------------------------------------------- Eq. 9: renormalisation (C5, C6)
def test_renorm_after_clamp_divides_by_the_groups_mean_weight():
    adv_hat = egpo.egpo_advantages(t(1, 1, 0, 0), t(0.5, 2.0, 0.5, 2.0), 4, renorm="after-clamp")
    w = t(2, 1, 1, 0.8) / 1.2  # mean(w) = 1.2
    assert torch.allclose(adv_hat, w * t(A, A, -A, -A), atol=1e-5)
    nsr = egpo.egpo_advantages(t(0, 0, 0, 0), t(0.2, 0.5, 1.0, 2.3), 4, renorm="after-clamp")
    assert torch.allclose(nsr, -t(1, 1, 1, 0.8) / 0.95, atol=1e-5)  # it acts on all-wrong groups too


def test_renorm_before_clamp_divides_the_raw_weight():
    # w^ = (2.5, 0.625, 2.5, 0.625), mean 1.5625 -> (1.6, 0.4, 1.6, 0.4) -> c = (1.6, 0.8, 1.6, 0.8)
    adv_hat = egpo.egpo_advantages(t(1, 1, 0, 0), t(0.5, 2.0, 0.5, 2.0), 4, renorm="before-clamp")
    assert torch.allclose(adv_hat, t(1.6, 1, 1, 0.8) * t(A, A, -A, -A), atol=1e-4)


@pytest.mark.parametrize("renorm", ["after-clamp", "before-clamp"])
def test_renorm_divides_each_group_by_its_own_mean(renorm):
    """Eq. 9 on a batch of groups equals Eq. 9 group by group, and the groups' mean weights differ
    (so one mean over the batch would give other numbers)."""
    rewards, entropy = random_groups(n_groups=12, group_size=4, seed=1)
    whole = egpo.egpo_advantages(rewards, entropy, 4, renorm=renorm)
    alone = torch.cat([egpo.egpo_advantages(rewards[i:i + 4], entropy[i:i + 4], 4, renorm=renorm)
                       for i in range(0, 48, 4)])
    assert torch.allclose(whole, alone)
    w = egpo.confidence_ratio(entropy, 4).clamp(0.8, 2.0).view(-1, 4)
    assert w.mean(1).std() > 0.05


# ---------------------------------------------------------------- Section 3: policy loss
def test_ratio_one_gives_minus_the_mean_advantage_for_each_aggregation():
    lp = t([-1.0, -2.0, -3.0], [-0.5, -0.1, -0.1])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv = t(1.0, -2.0)
    token, stats = egpo.policy_loss(lp, lp, adv, mask, loss_agg="token-mean")
    seq, _ = egpo.policy_loss(lp, lp, adv, mask, loss_agg="seq-mean-token-mean")
    assert token.item() == pytest.approx(-(3 * 1.0 + 1 * -2.0) / 4)  # per token
    assert seq.item() == pytest.approx(-(1.0 - 2.0) / 2)  # per response
    assert stats == {"kl": 0.0, "clip_frac": 0.0}


def test_clipping_zeroes_the_gradient_exactly_where_ppo_says():
    ratios = t([0.5, 0.9, 1.1, 1.5], [0.5, 0.9, 1.1, 1.5])
    logprobs = ratios.log().requires_grad_()
    adv = t(1.0, -1.0)
    loss, stats = egpo.policy_loss(logprobs, torch.zeros(2, 4), adv, torch.ones(2, 4))
    loss.backward()
    # d(-ratio * A / 8)/dlogp = -ratio * A / 8 where the unclipped branch is active; 0 where
    # A > 0 and ratio > 1.2, or A < 0 and ratio < 0.8
    expected = -ratios * adv[:, None] / 8
    expected[0, 3] = 0.0
    expected[1, 0] = 0.0
    assert torch.allclose(logprobs.grad, expected)
    assert stats["clip_frac"] == pytest.approx(2 / 8)


def test_the_upper_and_lower_clip_bounds_are_separate():
    """DAPO's clip-higher, eps_low 0.2 and eps_high 0.28: the ratio 1.25 with A > 0 keeps its gradient
    (one bound for both sides would clip it at 1.2), and 0.75 with A < 0 is clipped at 0.8."""
    ratios = t([0.75, 1.25, 1.3], [0.75, 0.85, 1.25])
    assert ((ratios > 1.2) & (ratios <= 1.28)).any() and (ratios > 1.28).any()  # each bound is exercised
    assert ((ratios < 0.8) & (ratios >= 0.72)).any()
    logprobs = ratios.log().requires_grad_()
    adv = t(1.0, -1.0)
    loss, stats = egpo.policy_loss(logprobs, torch.zeros(2, 3), adv, torch.ones(2, 3), clip_eps_low=0.2,
                                   clip_eps_high=0.28)
    loss.backward()
    expected = -ratios * adv[:, None] / 6  # d(-ratio * A / 6)/dlogp where the unclipped branch is active
    expected[0, 2] = 0.0  # A > 0, ratio 1.3 > 1.28
    expected[1, 0] = 0.0  # A < 0, ratio 0.75 < 0.8
    assert torch.allclose(logprobs.grad, expected)
    assert stats["clip_frac"] == pytest.approx(2 / 6)


def test_masked_tokens_get_no_gradient():
    logprobs = t([-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]).requires_grad_()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, _ = egpo.policy_loss(logprobs, logprobs.detach() + 0.1, t(1.0, -1.0), mask,
                               ref_logprobs=torch.zeros(2, 3), beta=0.5)
    loss.backward()
    assert (logprobs.grad[mask == 0] == 0).all()
    assert (logprobs.grad[mask == 1] != 0).all()


def test_k3_kl_is_zero_when_the_reference_is_the_policy_and_hand_value_otherwise():
    lp = t([-1.0, -2.0])
    mask = torch.ones(1, 2)
    _, same = egpo.policy_loss(lp, lp, t(0.0), mask, ref_logprobs=lp.clone(), beta=0.1)
    assert same["kl"] == 0.0
    loss, other = egpo.policy_loss(lp, lp, t(0.0), mask, ref_logprobs=lp + 0.5, beta=0.1)
    k3 = math.exp(0.5) - 0.5 - 1
    assert other["kl"] == pytest.approx(k3)
    assert loss.item() == pytest.approx(0.1 * k3)  # A = 0: only the KL term is left


def test_micro_batches_weighted_by_their_share_reproduce_the_full_batch_loss():
    g = torch.Generator().manual_seed(0)
    lp, old = -torch.rand(6, 5, generator=g), -torch.rand(6, 5, generator=g)
    adv = torch.randn(6, generator=g)
    mask = torch.tensor([[1] * k + [0] * (5 - k) for k in (5, 1, 3, 0, 2, 4)])
    for agg in ("token-mean", "seq-mean-token-mean"):
        full, _ = egpo.policy_loss(lp, old, adv, mask, loss_agg=agg)
        total, parts = (mask.sum(), 0.0) if agg == "token-mean" else (6, 0.0)
        for s in (slice(0, 2), slice(2, 5), slice(5, 6)):
            share = mask[s].sum() if agg == "token-mean" else s.stop - s.start
            parts += egpo.policy_loss(lp[s], old[s], adv[s], mask[s], loss_agg=agg)[0] * share / total
        assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_eos_token_is_inside_the_loss_mask_and_padding_after_it_is_not():
    eos, pad = 1, 0
    response = torch.tensor([[5, 6, eos, pad, pad], [5, eos, eos, eos, eos],
                             [5, 6, 7, 8, 9], [eos, pad, pad, pad, pad]])
    assert egpo.eos_mask(response, [eos]).long().tolist() == [
        [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert egpo.eos_mask(torch.tensor([[5, 9, 3]]), [9, 3]).long().tolist() == [[1, 1, 0]]  # any EOS id


# ---------------------------------------------------------------- metrics
def test_auroc_hand_values():
    labels = t(1, 1, 0, 0)
    assert egpo.auroc(t(0.9, 0.8, 0.1, 0.2), labels) == 1.0
    assert egpo.auroc(t(0.1, 0.8, 0.9, 0.2), labels) == 0.25  # pairs won: (0.8 > 0.2) only
    assert egpo.auroc(t(0.5, 0.5, 0.5, 0.5), labels) == 0.5
    assert math.isnan(egpo.auroc(t(0.1, 0.2), t(1, 1)))


def test_quadrants_and_group_counts():
    rewards = t(1, 1, 0, 0, 1, 1, 1, 1)
    entropy = t(0.5, 2.0, 0.5, 2.0, 1.0, 1.0, 1.0, 1.0)  # group 2: nobody is below its mean -> fragile
    adv = egpo.grpo_advantages(rewards, 4)
    m = egpo.calibration_metrics(rewards, entropy, adv, egpo.egpo_advantages(rewards, entropy, 4), 4)
    quadrants = ("confident_correct", "fragile_correct", "overconfident_wrong", "exploratory_wrong")
    assert [m[k] for k in quadrants] == [1, 5, 1, 1]
    assert (m["groups_mixed"], m["groups_all_wrong"], m["groups_all_correct"]) == (1, 0, 1)
    assert (m["weight_min"], m["weight_max"], m["weight_mean"]) == pytest.approx((0.8, 2.0, 4.8 / 4))
    assert m["acc"] == m["reward_mean"] == 0.75
    assert m["entropy_correct"] == pytest.approx(6.5 / 6) and m["entropy_incorrect"] == pytest.approx(1.25)
    # -H of the 6 correct (-0.5, -2, -1 x4) against the 2 wrong (-0.5, -2): 6 of the 12 pairs won, ties 1/2
    assert m["auroc_confidence"] == pytest.approx(6 / 12)
    sure_when_right = egpo.calibration_metrics(t(1, 1, 0, 0), t(0.1, 0.2, 1, 2), adv[:4], adv[:4], 4)
    assert sure_when_right["auroc_confidence"] == 1.0  # low H predicts a right answer


def test_metrics_of_an_all_wrong_group_with_a_response_without_entropy():
    rewards, entropy = t(0, 0, 0, 0), t(0.2, 0.5, float("nan"), 2.3)  # Hbar = 1 over the valid three
    adv_hat = egpo.egpo_advantages(rewards, entropy, 4)
    assert torch.allclose(adv_hat, t(-1, -1, -1, -0.8))  # the NaN one: w^ = 1
    m = egpo.calibration_metrics(rewards, entropy, egpo.grpo_advantages(rewards, 4), adv_hat, 4)
    assert m["nsr_adv_mean"] == pytest.approx(-0.95) and m["entropy_mean"] == pytest.approx(1.0)
    assert (m["overconfident_wrong"], m["exploratory_wrong"], m["groups_all_wrong"]) == (2, 1, 1)
    assert math.isnan(m["weight_mean"]) and math.isnan(m["auroc_confidence"])  # no mixed group, one class


def test_a_right_answer_without_entropy_is_in_no_quadrant():
    rewards, entropy = t(1, 1, 0, 0), t(0.5, float("nan"), 0.5, 2.0)  # Hbar = 1 over the valid three
    adv = egpo.grpo_advantages(rewards, 4)
    m = egpo.calibration_metrics(rewards, entropy, adv, egpo.egpo_advantages(rewards, entropy, 4), 4)
    assert (m["confident_correct"], m["fragile_correct"], m["overconfident_wrong"], m["exploratory_wrong"]) == \
        (1, 0, 1, 1)


# ---------------------------------------------------------------- verifier
GSM8K_CASES = [
    ("She pays 5+3=8 dollars.\n#### 8", "8", 1),
    ("#### 1,234", "1234", 1),
    ("#### $1,234.00", "1234", 1),
    ("So she pays 18 dollars.\n#### 18 dollars", "18", 1),
    ("#### 18.", "18", 1),
    ("#### -7", "-7", 1),
    ("#### 7", "-7", 0),
    ("#### 17", "18", 0),
    ("#### 0.5", "1/2", 1),
    ("#### 50%", "50", 1),
    ("#### 18\nand some text after it", "18", 1),
    ("#### 12\nno wait\n#### 18", "18", 1),
    ("#### 12\nno wait\n#### 18", "12", 0),
    ("#### 1000000", "1,000,000", 1),
    ("#### 2.5", "2.50", 1),
    ("#### 1,2", "12", 0),
    ("#### twelve", "12", 0),
    ("#### 7", "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 7", 1),  # a whole GSM8K answer as gold
    ("The answer is 18.", "18", 0),  # no final-answer marker
    ("", "18", 0),
    ("####", "18", 0),
    ("#### AZYUK2A", "2", 0),
    ("#### 999999", "1000000", 0),  # integers compare exactly: no relative tolerance
    ("#### 12345679", "12345678", 0),
    ("#### 100000000000000001", "100000000000000000", 0),  # beyond a float's 53 bits
    ("#### 1000000.0", "1000000", 1),  # a decimal: the 1e-6 relative tolerance applies
    ("#### 2,500", "2500", 1),
    ("#### 2, 500", "2500", 0),  # a space after the comma: a list, not a thousands separator
    ("#### 5 or more", "5", 0),  # only unit words are dropped
    ("#### 7 is", "7", 0),
    ("#### 12 km", "12", 1),
    ("#### 3 hours", "3", 1),
    ("#### \u22125", "-5", 1),  # Unicode minus
    ("#### monday", "Monday", 1),  # strings compare case-insensitively
    ("#### 1,000.99m\u00b2", "1000.99", 1),  # from Math-Verify's tests
    ("#### 28", "0.28", 0),
]
MATH_CASES = [
    ("$\\boxed{\\frac{1}{2}}$", "\\frac12", 1),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1),
    ("\\boxed{-\\frac{2}{3}}", "-\\frac{2}{3}", 1),
    ("\\boxed{\\frac{2}{3}}", "-\\frac{2}{3}", 0),
    ("\\boxed{0.33333}", "\\frac{1}{3}", 0),  # 1e-5 off: outside the 1e-6 relative tolerance
    ("\\boxed{0.333333333}", "\\frac{1}{3}", 1),
    ("\\boxed{3\\sqrt{2}}", "3\\sqrt{2}", 1),
    ("\\boxed{3\\sqrt{2}}", "3", 0),
    ("\\boxed{90^\\circ}", "90", 1),
    ("\\boxed{90^{\\circ}}", "90^\\circ", 1),
    ("\\boxed{\\text{(B)}}", "(B)", 1),
    ("\\boxed{(1, 2)}", "(1,2)", 1),
    ("\\boxed{(1, 2)}", "(2,1)", 0),
    ("\\boxed{x = 5}", "5", 1),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1),
    ("\\boxed{1} and finally \\boxed{2}", "2", 1),
    ("\\fbox{7}", "7", 1),
    ("so it is \\boxed 7.", "7", 1),
    ("\\boxed{12", "12", 0),  # unbalanced: no answer
    ("\\boxed{}", "0", 0),
    ("\\boxed{\\$16,\\!386.20}", "16386.20", 1),
    ("\\boxed{14{,}916}", "14916", 1),
    ("\\boxed{20\\%}", "20", 1),
    ("\\boxed{15\\text{ cm}^2}", "15", 1),
    ("\\boxed{2x}", "2", 0),  # a variable is not a unit
    ("\\boxed{\\pi}", "\\pi", 1),
    ("\\boxed{\\left( \\frac{1}{3} \\right)}", "\\frac{1}{3}", 1),
    ("\\boxed{1\\frac{1}{2}}", "11/2", 0),  # a mixed number is not 11/2
    ("The answer is 5", "5", 0),
    ("\\boxed{2, 500}", "2500", 0),  # a list
    ("\\boxed{5 or more}", "5", 0),
    ("\\boxed{- \\frac{1}{2}}", "-0.5", 1),
    ("\\boxed{5 \\text{ m}}", "5", 1),
    ("\\boxed{5\\ \\mathrm{m}}", "5", 1),
    ("\\boxed{\\sqrt2}", "\\sqrt{2}", 1),
    ("\\boxed{{5}}", "5", 1),
    ("\\boxed{5} is what I get, so the answer is \\boxed{}", "5", 1),  # an empty box is skipped
    ("\\boxed{3\\frac{1}{2}}", "7/2", 1),  # a mixed number
    ("\\boxed{\\text{Monday}}", "monday", 1),
    ("is $\\boxed{11,\\! 111,\\! 111,\\! 100}$", "11111111100", 1),  # from Math-Verify's tests
    ("The distance is $\\boxed{125\\textnormal{ miles}}.$", "125", 1),
    ("The answer is $\\boxed{\\frac{1}{3} \\textbf{meters}}$.", "1/3", 1),
    ("$\\boxed{28 percent}", "28\\%", 1),
    ("\\boxed{50\\ \\$}", "50", 1),  # a space command, then a dollar sign
    ("\\boxed{\\$50\\ \\!}", "50", 1),
]


# A \text{...} after a number is dropped only when it holds unit words, and wrappers nest.
TEXT_WRAPPER_CASES = [
    ("\\boxed{5\\text{ or more}}", "5", 0),
    ("\\boxed{12\\text{ students and 3 teachers}}", "12", 0),
    ("\\boxed{3\\text{ if } x > 0}", "3", 0),
    ("\\boxed{7\\mbox{ at least}}", "7", 0),
    ("\\boxed{\\text{\\textbf{5} or more}}", "5", 0),
    ("\\boxed{5\\text{ cm}}", "5", 1),
    ("\\boxed{15\\mbox{ cm}^2}", "15", 1),
    ("\\boxed{\\text{\\textbf{Monday}}}", "Monday", 1),
    ("\\boxed{\\mathrm{\\text{42}}}", "42", 1),
    ("\\boxed{5\\text{ \\mathrm{cm}}}", "5", 1),
    ("\\boxed{\\textbf{\\text{(C)}}}", "(C)", 1),
    ("\\boxed{\\text{\\textit{\\mbox{x}}} + 1}", "x+1", 1),
]
# Matrices (a row break \\ is not the space command '\ ') and comma lists (a comma separates
# thousands only between a 1-3 digit group and exact 3-digit groups, and only if no other comma
# makes the answer a list).
MATRIX_AND_LIST_CASES = [
    ("\\boxed{\\begin{pmatrix}6\\\\3\\\\0\\end{pmatrix}}", "\\begin{pmatrix} 6 \\\\ 3 \\\\ 0 \\end{pmatrix}", 1),
    ("\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 1),
    ("\\boxed{\\begin{pmatrix}6\\\\3\\\\1\\end{pmatrix}}", "\\begin{pmatrix} 6 \\\\ 3 \\\\ 0 \\end{pmatrix}", 0),
    ("\\boxed{\\begin{pmatrix}63\\\\0\\end{pmatrix}}", "\\begin{pmatrix} 6 \\\\ 3 \\\\ 0 \\end{pmatrix}", 0),
    ("\\boxed{45^\\circ,135^\\circ}", "45^\\circ, 135^\\circ", 1),
    ("\\boxed{45^\\circ,135^\\circ}", "45135", 0),
    ("\\boxed{1,500,2}", "15002", 0),
    ("\\boxed{1,000,2}", "1000,2", 0),
    ("\\boxed{0,125}", "125", 0),
    ("\\boxed{12,345.5}", "12345.5", 1),
    ("\\boxed{45,135}", "45135", 1),
    ("\\boxed{1,234,567}", "1234567", 1),
    ("\\boxed{111111111}", "111, \\! 111, \\! 111", 1),  # a MATH gold answer
]


@pytest.mark.parametrize("completion,gold,expected", GSM8K_CASES + MATH_CASES + TEXT_WRAPPER_CASES + MATRIX_AND_LIST_CASES)
def test_verify(completion, gold, expected):
    assert egpo.verify(completion, gold) == expected


# Equivalent forms: the same polynomial, exactly (a run of letters is one symbol; roots of numbers
# are products of primes, so √117 = 3√13). Each of these scored 0 with strings and numbers alone.
EQUIVALENT_FORM_CASES = [
    ("\\boxed{6 + x}", "x+6", 1),  # a reordered sum
    ("\\boxed{2\\sqrt{2} + 3}", "3 + 2\\sqrt{2}", 1),
    ("\\boxed{-5i + 6}", "6 - 5i", 1),
    ("\\boxed{\\frac{9a+11}{20}}", "\\frac{11+9a}{20}", 1),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1),
    ("\\boxed{\\frac{1}{\\sqrt{3}}}", "\\frac{\\sqrt{3}}{3}", 1),
    ("\\boxed{\\sqrt{117}}", "3\\sqrt{13}", 1),
    ("\\boxed{\\frac{3}{4}\\pi \\text{ inches}}", "\\frac{3}{4}\\pi", 1),  # a unit after an expression
    ("\\boxed{-\\frac{1}{6}\\pi}", "-\\frac{\\pi}{6}", 1),
    ("\\boxed{x \\cdot 2}", "2x", 1),  # implicit multiplication, \cdot, \times
    ("\\boxed{3 \\times \\sqrt{13}}", "3\\sqrt{13}", 1),
    ("\\boxed{2(k+1)}", "2k+2", 1),
    ("\\boxed{(x-1)(x+1)}", "x^2-1", 1),
    ("\\boxed{x^{1/3}}", "\\sqrt[3]{x}", 1),  # powers and roots
    ("\\boxed{2^{10}}", "1024", 1),
    ("\\boxed{6.72 \\times 10^{-5}}", ".0000672", 1),
    ("\\boxed{\\dfrac{x+1}{x-1}}", "\\frac{1+x}{x-1}", 1),  # 1/(x-1): a symbol of its own
    ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1),  # part by part
    ("\\boxed{(3/5, 8/3]}", "\\left(\\frac{3}{5},\\frac{8}{3}\\right]", 1),
    ("\\boxed{-7y + 5x + 11z + 4 = 0}", "5x - 7y + 11z + 4 = 0", 1),
    ("\\boxed{\\begin{pmatrix} -\\frac{1}{3} \\\\ \\frac{2}{3} \\end{pmatrix}}",
     "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}", 1),
    ("\\boxed{[-2, 7]}", "x \\in [-2,7]", 1),
]
# Wrong answers that look alike, and forms read strictly because they are ambiguous or unsafe.
LOOK_ALIKE_WRONG_CASES = [
    ("\\boxed{x+7}", "x+6", 0),
    ("\\boxed{6 - x}", "x - 6", 0),
    ("\\boxed{2x}", "x^2", 0),
    ("\\boxed{(2,1)}", "(1,2)", 0),  # a tuple keeps its order
    ("\\boxed{2}", "\\sqrt{2}", 0),
    ("\\boxed{(1,2]}", "[1,2)", 0),  # an interval keeps its brackets
    ("\\boxed{\\frac{3}{4}}", "\\frac{3}{4}\\pi", 0),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 0),
    ("\\boxed{\\begin{pmatrix} 2/3 \\\\ -1/3 \\end{pmatrix}}",
     "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}", 0),
    ("\\boxed{y = 2x - 3}", "y = 2x + 3", 0),
    ("\\boxed{2^{60}+1}", "2^{60}", 0),  # exact: no rounding of big integers
    ("\\boxed{\\sqrt{10^{30}+1}}", "10^{15}", 0),
    ("\\boxed{\\sqrt{x^2}}", "x", 0),  # |x|, not x
    ("\\boxed{\\frac{1}{2x}}", "\\frac{x}{2}", 0),
    ("\\boxed{1/2x}", "\\frac{x}{2}", 0),  # (1/2)x or 1/(2x)? ambiguous, so no answer
    ("\\boxed{x^23}", "x^{23}", 0),  # TeX reads x^2·3
    ("\\boxed{\\text{tase}}", "\\text{east}", 0),  # a word is one symbol, not a product of letters
    ("\\boxed{2^{2^{2^{100}}}}", "2^{2^{2^{101}}}", 0),  # too big to compute: no answer
    ("\\boxed{\\sqrt{-4}}", "1", 0),  # no root of a negative number is taken
    ("\\boxed{\\sqrt{-4}}", "2", 0),
]


@pytest.mark.parametrize("completion,gold,expected", EQUIVALENT_FORM_CASES + LOOK_ALIKE_WRONG_CASES)
def test_equivalent_expressions_are_equal_and_look_alike_wrong_answers_are_not(completion, gold, expected):
    assert egpo.verify(completion, gold) == expected


# The R1-Zero format: <think> ... </think> <answer> ... </answer>, a third final-answer marker.
R1_ZERO_CASES = [
    ("<think> 2 + 2 = 4 </think> <answer> 4 </answer>", "4", 1),
    ("<think> half </think> <answer> $\\frac{1}{2}$ </answer>", "0.5", 1),
    ("<think> roots </think> <answer> x = 3 + 2\\sqrt{2} </answer>", "2\\sqrt{2}+3", 1),
    ("<answer> 3 </answer> wait, no: <answer> 4 </answer>", "4", 1),  # the last tag
    ("<think> maybe \\boxed{5} </think> <answer> 4 </answer>", "4", 1),  # a box outside is ignored
    ("<think> so </think> <answer> 4 </answer> \\boxed{5}", "4", 1),
    ("<think> 2 + 2 = 5 </think> <answer> 5 </answer>", "4", 0),
    ("<think> so </think> <answer> 4", "4", 0),  # an unclosed tag is no answer
]


@pytest.mark.parametrize("completion,gold,expected", R1_ZERO_CASES)
def test_the_r1_zero_answer_tag_holds_the_final_answer(completion, gold, expected):
    assert egpo.verify(completion, gold) == expected


def test_the_last_answer_tag_wins_and_a_box_inside_it_is_unwrapped():
    """The tag is the R1-Zero format's final answer: a box outside it is reasoning or an
    afterthought, and an empty tag is no answer, so the last box counts."""
    assert egpo.extract_answer("<think> \\boxed{4} </think> <answer> 5 </answer>") == "5"
    assert egpo.verify("<think> \\boxed{4} </think> <answer> 5 </answer>", "4") == 0.0
    assert egpo.extract_answer("<answer> so \\boxed{\\frac{1}{2}} </answer> \\boxed{3}") == "\\frac{1}{2}"
    assert egpo.extract_answer("<answer> #### 7 </answer>") == "7"
    assert egpo.extract_answer("<answer> </answer> so \\boxed{6}") == "6"
    assert egpo.extract_answer("<answer>3</answer><answer>4") == "3"  # the last closed tag
    assert egpo.verify("<answer> \\boxed{4} </answer>", "4") == 1.0


def test_the_decimal_tolerance_is_relative_far_from_one():
    """A decimal for a fraction that has no finite decimal (a third) is compared to 1e-6 of the larger
    value: an absolute 1e-6 would take 0.00000003 for a third of 1e-7 (10% off), and would refuse
    1200000.3333 for 3600001/3 (2.8e-11 off, relative). Integers and finite decimals are exact, and
    a number too big for a float is no error."""
    assert egpo.verify("\\boxed{0.00000003}", "\\frac{1}{3} \\cdot 10^{-7}") == 0.0
    assert egpo.verify("\\boxed{0.0000000333333}", "\\frac{1}{3} \\cdot 10^{-7}") == 1.0
    assert egpo.verify("\\boxed{1200000.3333}", "\\frac{3600001}{3}") == 1.0
    assert egpo.verify("\\boxed{0.333333}", "\\frac{1}{3}") == 1.0 and egpo.verify("\\boxed{0.33}", "1/3") == 0.0
    for answer, gold in [("1500001.0", "1500000"), ("1000000.5", "1000000"), ("0.0000002", "0.0000001"),
                         ("10^{310}", "2.5"), ("2^{1100}+0.5", "3")]:
        assert egpo.verify(f"\\boxed{{{answer}}}", gold) == 0.0, answer


def test_a_variable_case_and_spaces_keep_their_meaning():
    """'x = 5' answers '5', but not 'y = 5'; a letter's case and a space between digits count (only
    words ignore case); sin(x + y) is a function's value, not a product."""
    for answer, gold, expected in [("x=5", "5", 1), ("5", "x=5", 1), ("x=5", "y=5", 0), ("y=-\\frac14", "x=-\\frac{1}{4}", 0),
                                   ("x=2x+1", "y=2x+1", 0), ("y = 1 + 2x", "y=2x+1", 1), ("2 1/2", "21/2", 0),
                                   ("\\Delta", "\\delta", 0), ("2\\pi r", "2\\pi R", 0), ("C", "c", 0),
                                   ("sin(x+y)", "sin x + sin y", 0), ("x(x+1)", "x^2+x", 1),
                                   ("\\text{East}", "east", 1), ("Yes", "yes", 1)]:
        assert egpo.verify(f"\\boxed{{{answer}}}", gold) == expected, (answer, gold)


def test_a_group_of_four_digits_is_not_a_thousands_group():
    assert egpo.verify("\\boxed{1234,567}", "1234567") == 0.0
    assert egpo.verify("\\boxed{1,234,567}", "1234567") == 1.0


def test_the_last_answer_line_of_a_multiple_choice_completion_counts():
    completion = "ANSWER: B\nOn second thought, (B) misreads the question.\nANSWER: C"
    assert egpo.verify(completion, "C") == 1.0
    assert egpo.verify(completion, "B") == 0.0


def test_extract_answer_takes_the_last_nonempty_boxed_with_nested_braces_else_hashes_else_none():
    assert egpo.extract_answer("a \\boxed{1} b \\boxed{\\frac{1}{\\sqrt{2}}} c") == "\\frac{1}{\\sqrt{2}}"
    assert egpo.extract_answer("a \\boxed{1} b \\fbox{2} c \\boxed{ } d \\boxed{}") == "2"
    assert egpo.extract_answer("\\boxed{3} \\boxed{4") == "3"  # an unbalanced last box is skipped too
    assert egpo.extract_answer("x\n#### 42 \nmore") == "42"
    assert egpo.extract_answer("no answer here") is None
    assert egpo.extract_answer("\\boxed{}") is None
    assert egpo.extract_answer(None) is None


def random_balanced(rng, depth=0):
    """A random string whose braces are balanced, from a LaTeX-ish alphabet."""
    parts = []
    for _ in range(rng.randint(1, 6)):
        if depth < 4 and rng.random() < 0.2:
            parts.append("{" + random_balanced(rng, depth + 1) + "}")
        else:
            parts.append(rng.choice(["1", "23", "-", ".", ",", " ", "/", "x", "\\frac", "\\sqrt", "\\text",
                                     "\\,", "\\!", "$", "%", "^", "\\circ", "(", ")", "cm", "or", "\\", "#"]))
    return "".join(parts)


def test_verifier_returns_a_float_and_never_raises_on_random_strings():
    rng = random.Random(0)
    alphabet = "\\{}$#%.,/-+ ^0123456789boxedfractextlp()\n\u2212"
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        for completion, gold in ((s, s[::-1]), ("#### " + s, s), ("\\boxed{" + s, s), (s, "")):
            r = egpo.verify(completion, gold)
            assert type(r) is float and r in (0.0, 1.0), (completion, gold, r)
    assert egpo.verify("#### " + "9" * 5000, "9" * 5000) == 1.0


def test_verifier_identities_on_random_answers():
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.choice([rng.randint(-100, 100), rng.randint(-10**9, 10**9), rng.randint(-10**30, 10**30)])
        assert egpo.verify("#### " + str(n), str(n)) == 1.0, n
        assert egpo.verify("#### " + str(n + 1), str(n)) == 0.0, n
        assert egpo.verify(f"\\boxed{{{n:,}}}", str(n)) == 1.0, n
        assert egpo.verify(f"#### {n}", f"{n:,}") == 1.0, n
        a, b = rng.randint(-999, 999), rng.randint(1, 999)
        assert egpo.verify(f"\\boxed{{{a / b:.12f}}}", f"\\frac{{{a}}}{{{b}}}") == 1.0, (a, b)
        off = max(1e-4, abs(a / b) * 1e-4)  # 1e-4 relative: outside the tolerance
        assert egpo.verify(f"\\boxed{{{a / b + off:.12f}}}", f"{a}/{b}") == 0.0, (a, b)
        x = random_balanced(rng)
        if x.strip() and "####" not in x:
            assert egpo.verify("\\boxed{" + x + "}", x) == 1.0, x
            assert egpo.verify("so \\boxed{" + x + "} at last", x) == 1.0, x


def adversarial_inputs():
    """Strings up to 10,000 characters built to make a backtracking regex or a quadratic scan blow up."""
    n = 10_000
    inputs = [
        "#### The total number of distinct arrangements possible altogether is 42",  # hung for > 30 s
        "#### " + "word " * (n // 5 - 1) + "42", "#### 5" + " km" * (n // 3 - 3), "#### 5" + " or" * (n // 3 - 3),
        "#### " + "a" * n, "#### " + "ab " * (n // 3) + "1", "#### " + " " * n + "5", "#### 5" + " " * n + "x",
        "#### " + "1" * n, "#### " + "1," * (n // 2), "#### " + "1,000" * (n // 5), "#### " + "1." * (n // 2),
        "#### " + "1/" * (n // 2), "#### " + "1 " * (n // 2) + "x", "#### " + "-" * n + "1",
        "\\boxed{" * (n // 7), "\\boxed{" + "{" * (n // 2), "\\boxed{" + "}" * n, "{" * n, "}" * n,
        "\\" * n, "####" * (n // 4), "\\boxed{" + "{" * 4995 + "5" + "}" * 4996, "{" * 5000 + "}" * 5000,
        "\\boxed{" + "\\text{" * (n // 7), "\\boxed{" + "\\text{ m}" * (n // 9) + "}", "\\boxed " * (n // 7),
        "\\boxed{" + "\\text{" * (n // 7) + "}" * (n // 7) + "}", "\\boxed{" + "\\\\ " * (n // 3) + "}",
        "#### " + "1,000," * (n // 6), "#### " + "1,0001" * (n // 6) + ",",
        "\\boxed{5" + "\\," * (n // 2) + "}", "\\boxed{\\frac{" + "1" * n + "}{3}}", "\\frac" * (n // 5),
        "\\boxed{" + "\\sqrt" * (n // 5) + "}", "\\boxed{(" + "(" * n + ")}", "\\boxed{" + "^{\\circ}" * (n // 9) + "}",
        "#### " + "x = " * (n // 4), "#### " + "5\\text{ m}" * (n // 10), "#### " + "m\u00b2" * (n // 2),
        "#### " + "\u2212" * n, "#### " + "$" * n, "#### " + "%." * (n // 2), "#### " + "9" * 4999 + "." + "9" * 4999,
        # expressions (those under 200 characters are expanded): deep brackets, towers of powers,
        # long sums and products, big numbers and roots, long tuples, answer tags
        "\\boxed{" + "(" * 4990 + "x" + ")" * 4990 + "}", "\\boxed{" + "(" * 95 + "x+1" + ")" * 95 + "}",
        "\\boxed{" + "2^{" * 2490 + "2" + "}" * 2490 + "}", "\\boxed{2^{2^{2^{100}}}}", "\\boxed{9^{9^{9}}}",
        "\\boxed{" + "x+" * 4990 + "x}", "\\boxed{" + "x+" * 95 + "x}", "\\boxed{" + "(x+1)" * 39 + "}",
        "\\boxed{" + "(x+1)" * 1990 + "}", "\\boxed{(x+y+z+1)^{50000}}", "\\boxed{" + "10^{20000}" * 19 + "}",
        "\\boxed{(a+1)(b+1)(c+1)(d+1)(e+1)(f+1)(g+1)(h+1)(i+1)(j+1)(k+1)(l+1)(m+1)}",
        "\\boxed{" + "\\frac{(x+1)^{30}}{(x-1)^{30}}" * 6 + "}",
        "\\boxed{" + "\\frac{1}{" * 1400 + "x" + "}" * 1400 + "}", "\\boxed{" + "\\sqrt{999983}" * 15 + "}",
        "\\boxed{\\sqrt{" + "9" * 120 + "}}", "\\boxed{\\sqrt[99999]{2}^{99999}}",
        "\\boxed{(" + ",".join(["x^2+2x+1"] * 1100) + ")}",
        "\\boxed{" + "(1," * 2000 + "1" + ")" * 2000 + "}",
        "<answer>" * (n // 8), "<answer>x</answer>" * (n // 17), "<answer>" + "\\boxed{" * (n // 8),
    ]
    return [s[:n] for s in inputs]


def test_verifier_is_fast_on_adversarial_inputs():
    """No catastrophic backtracking or exponential work: a call on any of them takes well under 1 s
    (about 10 ms on an idle 2-core machine; the best of 3 timings and the wide margin so that a busy
    machine does not fail the test: a blow-up takes seconds to hours, every time)."""
    has_alarm = hasattr(signal, "SIGALRM")  # not on Windows, where a blow-up hangs instead of failing

    def seconds(completion, gold):
        if has_alarm:
            signal.alarm(5)
        t0 = time.perf_counter()
        egpo.verify(completion, gold), egpo.extract_answer(completion)
        return time.perf_counter() - t0

    def timeout(*_):
        raise TimeoutError("one verifier call ran for over 5 s")

    old = signal.signal(signal.SIGALRM, timeout) if has_alarm else None
    try:
        worst = 0.0
        for s in adversarial_inputs():
            assert len(s) <= 10_000
            pairs = (s, "42"), (s, s), ("#### 5", s), (s, s.split("#### ", 1)[-1]), (s, s.replace("1", "2"))
            for completion, gold in pairs:
                worst = max(worst, min(seconds(completion, gold) for _ in range(3)))
    finally:
        if has_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    assert worst < 1.0, worst
    assert egpo.verify(adversarial_inputs()[0], "42") == 0.0  # a sentence is not its last number
    assert egpo.verify("\\boxed{2^{2^{2^{100}}}}", "2^{2^{2^{101}}}") == 0.0  # fails closed


def test_toy_solutions_verify_and_the_splits_are_disjoint():
    for digits in (2, 3):
        train, test = egpo.make_toy_task(digits, n_test=100, seed=0)
        assert len(test) == 100 and not {r["question"] for r in train} & {r["question"] for r in test}
        for r in train[:300] + test:
            a, b = map(int, r["question"].rstrip("=").split("+"))
            assert r["answer"] == str(a + b) and egpo.verify(r["solution"], r["answer"]) == 1.0
    assert egpo.toy_problem(47, 38)["solution"] == "7+8+0=15,4+3+1=8 #### 85"


# ---------------------------------------------------------------- sampler and old log-probs
def test_old_logprobs_agree_with_the_samplers_own_logits():
    model, tok = egpo.build_tiny_model(seed=0)
    tok.padding_side = "left"
    prompts = [tok("1+2=")["input_ids"], tok("12+34=")["input_ids"]]  # unequal: left padding is exercised
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    out = model.generate(**batch, do_sample=True, temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=12,
                         num_return_sequences=4, output_logits=True, return_dict_in_generate=True,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    response = out.sequences[:, batch["input_ids"].shape[1]:]
    from_sampler = torch.log_softmax(torch.stack(out.logits, 1) / 0.7, -1).gather(-1, response[..., None])[..., 0]
    attention = torch.cat([batch["attention_mask"].repeat_interleave(4, 0), torch.ones_like(response)], 1)
    with torch.no_grad():
        from_forward = egpo.token_logprobs(egpo.Policy(model), out.sequences, attention, response.shape[1], 0.7)
    mask = egpo.eos_mask(response, [tok.eos_token_id])
    assert (from_forward - from_sampler)[mask].abs().max() < 1e-4


def test_greedy_sampler_equals_generate_token_for_token():
    """The in-file sampler (prefill + KV cache) against transformers' generate: left-padded
    prompts of 4 lengths, three stop tokens (rows stop at different steps, padding after)."""
    model, tok = egpo.build_tiny_model(seed=0)
    torch.manual_seed(1)
    with torch.no_grad():  # larger random weights than the default init: varied text, not '====...'
        for p in model.parameters():
            p.normal_(0, 0.5) if p.dim() > 1 else None
    tok.padding_side = "left"
    stop = [tok.eos_token_id, *tok.convert_tokens_to_ids(["*", "?"])]
    prompts = [tok(q)["input_ids"] for q in ["1+2=", "12+34=", "5=", "100+200+3="]]
    batch = tok.pad({"input_ids": prompts}, return_tensors="pt")
    expected = model.generate(**batch, do_sample=False, max_new_tokens=20, eos_token_id=stop,
                              pad_token_id=tok.pad_token_id)[:, batch["input_ids"].shape[1]:]
    response, _, _ = egpo.sample(egpo.Policy(model), batch["input_ids"], batch["attention_mask"], stop,
                                 tok.pad_token_id, 20)
    stopped = torch.isin(response, torch.tensor(stop)).any(1)
    assert stopped.sum() >= 2 and not stopped.all()  # some rows stop early, one runs to the limit
    assert torch.equal(response, expected)


def test_sampled_logprobs_and_token_entropy_agree_with_the_training_forward():
    cfg = egpo.resolve(egpo.Config(max_new_tokens=12, temperature=0.7, top_p=0.9))
    policy, tok = egpo.load_policy(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    batch = egpo.rollout(policy, tok, [tok("1+2=")["input_ids"], tok("12+34=")["input_ids"]], ["3", "46"], 4, cfg)
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    n = mask.shape[1]
    with torch.no_grad():
        forward = egpo.token_logprobs(policy, ids, attn, n, 0.7)  # from logits / T, never top-p-filtered
        logits = policy.lm(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
    entropy = torch.distributions.Categorical(logits=logits[:, -n - 1:-1] / 0.7).entropy()
    assert (batch["logprobs"] - forward)[mask].abs().max() < 1e-5
    assert (batch["token_entropy"] - entropy)[mask].abs().max() < 1e-5


def test_pick_draws_transformers_top_k_then_top_p_distribution():
    """u on a fine grid of [0, 1) turns inverse-CDF sampling into exact frequencies: they must
    equal softmax of the logits after transformers' own TopK and TopP warpers."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 2
    M = 20_000
    u = (torch.arange(M) + 0.5) / M
    for top_k, top_p in [(0, 1.0), (0, 0.8), (5, 1.0), (8, 0.7)]:
        warped = logits
        if top_k:
            warped = TopKLogitsWarper(top_k)(None, warped)
        if top_p < 1:
            warped = TopPLogitsWarper(top_p)(None, warped)
        for row in range(3):
            tokens = egpo.pick(logits[row].softmax(-1).expand(M, -1), u, top_p, top_k)
            frequencies = torch.bincount(tokens, minlength=40) / M
            assert (frequencies - warped[row].softmax(-1)).abs().max() <= 1.5 / M


def test_top_p_stops_at_the_token_that_reaches_it():
    """Probabilities (0.5, 0.25, 0.25) and top-p 0.5: the first token alone reaches 0.5, so only it is
    kept, as by transformers' TopPLogitsWarper; a token whose mass before it equals top-p is out."""
    from transformers.generation.logits_process import TopPLogitsWarper

    probs = torch.tensor([[0.5, 0.25, 0.25]])
    kept = TopPLogitsWarper(0.5)(None, probs.log()).isfinite()
    assert kept.tolist() == [[True, False, False]]
    u = torch.tensor([0.0, 0.6, 0.99])
    assert egpo.pick(probs.expand(3, -1), u, top_p=0.5).tolist() == [0, 0, 0]


def test_rollout_scores_each_response_against_its_own_prompts_gold(monkeypatch):
    """Rows k*n .. k*n+n-1 answer prompt k: with the sampler's answers fixed, prompt 0's two
    responses say '#### 5' and prompt 1's say '#### 7', against golds 5 and 7: all right."""
    cfg = egpo.resolve(egpo.Config(max_new_tokens=8, group_size=2))
    torch.manual_seed(0)
    model, tok = egpo.load_policy(cfg, torch.device("cpu"))
    answers = torch.tensor([tok(text)["input_ids"] + [tok.eos_token_id] for text in ["#### 5"] * 2 + ["#### 7"] * 2])
    monkeypatch.setattr(egpo, "sample", lambda policy, ids, *args, **kwargs: (
        answers[:len(ids)], torch.zeros(answers[:len(ids)].shape), torch.zeros(answers[:len(ids)].shape)))
    batch = egpo.rollout(model, tok, [tok("2+3=")["input_ids"], tok("3+4=")["input_ids"]], ["5", "7"], 2, cfg)
    assert batch["texts"] == ["#### 5", "#### 5", "#### 7", "#### 7"] and batch["rewards"].tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("max_num_seqs", [1, 3, 5])
def test_a_rollout_in_bounded_batches_samples_what_one_batch_does(max_num_seqs):
    """--max-num-seqs: the rows sampled a few at a time, each from its own noise, give the same tokens,
    masks and rewards as one batch, and the same log-probs and token entropies to float rounding
    (another batch shape); 12 rows, prompts of three lengths, top-k and top-p on."""
    cfg = egpo.resolve(egpo.Config(max_new_tokens=12, group_size=4, top_p=0.9, top_k=20))
    torch.manual_seed(0)
    model, tok = egpo.load_policy(cfg, torch.device("cpu"))
    prompts, golds = [tok(q)["input_ids"] for q in ("12+34=", "5+7=", "123+4567=")], ["46", "12", "4690"]
    noise = torch.rand(12, 12, generator=torch.Generator().manual_seed(1))
    one = egpo.rollout(model, tok, prompts, golds, 4, cfg, noise=noise)
    few = egpo.rollout(model, tok, prompts, golds, 4, dataclasses.replace(cfg, max_num_seqs=max_num_seqs), noise=noise)
    mask = one["response_mask"]
    assert (mask.sum(1) < 12).any() and (mask.sum(1) == 12).any()  # rows that stopped early, and rows cut off
    for key in ("input_ids", "attention_mask", "response_mask", "entropy_mask", "truncated", "rewards"):
        assert torch.equal(one[key], few[key]), key
    assert one["texts"] == few["texts"]
    for key in ("logprobs", "token_entropy"):
        assert torch.allclose(one[key][mask], few[key][mask], rtol=0, atol=1e-5), key


def test_chunked_logprobs_equal_the_full_vocabulary_computation(monkeypatch):
    """Values and gradients of token_logprobs, LOGIT_CHUNK positions at a time, against
    log_softmax of the model's own full logits; under bf16 autocast the kept logits stay fp32."""
    model, tok = egpo.build_tiny_model(seed=0)
    policy = egpo.Policy(model)
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": [tok("12+34=46")["input_ids"], tok("5+7=12")["input_ids"]]}, return_tensors="pt")
    ids, attn = batch["input_ids"], batch["attention_mask"]
    logits = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
    expected = (logits[:, -5:-1] / 0.7).log_softmax(-1).gather(-1, ids[:, -4:, None])[..., 0]
    expected.sum().backward()
    expected_grad = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(egpo, "LOGIT_CHUNK", 3)  # 8 positions: chunks of 3, 3, 2
    lp = egpo.token_logprobs(policy, ids, attn, 4, 0.7)
    lp.sum().backward()
    assert torch.allclose(lp, expected, atol=1e-6)
    assert all((p.grad - g).norm() <= 1e-5 * g.norm() for p, g in zip(model.parameters(), expected_grad))
    hidden, head, targets = torch.randn(6, 64), model.lm_head.weight, ids[0, :6]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_bf16 = egpo.chunk_logprobs(hidden, head, targets, 0.7)
    assert under_bf16.dtype == torch.float32 and torch.equal(under_bf16, egpo.chunk_logprobs(hidden, head, targets, 0.7))


def test_first_ppo_ratio_is_exactly_one_on_cpu():
    cfg = egpo.resolve(egpo.Config(max_new_tokens=12, temperature=0.8))
    model, tok = egpo.load_policy(cfg, torch.device("cpu"))
    batch = egpo.rollout(model, tok, [tok("1+2=")["input_ids"], tok("12+34=")["input_ids"]], ["3", "46"], 4, cfg)
    args = (batch["input_ids"], batch["attention_mask"], batch["response_mask"].shape[1])
    old = egpo.no_grad_logprobs(model, *args, cfg)  # how rl_step takes the old log-probs
    model.train()
    assert torch.equal(egpo.token_logprobs(model, *args, 0.8).detach(), old)  # the training forward


def sampled_batch(cfg, rewards=None):
    """A real rollout of the tiny model (random init) on two prompts; `rewards` replaces the
    verifier's (all 0 for an untrained model) so that a group can be mixed."""
    torch.manual_seed(0)
    model, tok = egpo.load_policy(cfg, torch.device("cpu"))
    batch = egpo.sample_batch(model, tok, lambda: ([tok("12+34=")["input_ids"], tok("5+7=")["input_ids"]],
                                                   ["46", "12"], torch.rand(8, cfg.max_new_tokens)), cfg)
    if rewards is not None:
        batch["rewards"] = rewards
    return model, batch


def edge_grpo_by_hand(model, batch, cfg):
    """EDGE-GRPO's advantages from the full distribution, computed here without egpo's helpers."""
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    n = mask.shape[1]
    with torch.no_grad():
        logits = model.lm(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
    dist = torch.distributions.Categorical(logits=logits[:, -n - 1:-1] / cfg.temperature)
    p = (dist.entropy() * mask).sum(1) / mask.sum(1)                                    # (N,)
    rows = []
    for r, pg, a in zip(batch["rewards"].view(-1, 4), p.view(-1, 4), egpo.grpo_advantages(batch["rewards"], 4).view(-1, 4)):
        rows.append((pg.mean() / (pg + 1e-6)).clamp(0.5, 2.0) * a)
    return torch.cat(rows)


@pytest.mark.parametrize("algo", ["egpo", "grpo", "edge-grpo"])
def test_rl_step_gradient_is_that_of_the_policy_loss_on_the_algorithms_advantages(algo):
    """One rl_step on a fixed batch (micro-batches of 3, so accumulation is exercised) leaves
    exactly the gradient of Eq. 12 on the whole batch with that algorithm's advantages."""
    cfg = egpo.resolve(egpo.Config(algo=algo, max_new_tokens=10, group_size=4, micro_batch_size=3,
                                   max_grad_norm=1e9))
    model, batch = sampled_batch(cfg, rewards=t(1, 0, 1, 0, 0, 0, 0, 0))  # one mixed, one all-wrong group
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    n = mask.shape[1]
    with torch.no_grad():
        old = egpo.token_logprobs(model.eval(), ids, attn, n, cfg.temperature)
    adv = {"egpo": egpo.egpo_advantages(batch["rewards"], egpo.sequence_entropy(old, mask), 4),
           "grpo": egpo.grpo_advantages(batch["rewards"], 4),
           "edge-grpo": edge_grpo_by_hand(model, batch, cfg)}

    def gradient(advantages):
        model.train()
        model.zero_grad()
        egpo.policy_loss(egpo.token_logprobs(model, ids, attn, n, cfg.temperature), old, advantages, mask)[0].backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    expected = gradient(adv[algo])
    assert all(not torch.allclose(gradient(a), expected) for k, a in adv.items() if k != algo)  # the test can tell
    model.zero_grad()
    egpo.rl_step(model, None, torch.optim.SGD(model.parameters(), lr=0.0), batch, cfg)
    assert torch.allclose(torch.cat([p.grad.flatten() for p in model.parameters()]), expected, rtol=1e-4, atol=1e-7)


def test_edge_grpo_clamps_its_weights_to_half_and_two_on_its_own_line(monkeypatch):
    """EDGE-GRPO's w = clip(Pbar / (P + 1e-6), 0.5, 2), for right and wrong answers alike, times Eq. 2's
    A, by hand group by group, with P spread so that both bounds act; EGPO's function is never called."""
    cfg = egpo.resolve(egpo.Config(algo="edge-grpo", max_new_tokens=8, group_size=4, log_completions=True))
    model, batch = sampled_batch(cfg, rewards=t(1, 0, 1, 0, 1, 1, 0, 0))
    batch["token_entropy"] = batch["token_entropy"] * t(0.1, 1, 5, 1, 0.2, 0.3, 4, 1)[:, None]
    monkeypatch.setattr(egpo, "egpo_advantages", None)  # a change to EGPO's clamp cannot reach EDGE-GRPO
    rows = egpo.rl_step(model, None, torch.optim.SGD(model.parameters(), lr=0.0), batch, cfg)["completions"]
    mask = batch["response_mask"]
    p = ((batch["token_entropy"] * mask).sum(1) / mask.sum(1)).tolist()
    expected, clamped = [], set()
    for g in range(2):
        r, pg = batch["rewards"][4 * g:4 * g + 4].tolist(), p[4 * g:4 * g + 4]
        mean_r, std_r = sum(r) / 4, (sum((x - sum(r) / 4) ** 2 for x in r) / 3) ** 0.5
        for x, pi in zip(r, pg):
            w = sum(pg) / 4 / (pi + 1e-6)
            clamped |= {0.5} if w < 0.5 else {2.0} if w > 2 else set()
            expected.append(min(max(w, 0.5), 2.0) * (x - mean_r) / (std_r + 1e-6))
    assert clamped == {0.5, 2.0}  # both bounds act
    assert [r["egpo_advantage"] for r in rows] == pytest.approx(expected, rel=1e-5)


def test_micro_batches_weigh_the_logged_kl_by_their_tokens():
    """The logged k3 KL (and clip_frac) of a step is the token-mean over the whole batch, whatever the
    micro-batches: three of 3, 3 and 2 responses (unequal shares) log what one batch logs."""
    logged = []
    for micro_batch_size in (None, 3):
        cfg = egpo.resolve(egpo.Config(max_new_tokens=10, group_size=4, mu=2, beta=0.1, max_grad_norm=0,
                                       micro_batch_size=micro_batch_size))
        model, batch = sampled_batch(cfg, rewards=t(1, 0, 1, 0, 0, 0, 0, 0))
        ref = copy.deepcopy(model).requires_grad_(False)
        logged.append(egpo.rl_step(model, ref, torch.optim.SGD(model.parameters(), lr=10.0), batch, cfg))
    assert logged[0]["kl"] > 0 and logged[1]["kl"] == pytest.approx(logged[0]["kl"], rel=1e-4)


def test_mu_epochs_start_from_zero_gradients():
    """--mu 2 with lr 0: both epochs see the same parameters, so the gradient left after the
    second is one epoch's, not the sum of two."""
    cfg1 = egpo.resolve(egpo.Config(max_new_tokens=10, group_size=4, max_grad_norm=1e9))
    cfg2 = egpo.resolve(egpo.Config(max_new_tokens=10, group_size=4, max_grad_norm=1e9, mu=2))
    grads = []
    for cfg in (cfg1, cfg2):
        model, batch = sampled_batch(cfg, rewards=t(1, 0, 1, 0, 0, 0, 0, 0))
        egpo.rl_step(model, None, torch.optim.SGD(model.parameters(), lr=0.0), batch, cfg)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[1], grads[0], rtol=1e-5, atol=1e-8)


def test_mu_2_takes_its_second_step_against_the_samplers_pi_old():
    """--mu 2 with a real learning rate: the second epoch's ratio is pi_theta1 / pi_old, with pi_old
    the policy that sampled (not the moved one), so some tokens leave the clip range; the weights
    equal two SGD steps taken by hand with policy_loss."""
    cfg = egpo.resolve(egpo.Config(max_new_tokens=10, group_size=4, mu=2, max_grad_norm=0))
    model, batch = sampled_batch(cfg, rewards=t(1, 0, 1, 0, 0, 0, 0, 0))
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    n, lr = mask.shape[1], 30.0
    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        old = egpo.token_logprobs(by_hand.eval(), ids, attn, n, cfg.temperature)
    adv = egpo.egpo_advantages(batch["rewards"], egpo.sequence_entropy(batch["logprobs"], batch["entropy_mask"]), 4)
    sgd = torch.optim.SGD(by_hand.parameters(), lr=lr)
    weights = [torch.cat([p.detach().flatten() for p in by_hand.parameters()])]
    for _ in range(2):
        sgd.zero_grad()
        by_hand.train()
        egpo.policy_loss(egpo.token_logprobs(by_hand, ids, attn, n, cfg.temperature), old, adv, mask)[0].backward()
        sgd.step()
        weights.append(torch.cat([p.detach().flatten() for p in by_hand.parameters()]))
    assert not torch.allclose(weights[1], weights[0])  # pi moved between the epochs
    metrics = egpo.rl_step(model, None, torch.optim.SGD(model.parameters(), lr=lr), batch, cfg)
    assert torch.allclose(torch.cat([p.detach().flatten() for p in model.parameters()]), weights[2], atol=1e-5)
    assert metrics["clip_frac"] > 0  # the second epoch's ratios reach the clip


def test_a_failed_rename_leaves_the_previous_checkpoint_to_resume(in_one_go, tmp_path, monkeypatch, capsys):
    """The swap of checkpoint.new/ for checkpoint/ fails (a real error from the rename): the previous
    checkpoint is still there, as checkpoint.old/, summary.json names it, and the run resumes from it."""
    run = tmp_path / "run"
    shutil.copytree(in_one_go(), run)
    real_replace = os.replace

    def no_second_rename(src, dst, *args, **kwargs):
        if str(src).endswith("checkpoint.new"):
            raise OSError(5, "Input/output error")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", no_second_rename)
    with pytest.raises(SystemExit) as e:
        egpo.main(["--resume", str(run), "--steps", "4"])
    assert e.value.code == 2 and "Input/output error" in capsys.readouterr().err
    monkeypatch.undo()
    assert read_json(run / "summary.json")["last_checkpoint"] == {"path": str(run / "checkpoint.old"), "step": 3}
    assert egpo.last_checkpoint(str(run))["step"] == 3
    egpo.main(["--resume", str(run), "--steps", "4"])
    assert read_json(run / "checkpoint" / "trainer_state.json")["step"] == 4


def test_a_truncated_response_is_kept_whole_and_counted():
    cfg = egpo.resolve(egpo.Config(max_new_tokens=4, group_size=4))
    model, batch = sampled_batch(cfg)
    response = batch["input_ids"][:, -4:]
    no_eos = ~(response == 1).any(1)  # the tiny tokenizer's <eos> is id 1
    assert no_eos.sum() >= 4 and torch.equal(batch["truncated"], no_eos)  # a random model rarely stops
    assert batch["response_mask"][no_eos].all()  # every token of a cut-off response is trained on
    metrics = egpo.rl_step(model, None, torch.optim.SGD(model.parameters(), lr=0.0), batch, cfg)
    assert metrics["truncated_frac"] == no_eos.float().mean().item()


def test_dapo_dynamic_sampling_keeps_mixed_groups_until_the_batch_is_full(monkeypatch):
    """B = 3 groups of G = 2. Round 1: all-wrong, mixed, all-correct; round 2: three mixed, of
    which the batch needs two. The batch is round 1's group 1 and round 2's groups 0 and 1; 6
    groups were drawn. Then: nothing mixed in 2 rounds keeps the last round as it is."""
    schedule = iter([t(0, 0, 1, 0, 1, 1), t(0, 1, 1, 0, 1, 0), t(0, 0, 0, 0, 0, 0), t(1, 1, 1, 1, 1, 1)])
    real_rollout, seen = egpo.rollout, []

    def rollout(*args, **kwargs):  # the real sampler; the rewards follow the schedule
        batch = real_rollout(*args, **kwargs)
        batch["rewards"] = next(schedule)
        seen.append(batch)
        return batch

    monkeypatch.setattr(egpo, "rollout", rollout)
    cfg = egpo.resolve(egpo.Config(algo="dapo", prompts_per_step=3, group_size=2, max_new_tokens=6))
    model, tok = egpo.load_policy(cfg, torch.device("cpu"))
    questions = iter([["1+2=", "3+4=", "5+6="], ["10+20=", "300+400=", "7+8="], ["1+1=", "2+2=", "3+3="],
                      ["4+4=", "5+5=", "6+6="]])

    def draw():
        return [tok(q)["input_ids"] for q in next(questions)], ["0"] * 3, torch.rand(6, cfg.max_new_tokens)

    batch = egpo.sample_batch(model, tok, draw, cfg)
    assert batch["groups_sampled"] == 6 and batch["rewards"].tolist() == [1, 0, 0, 1, 1, 0]
    assert batch["prompts"] == ["3+4=", "3+4=", "10+20=", "10+20=", "300+400=", "300+400="]
    expected = [(0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]  # (round, row) of each kept row

    def tokens(b, r):  # prompt and response of row r, padding taken away
        n = b["response_mask"].shape[1]
        prompt = b["input_ids"][r, :-n][b["attention_mask"][r, :-n].bool()]
        return prompt.tolist(), b["input_ids"][r, -n:][b["response_mask"][r]].tolist()

    for row, (k, i) in enumerate(expected):
        assert tokens(batch, row) == tokens(seen[k], i)
        assert batch["texts"][row] == seen[k]["texts"][i]
    m = egpo.rl_step(model, None, torch.optim.SGD(model.parameters(), lr=0.0), batch, cfg)
    assert (m["groups_mixed"], m["groups_sampled"], cfg.clip_eps_high) == (3, 6, 0.28)
    cfg.max_resample = 2
    fallback = egpo.sample_batch(model, tok, draw, cfg)
    assert fallback["groups_sampled"] == 6 and fallback["prompts"] == [q for q in ("4+4=", "5+5=", "6+6=") for _ in "ab"]
    assert fallback["input_ids"].shape[0] == 6 and fallback["rewards"].tolist() == [1.0] * 6


def test_dapo_under_torchrun_tops_a_short_batch_up_with_uniform_groups(monkeypatch):
    """As rank 0 of 2 processes, the other one full: after --max-resample 2 rounds this process has
    1 mixed group of the 3 it needs, so the last round's first 2 uniform groups fill its batch
    (advantage 0), and both processes hold as many rows."""
    schedule = iter([t(0, 1, 0, 0, 1, 1), t(0, 0, 1, 1, 0, 0)])
    real_rollout = egpo.rollout
    monkeypatch.setattr(egpo, "rollout", lambda *args, **kwargs: {**real_rollout(*args, **kwargs),
                                                                  "rewards": next(schedule)})
    monkeypatch.setattr(egpo, "rank_and_world_size", lambda: (0, 2))
    monkeypatch.setattr(egpo, "all_reduce", lambda x, device, op="sum": torch.as_tensor(x, dtype=torch.float64))
    cfg = egpo.resolve(egpo.Config(algo="dapo", prompts_per_step=6, group_size=2, max_new_tokens=6,
                                   max_resample=2))
    model, tok = egpo.load_policy(cfg, torch.device("cpu"))
    questions = iter([["1+2=", "3+4=", "5+6="], ["10+20=", "30+40=", "7+8="]])

    def draw():
        return [tok(q)["input_ids"] for q in next(questions)], ["0"] * 3, torch.rand(6, cfg.max_new_tokens)

    batch = egpo.sample_batch(model, tok, draw, cfg)
    assert batch["groups_sampled"] == 6 and batch["rewards"].tolist() == [0, 1, 0, 0, 1, 1]
    assert batch["prompts"] == ["1+2=", "1+2=", "10+20=", "10+20=", "30+40=", "30+40="]


def test_end_of_turn_is_a_stop_token_and_thinking_follows_the_flag(tmp_path):
    model, tok = egpo.build_tiny_model(seed=0)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})  # Qwen-style: eos stays <eos>
    model.resize_token_embeddings(len(tok))
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% if enable_thinking is defined and "
                         "not enable_thinking %}<think></think>{% endif %}{% endif %}")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = egpo.resolve(egpo.Config(model=str(tmp_path), max_new_tokens=6))
    model, tok = egpo.load_policy(cfg, torch.device("cpu"))
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.lm.generation_config.eos_token_id == [tok.eos_token_id, im_end]
    assert egpo.eos_mask(torch.tensor([[5, im_end, 7, 8]]), model.lm.generation_config.eos_token_id).tolist() == \
        [[True, True, False, False]]  # nothing the model writes after its turn ends is trained on
    assert tok.decode(egpo.build_prompt(tok, "1+1=", "toy")).endswith("<assistant><think></think>")
    assert tok.decode(egpo.build_prompt(tok, "1+1=", "toy", thinking=True)).endswith("<assistant>")
    _, plain = egpo.build_tiny_model(seed=0)
    assert egpo.end_of_turn_id(plain) is None  # no template, no extra stop token


def test_prompt_formats():
    _, tok = egpo.build_tiny_model(seed=0)
    assert tok.decode(egpo.build_prompt(tok, "12+3=", "toy")) == "12+3="
    plain = tok.decode(egpo.build_prompt(tok, "What is 2+2?", "gsm8k"))
    assert plain.startswith("Question: What is 2+2?\n") and "\\boxed{}" in plain and plain.endswith("Answer:")
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    chat = tok.decode(egpo.build_prompt(tok, "12+3=", "toy"))
    assert chat.startswith("<user>12+3=\n") and chat.endswith("<assistant>")


def test_warm_up_stops_once_it_reaches_its_target():
    """Two problems to memorise: the warm-up stops at the first check (every 10 steps) where
    greedy decoding gets both right, long before --sft-steps; with no target it runs them all."""
    cfg = egpo.resolve(egpo.Config(sft_steps=400, sft_target=1.0, sft_batch_size=2))
    model, tok = egpo.load_policy(cfg, torch.device("cpu"))
    rows = [egpo.toy_problem(47, 38), egpo.toy_problem(12, 9)]
    prompts = [tok(r["question"])["input_ids"] for r in rows]
    torch.manual_seed(0)
    steps = egpo.sft_warmup(model, tok, rows, prompts, cfg, random.Random(0))
    assert steps < 400 and steps % 10 == 0
    assert egpo.rollout(model, tok, prompts, ["85", "21"], 1, cfg, greedy=True)["rewards"].tolist() == [1.0, 1.0]
    cfg.sft_steps, cfg.sft_target = 7, 0.0
    assert egpo.sft_warmup(model, tok, rows, prompts, cfg, random.Random(0)) == 7


def test_the_warm_up_puts_no_bos_token_inside_a_sequence():
    """A tokenizer that adds BOS (Llama 3, Mistral, Gemma): each warm-up sequence is the prompt
    (with its BOS) + the solution + eos, and has no second BOS before the solution."""
    from tokenizers import processors

    model, tok = egpo.build_tiny_model(seed=0)
    tok.add_special_tokens({"bos_token": "<bos>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.bos_token_id)])
    model.resize_token_embeddings(len(tok))
    assert tok("12+9=")["input_ids"][0] == tok.bos_token_id
    rows = [egpo.toy_problem(47, 38), egpo.toy_problem(12, 9)]
    prompts = [egpo.build_prompt(tok, r["question"], "toy") for r in rows]
    policy, seen = egpo.Policy(model), []
    forward = policy.lm.forward
    policy.lm.forward = lambda **kwargs: seen.append(kwargs) or forward(**kwargs)
    cfg = egpo.resolve(egpo.Config(sft_steps=1, sft_target=0.0, sft_batch_size=2))
    egpo.sft_warmup(policy, tok, rows, prompts, cfg, random.Random(0))
    targets = {len(p): tok(r["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
               for p, r in zip(prompts, rows)}
    expected = {tuple(p + targets[len(p)]) for p in prompts}
    assert {tuple(x[x != tok.pad_token_id].tolist()) for x in seen[0]["input_ids"]} == expected
    for ids, labels in zip(seen[0]["input_ids"], seen[0]["labels"]):  # the loss: on the solution only
        n = len(next(p for p in prompts if ids[:len(p)].tolist() == p))
        assert (labels[:n] == -100).all() and labels[n:n + len(targets[n])].tolist() == targets[n]


def test_the_kv_cache_keeps_keys_and_values_in_bf16_under_autocast():
    """Rotary embeddings promote the keys to fp32 under bf16 autocast; the sampler's cache keeps
    them in bf16 like the values: 2 x layers x rows x KV heads x positions x head size x 2 bytes.
    Greedy sampling under autocast still gives generate()'s tokens."""
    torch.manual_seed(0)
    model, _ = egpo.build_tiny_model(seed=0)
    policy = egpo.Policy(model).eval()
    ids = torch.randint(3, 90, (4, 10))
    attn = torch.ones_like(ids)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, cache = policy(ids, attn, attn.cumsum(1) - 1, 1.0)
        _, cache = policy(ids[:, :1], torch.cat([attn, attn[:, :1]], 1), torch.full((4, 1), 10), 1.0, cache=cache)
        tensors = [x for layer in cache.layers for x in (layer.keys, layer.values)]
        assert {x.dtype for x in tensors} == {torch.bfloat16}
        assert sum(x.numel() * x.element_size() for x in tensors) == 2 * 2 * 4 * 4 * 11 * 16 * 2
        ids[0, :3], attn[0, :3] = 0, 0  # one left-padded row
        reference = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=20,
                                   eos_token_id=[1], pad_token_id=0)[:, 10:]
        tokens = egpo.sample(policy, ids, attn, [1], 0, 20)[0]
    assert torch.equal(tokens, reference)


def weight_casts(policy, new_tokens, monkeypatch):
    """How many times egpo.sample casts a weight (a tensor of a parameter's shape) under bf16 autocast,
    here on the CPU (where egpo.py itself does not autocast), sampling `new_tokens` tokens."""
    monkeypatch.setattr(egpo, "autocast", lambda device, bf16: torch.autocast("cpu", dtype=torch.bfloat16))
    shapes = {tuple(p.shape) for p in policy.parameters()}
    ids = torch.randint(3, 90, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        tokens = egpo.sample(policy, ids, torch.ones_like(ids), [], 0, new_tokens, bf16=True)[0]
    assert tokens.shape[1] == new_tokens  # no stop token: every step ran
    return sum(e.name == "aten::_to_copy" and tuple(e.input_shapes[0]) in shapes for e in prof.events())


def test_the_sampler_casts_the_weights_once_per_rollout(monkeypatch):
    """One autocast for the whole generation: the bf16 copies of the weights are made at the first
    forward (2 layers x 10 weights and biases) and reused; none at the tokens after it."""
    torch.manual_seed(0)
    policy, _ = egpo.load_policy(egpo.resolve(egpo.Config()), torch.device("cpu"))
    first = weight_casts(policy, 1, monkeypatch)
    assert first == 20 and weight_casts(policy, 6, monkeypatch) == first


def test_a_rollouts_kv_cache_is_freed_without_the_garbage_collector(monkeypatch):
    """Reference counting alone frees each cache when its rollout ends: no cycle keeps it (and its GPU
    memory) alive until Python's collector runs, which counts objects, not bytes."""
    torch.manual_seed(0)
    policy, _ = egpo.load_policy(egpo.resolve(egpo.Config()), torch.device("cpu"))
    made, kv_cache = [], egpo.kv_cache
    monkeypatch.setattr(egpo, "kv_cache", lambda config: made.append(weakref.ref(cache := kv_cache(config))) or cache)
    ids = torch.randint(3, 90, (3, 5), generator=torch.Generator().manual_seed(0))
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            egpo.sample(policy, ids, torch.ones_like(ids), [], 0, 4)
        alive = [ref() is not None for ref in made]
    finally:
        gc.enable()
    assert alive == [False, False]


def test_transformers_before_5_24_name_the_cache_past_key_values(monkeypatch):
    """A model whose forward takes past_key_values (and swallows unknown keywords), and whose output
    has no `cache`, as before transformers 5.24: the sampler passes and keeps its cache all the same."""
    from transformers.models.qwen2 import modeling_qwen2

    torch.manual_seed(0)
    cfg = egpo.resolve(egpo.Config())
    policy, _ = egpo.load_policy(cfg, torch.device("cpu"))
    ids = torch.randint(3, 90, (3, 5), generator=torch.Generator().manual_seed(0))
    noise = torch.rand(3, 6, generator=torch.Generator().manual_seed(1))
    expected = egpo.sample(policy, ids, torch.ones_like(ids), [], 0, 6, noise=noise)
    forward = modeling_qwen2.Qwen2Model.forward
    name = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"  # this version's

    def before_5_24(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=None, **kwargs):
        assert "cache" not in kwargs
        out = forward(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=use_cache, **{name: past_key_values})
        return types.SimpleNamespace(last_hidden_state=out.last_hidden_state, past_key_values=past_key_values)

    monkeypatch.setattr(modeling_qwen2.Qwen2Model, "forward", before_5_24)
    got = egpo.sample(egpo.Policy(policy.lm), ids, torch.ones_like(ids), [], 0, 6, noise=noise)
    assert all(torch.equal(x, y) for x, y in zip(got, expected))


def test_max_grad_norm_0_means_no_clipping():
    """Hugging Face's convention: --max-grad-norm 0 trains on the whole gradient (it used to zero
    it), and logs its norm."""
    grads, norms = [], []
    for max_grad_norm in (0.0, 1e9):
        cfg = egpo.resolve(egpo.Config(max_new_tokens=10, group_size=4, max_grad_norm=max_grad_norm))
        model, batch = sampled_batch(cfg, rewards=t(1, 0, 1, 0, 0, 0, 0, 0))
        norms.append(egpo.rl_step(model, None, torch.optim.SGD(model.parameters(), lr=0.0), batch, cfg)["grad_norm"])
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].norm() > 0 and torch.equal(grads[0], grads[1])
    assert norms[0] == norms[1] == pytest.approx(grads[0].norm().item(), rel=1e-5)


def test_max_grad_norm_clips_the_gradient_to_it():
    """The gradient's norm before clipping is logged; the one the optimizer takes is --max-grad-norm."""
    cfg = egpo.resolve(egpo.Config(max_new_tokens=10, group_size=4, max_grad_norm=1e-3))
    model, batch = sampled_batch(cfg, rewards=t(1, 0, 1, 0, 0, 0, 0, 0))
    norm = egpo.rl_step(model, None, torch.optim.SGD(model.parameters(), lr=0.0), batch, cfg)["grad_norm"]
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert norm > 10 * 1e-3 and clipped == pytest.approx(1e-3, rel=1e-4)


# ---------------------------------------------------------------- command line, end to end
def run_cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, str(HERE / "egpo.py"), *args], capture_output=True, text=True,
                          cwd=HERE, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, **kwargs)


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def read_json(path):
    return json.loads(Path(path).read_text())


def assert_close(x: dict, y: dict, rel=1e-5):
    """The same keys and numbers to a relative tolerance; an undefined number (null) only where the
    other is undefined too."""
    assert sorted(x) == sorted(y)
    for k in x:
        assert (x[k] is None) == (y[k] is None) and (x[k] is None or x[k] == pytest.approx(y[k], rel=rel, abs=1e-7)), k


def without(records, keys):
    return [{k: v for k, v in r.items() if k not in keys} for r in records]


def test_cli_smoke_two_rl_steps_log_every_metric_and_the_checkpoint_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = run_cli(*QUICK, "--out", str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert set(SPEC_KEYS) <= set(r)
    assert 0 <= records[-1]["eval_acc"] <= 1 and "eval_acc" not in records[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint")
    tok = AutoTokenizer.from_pretrained(tmp_path / "checkpoint")
    assert tok.decode(tok("12+3=")["input_ids"]) == "12+3="
    assert model.config.model_type == "qwen2" and model.config.hidden_size == 64
    config = read_json(tmp_path / "config.json")
    assert config["calibration"] == "asymmetric" and config["lr"] == 1e-4
    assert "held-out" in p.stdout and "before RL" in p.stdout


def test_same_seed_twice_gives_identical_metrics(tmp_path):
    for name in ("a", "b"):
        egpo.main(QUICK + ["--steps", "3", "--out", str(tmp_path / name)])
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert json.dumps(without(a, egpo.TIME_KEYS)) == json.dumps(without(b, egpo.TIME_KEYS))
    egpo.main(QUICK + ["--steps", "3", "--seed", "1", "--out", str(tmp_path / "c")])
    assert json.dumps(without(read_metrics(tmp_path / "c"), egpo.TIME_KEYS)) != json.dumps(without(a, egpo.TIME_KEYS))


def test_steps_0_is_a_warmed_up_checkpoint_and_its_evaluation(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    egpo.main(QUICK + ["--steps", "0", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    summary = read_json(tmp_path / "summary.json")
    assert summary["steps_done"] == 0 and "after" not in summary and 0 <= summary["before"]["eval_acc"] <= 1
    assert summary["sft_steps_done"] == 4 and "warm-up: 4 supervised steps" in out
    assert read_metrics(tmp_path) == []
    assert "before RL" in out and "after RL" not in out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").config.model_type == "qwen2"


def strict_json(text):
    """json.loads as jq and JavaScript read it: NaN and Infinity are not JSON."""
    return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))


def test_outputs_are_strict_json_and_a_local_benchmark_is_named_by_its_file(tmp_path):
    """An untrained model gets every answer wrong: the AUROCs and the weights are undefined, and
    the files say null. A local benchmark's keys carry its file's stem, or the NAME of NAME=PATH."""
    (tmp_path / "data").mkdir()
    bench = tmp_path / "data" / "benchA.jsonl"
    bench.write_text("".join(json.dumps(egpo.toy_problem(a, 7)) + "\n" for a in range(10, 15)))
    gsm = write_parquet(tmp_path / "data" / "g.parquet", SCHEMAS["gsm8k"])
    egpo.main(QUICK + ["--steps", "1", "--eval-datasets", f"{bench},gsm8k={gsm}", "--out", str(tmp_path / "run")])
    step = strict_json((tmp_path / "run" / "metrics.jsonl").read_text())
    summary = strict_json((tmp_path / "run" / "summary.json").read_text())
    assert step["acc"] == 0 and step["auroc_confidence"] is None and step["weight_mean"] is None
    assert summary["before"]["benchA/eval_auroc"] is None and summary["after"]["gsm8k/eval_acc"] == 0
    assert {k.split("/")[0] for k in summary["before"]} == {"benchA", "gsm8k"}


def test_a_checkpoint_of_the_tiny_model_gets_the_tiny_defaults(tmp_path):
    """Its config and its character tokenizer are the tiny model's: evaluating it, or training it
    further, needs no flag spelled out (it is warmed up already: no second warm-up)."""
    egpo.main(QUICK + ["--out", str(tmp_path / "run")])
    checkpoint = str(tmp_path / "run" / "checkpoint")
    cfg = egpo.resolve(egpo.Config(model=checkpoint))
    assert (cfg.dataset, cfg.lr, cfg.max_new_tokens, cfg.sft_steps, cfg.eval_samples, cfg.micro_batch_tokens,
            cfg.device, cfg.bf16, cfg.eval_temperature) == ("toy", 1e-4, 40, 0, 1, None, "cpu", False, 1.0)
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(egpo.toy_problem(a, 7)) + "\n" for a in range(10, 14)))
    egpo.main(["--model", checkpoint, "--steps", "0", "--eval-datasets", str(bench), "--out", str(tmp_path / "eval")])
    assert read_json(tmp_path / "eval" / "summary.json")["before"]["bench/eval_acc"] >= 0
    egpo.main(["--model", checkpoint, "--steps", "2", "--eval-size", "8", "--out", str(tmp_path / "more")])
    assert [r["step"] for r in read_metrics(tmp_path / "more")] == [1, 2]
    assert read_json(tmp_path / "more" / "config.json")["lr"] == 1e-4
    assert "sft_steps_done" not in read_json(tmp_path / "more" / "summary.json")


def test_log_completions_agree_with_the_metrics_and_the_equations(tmp_path):
    egpo.main(QUICK + ["--steps", "3", "--log-completions", "--out", str(tmp_path)])
    metrics = read_metrics(tmp_path)
    rows = [json.loads(line) for line in open(tmp_path / "completions.jsonl")]
    assert len(rows) == 3 * 2 * 4 and [r["step"] for r in rows] == [1] * 8 + [2] * 8 + [3] * 8
    for m in metrics:
        step = [r for r in rows if r["step"] == m["step"]]
        assert [r["group"] for r in step] == [0] * 4 + [1] * 4
        assert len({r["prompt"] for r in step[:4]}) == 1 and step[0]["prompt"].endswith("=")
        rewards = torch.tensor([r["reward"] for r in step])
        entropy = torch.tensor([r["entropy"] for r in step])
        assert rewards.mean().item() == pytest.approx(m["acc"])
        assert entropy.mean().item() == pytest.approx(m["entropy_mean"], rel=1e-5)
        for r in step:  # the verifier, again
            assert r["reward"] == egpo.verify(r["completion"], str(sum(map(int, r["prompt"][:-1].split("+")))))
        assert torch.allclose(torch.tensor([r["advantage"] for r in step]), egpo.grpo_advantages(rewards, 4))
        assert torch.allclose(torch.tensor([r["egpo_advantage"] for r in step]),
                              egpo.egpo_advantages(rewards, entropy, 4))


def test_the_tiny_demo_does_not_depend_on_the_number_of_threads(tmp_path):
    """This process runs on one thread; a command started with two gives the same numbers."""
    egpo.main(QUICK + ["--steps", "1", "--eval-size", "4", "--out", str(tmp_path / "1")])
    p = run_cli(*QUICK, "--steps", "1", "--eval-size", "4", "--out", str(tmp_path / "2"), env={"OMP_NUM_THREADS": "2"},
                timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    one, two = read_metrics(tmp_path / "1"), read_metrics(tmp_path / "2")
    assert json.dumps(without(one, egpo.TIME_KEYS)) == json.dumps(without(two, egpo.TIME_KEYS))


def test_evaluation_does_not_disturb_training(tmp_path):
    egpo.main(QUICK + ["--steps", "3", "--eval-every", "1", "--eval-size", "4", "--out", str(tmp_path / "often")])
    egpo.main(QUICK + ["--steps", "3", "--eval-size", "4", "--out", str(tmp_path / "end")])
    often, end = read_metrics(tmp_path / "often"), read_metrics(tmp_path / "end")
    assert ["eval_acc" in r for r in often] == [True, True, True]
    eval_keys = [k for k in often[-1] if k.startswith("eval")]
    assert json.dumps(without(often, egpo.TIME_KEYS + tuple(eval_keys))) == \
        json.dumps(without(end, egpo.TIME_KEYS + tuple(eval_keys)))
    assert often[-1]["eval_acc"] == end[-1]["eval_acc"]


@pytest.mark.parametrize("flags", [
    {"algo": "grpo"}, {"algo": "dapo"}, {}, {"calibration": "symmetric"}, {"calibration": "neg-only"},
    {"calibration": "pos-only"}, {"nsr": "flat"}, {"nsr": "off"}, {"renorm": "after-clamp"},
    {"renorm": "before-clamp"}, {"lambda_min": 0.99}, {"lambda_max": 1.01}, {"lambda_min": 0.5, "lambda_max": 3.0},
])
def test_rl_step_trains_on_the_advantages_its_flags_ask_for(flags):
    """The flags reach the advantages: every logged Ã equals egpo_advantages with those flags
    (GRPO's A for grpo and dapo), on a batch with a mixed and an all-wrong group; and with these
    entropies each flag changes Ã (the weights w^ lie on both sides of each bound that is given)."""
    cfg = egpo.resolve(egpo.Config(max_new_tokens=8, group_size=4, log_completions=True, **flags))
    model, batch = sampled_batch(cfg, rewards=t(1, 0, 1, 0, 0, 0, 0, 0))
    batch["logprobs"] = batch["logprobs"] * t(0.25, 0.25, 3, 3, 0.5, 1, 1.5, 3)[:, None]  # H: sure to unsure
    rows = egpo.rl_step(model, None, torch.optim.SGD(model.parameters(), lr=0.0), batch, cfg)["completions"]
    logged = torch.tensor([r["egpo_advantage"] for r in rows])
    rewards, entropy = batch["rewards"], torch.tensor([r["entropy"] for r in rows])
    calibration = {k: v for k, v in flags.items() if k != "algo"}
    expected = egpo.grpo_advantages(rewards, 4) if "algo" in flags else \
        egpo.egpo_advantages(rewards, entropy, 4, **calibration)
    assert torch.allclose(logged, expected, atol=1e-6)
    assert (logged[4:] == 0).all() == ("algo" in flags or flags.get("nsr") == "off")  # NSR acts, or not
    if flags and "algo" not in flags:
        assert not torch.allclose(expected, egpo.egpo_advantages(rewards, entropy, 4), atol=1e-4)
    w_hat = egpo.confidence_ratio(entropy, 4)
    for bound in ("lambda_min", "lambda_max"):
        if bound in flags:
            assert (w_hat < flags[bound]).any() and (w_hat > flags[bound]).any()


def test_micro_batches_by_responses_or_by_tokens():
    cfg = egpo.resolve(egpo.Config(model="some/model"))  # real models: at most 8192 tokens per forward
    assert egpo.micro_batches(64, 600, cfg) == [slice(i, min(i + 13, 64)) for i in range(0, 64, 13)]  # 13 x 600
    assert egpo.micro_batches(64, 10_000, cfg) == [slice(i, i + 1) for i in range(64)]  # longer than the budget
    cfg.micro_batch_size = 8  # a size, when given, wins
    assert egpo.micro_batches(20, 600, cfg) == [slice(0, 8), slice(8, 16), slice(16, 20)]
    assert egpo.micro_batches(20, 600, egpo.resolve(egpo.Config())) == [slice(0, 20)]  # tiny: the whole batch


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_micro_batching_does_not_change_the_update(tmp_path, loss_agg):
    one = QUICK + ["--steps", "1", "--eval-size", "0", "--loss-agg", loss_agg]
    egpo.main(one + ["--out", str(tmp_path / "whole")])
    egpo.main(one + ["--micro-batch-size", "3", "--out", str(tmp_path / "micro")])
    whole, micro = read_metrics(tmp_path / "whole")[0], read_metrics(tmp_path / "micro")[0]
    assert whole["acc"] == micro["acc"] and whole["completion_len"] == micro["completion_len"]
    assert micro["loss"] == pytest.approx(whole["loss"], rel=1e-4, abs=1e-6)
    assert micro["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("flags", [
    ["--beta", "0.1"], ["--mu", "2"], ["--renorm", "after-clamp"], ["--renorm", "before-clamp"],
    ["--calibration", "symmetric"], ["--calibration", "neg-only"], ["--calibration", "pos-only"],
    ["--nsr", "flat"], ["--nsr", "off"], ["--algo", "dapo"], ["--algo", "edge-grpo"],
    ["--entropy-span", "answer"], ["--loss-agg", "seq-mean-token-mean"], ["--toy-digits", "3", "--sft-steps", "20"],
])
def test_every_variant_runs_end_to_end(tmp_path, flags):
    egpo.main(QUICK + ["--eval-size", "0"] + flags + ["--out", str(tmp_path)])
    records = read_metrics(tmp_path)
    assert len(records) == 2
    numbers = [v for r in records for k, v in r.items() if not k.startswith(("weight", "entropy_", "auroc", "nsr"))]
    assert all(math.isfinite(v) for v in numbers)
    if "--beta" in flags:  # after one update the policy has moved away from its frozen reference
        assert records[0]["kl"] == 0.0 and records[1]["kl"] > 0.0
    if "dapo" in flags:  # dynamic sampling draws at least B groups and keeps only mixed ones (or, if none, the last B)
        assert all(r["groups_sampled"] >= 2 and (r["groups_mixed"] in (0, 2)) for r in records)


def save_tiny(path, chat_template=None, layers=2):
    """The tiny model saved with save_pretrained; with another number of layers it is not a
    checkpoint of the tiny model, and egpo.py gives it a real model's defaults."""
    from transformers import Qwen2ForCausalLM

    model, tok = egpo.build_tiny_model(seed=0)
    if layers != 2:
        model = Qwen2ForCausalLM(model.config.__class__(**{**egpo.TINY_CONFIG, "num_hidden_layers": layers}))
    tok.chat_template = chat_template
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_parquet(path, rows):
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def test_real_model_path_runs_on_a_local_model_and_a_gsm8k_schema_parquet(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "model", chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
                          layers=1)
    rows = [{"question": f"What is {a} plus {a}?", "answer": f"{a} + {a} = <<{a}+{a}={2 * a}>>{2 * a}\n#### {2 * a}"}
            for a in range(20)]
    data = write_parquet(tmp_path / "train.parquet", rows)
    egpo.main(["--model", str(model_dir), "--dataset", str(data), "--steps", "2", "--prompts-per-step", "2",
               "--group-size", "2", "--max-new-tokens", "8", "--eval-size", "4", "--device", "cpu",
               "--gradient-checkpointing", "--out", str(tmp_path / "run")])
    records = read_metrics(tmp_path / "run")
    assert len(records) == 2 and set(SPEC_KEYS) <= set(records[0])
    config = read_json(tmp_path / "run" / "config.json")
    assert (config["lr"], config["micro_batch_tokens"], config["sft_steps"]) == (1e-6, 8192, 0)  # real-model defaults
    assert (config["max_new_tokens"], config["eval_every"], config["save_every"]) == (8, 50, 50)
    assert "evaluation on held-out (4)" in capsys.readouterr().out


# ---------------------------------------------------------------- the paper's benchmarks and protocol
# One parquet per hub dataset, in the schema of its dataset card (README, "Datasets"), read through
# the same loader as the hub copy (NAME=PATH).
SCHEMAS = {
    "math500": [{"problem": "What is $1+1$?", "solution": "It is $\\boxed{2}$.", "answer": "2", "subject": "Algebra",
                 "level": 1, "unique_id": "test/algebra/1.json"},
                {"problem": "Simplify $\\frac{2}{4}$.", "solution": "$\\boxed{\\frac12}$", "answer": "\\frac{1}{2}",
                 "subject": "Algebra", "level": 2, "unique_id": "test/algebra/2.json"}],
    "aime24": [{"id": 60, "problem": "Every morning Aya walks.", "solution": "... so 204.", "answer": "204",
                "url": "https://artofproblemsolving.com", "year": "2024"}],
    "minerva": [{"problem": "How far?", "solution": "s = 45 / 3600 = \\boxed{1.6} \\mathrm{~cm}", "type": "Astronomy",
                 "idx": 0},
                {"problem": "No box here.", "solution": "just text", "type": "Astronomy", "idx": 1}],
    "gsm8k": [{"question": "Janet has 3 ducks and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"}],
    "mmlu-stem": [{"question": "2 + 2 =", "choices": ["3", "4", "5", "22"], "subject": "elementary_mathematics",
                   "answer": 1},
                  {"question": "Which bone?", "choices": ["a", "b", "c", "d"], "subject": "anatomy", "answer": 0}],
    "openr1": [{"problem": p, "solution": s, "answer": a, "problem_type": "Algebra", "question_type": q,
                "source": "olympiads", "uuid": str(i), "is_reasoning_complete": [True], "generations": ["..."],
                "correctness_math_verify": [True], "correctness_llama": None, "finish_reasons": ["stop"],
                "correctness_count": 1, "messages": [{"role": "user", "content": p}]}
               for i, (p, s, a, q) in enumerate([("Find x if 2x = 6.", "x = \\boxed{3}", "3", "math-word-problem"),
                                                 ("Find x if 2x = 6.", "x = \\boxed{3}", "3", "math-word-problem"),
                                                 ("Prove that 2 > 1.", "Trivial.", "proof", "proof"),
                                                 ("Prove that 1 + 1 = 2.", "So 2.", "2", "proof"),
                                                 ("Find y.", "unknown", "notfound", "math-word-problem"),
                                                 ("What is 1/2 + 1/4?", "\\boxed{\\frac34}", "\\frac{3}{4}", "MCQ")])],
}
EXPECTED = {
    "math500": [("What is $1+1$?", "2"), ("Simplify $\\frac{2}{4}$.", "\\frac{1}{2}")],
    "aime24": [("Every morning Aya walks.", "204")],
    "minerva": [("How far?", "1.6")],  # the solution's last \boxed{}; a row without one is left out
    "gsm8k": [("Janet has 3 ducks and buys 2. How many?", "5")],
    "mmlu-stem": [("2 + 2 =\n\nA) 3\nB) 4\nC) 5\nD) 22\n\nAnswer with the letter of the correct option.", "B")],
    "openr1": [("Find x if 2x = 6.", "3"), ("What is 1/2 + 1/4?", "\\frac{3}{4}")],  # no duplicate, proof, notfound
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_each_dataset_loader_reads_its_hub_schema(tmp_path, name):
    path = write_parquet(tmp_path / f"{name}.parquet", SCHEMAS[name])
    rows = egpo.read_dataset(f"{name}={path}")
    assert [(r["question"], r["answer"]) for r in rows] == EXPECTED[name]


def test_rows_without_an_answer_are_left_out_and_answers_are_read_as_written(tmp_path):
    """A JSON null or an empty CSV cell is no gold answer (not the string 'None', which
    \\boxed{none} would match); a CSV column is read as the text written in it ('4', not '4.0')."""
    rows = [{"question": "1+3=", "answer": 4}, {"question": "2+2=", "answer": None}, {"question": "5+5=", "answer": 10},
            {"question": None, "answer": 3}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(r["question"], r["answer"]) for r in egpo.read_dataset(str(tmp_path / "a.jsonl"))] == \
        [("1+3=", "4"), ("5+5=", "10")]
    (tmp_path / "a.csv").write_text("question,answer\n1+3=,4\n2+2=,\n5+5=,10\nIs it NA?,NA\n")
    assert [(r["question"], r["answer"]) for r in egpo.read_dataset(str(tmp_path / "a.csv"))] == \
        [("1+3=", "4"), ("5+5=", "10"), ("Is it NA?", "NA")]
    math500 = write_parquet(tmp_path / "m.parquet", [dict(SCHEMAS["math500"][0], answer=None), SCHEMAS["math500"][1]])
    assert [r["answer"] for r in egpo.read_dataset(f"math500={math500}")] == ["\\frac{1}{2}"]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"question": "1+3=", "answer": a}) + "\n" for a in "45"))
    assert [r["answer"] for r in egpo.read_dataset(str(tmp_path / "b.jsonl"))] == ["4"]  # the first of duplicates


def test_each_benchmark_gets_its_own_prompt_whatever_the_training_set(tmp_path):
    """--dataset toy, a model without a chat template: the held-out split keeps the toy's format,
    while MATH-500 gets the \\boxed{} instruction and MMLU-STEM its options and the same instruction."""
    _, tok = egpo.build_tiny_model(seed=0)
    math = write_parquet(tmp_path / "math.parquet", SCHEMAS["math500"])
    mmlu = write_parquet(tmp_path / "mmlu.parquet", SCHEMAS["mmlu-stem"])
    cfg = egpo.resolve(egpo.Config(eval_datasets=f"math500={math},mmlu-stem={mmlu}"))
    sets = egpo.eval_sets(cfg, tok, [])
    instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    assert tok.decode(sets["math500/"][0][0]) == f"Question: What is $1+1$?\n{instruction}\nAnswer:"
    assert tok.decode(sets["mmlu-stem/"][0][0]) == f"Question: {EXPECTED['mmlu-stem'][0][0]}\n{instruction}\nAnswer:"
    held_out = egpo.eval_sets(egpo.resolve(egpo.Config()), tok, [egpo.toy_problem(12, 3)])
    assert tok.decode(held_out[""][0][0]) == "12+3="


def test_a_local_copy_in_the_wrong_schema_is_a_clear_error(tmp_path, capsys):
    path = write_parquet(tmp_path / "qa.parquet", [{"question": "1+1", "answer": "2"}] * 3)
    expect_user_error(["--steps", "0", "--sft-steps", "0", "--eval-datasets", f"math500={path}", "--out", str(tmp_path)],
                      capsys, "math500 needs 'problem' and 'answer'", "missing: problem")


def test_multiple_choice_is_verified_by_its_letter():
    for completion in ["\\boxed{B}", "so \\boxed{(B)}", "\\boxed{B) 4}", "\\boxed{\\text{(B)}}", "\\boxed{\\textbf{(B)}}",
                       "\\boxed{\\mathrm{B}}", "\\boxed{\\textbf{\\text{(B)}}}", "\\boxed{B.}", "I think...\nANSWER: B", "ANSWER: (B) 4"]:
        assert egpo.verify(completion, "B") == 1.0, completion
    for completion in ["\\boxed{A}", "\\boxed{Because}", "\\boxed{4}", "ANSWER: C", "B", None, "\\boxed{A, B}",
                       "\\boxed{A and B}", "\\boxed{(B) and (C)}", "\\boxed{b}", "\\boxed{B_1}", "\\boxed{B^2}"]:
        assert egpo.verify(completion, "B") == 0.0, completion


def test_evaluation_defaults_are_the_papers_for_real_models():
    real = egpo.resolve(egpo.Config(model="some/model"))
    assert (real.eval_samples, real.eval_temperature, real.eval_top_p, real.eval_top_k,
            real.eval_max_new_tokens) == (8, 0.6, 0.95, 20, 512)
    tiny = egpo.resolve(egpo.Config(temperature=0.9, top_p=0.8, max_new_tokens=33))
    assert (tiny.eval_samples, tiny.eval_temperature, tiny.eval_top_p, tiny.eval_top_k,
            tiny.eval_max_new_tokens) == (1, 0.9, 0.8, 0, 33)


def test_pass_at_1_is_the_mean_over_k_samples_with_its_standard_error(monkeypatch):
    """3 problems, k = 4, the verifier's rewards replaced on real rollouts: pass@1 per problem
    (0.5, 0, 1), mean 0.5, standard error std / sqrt(3) = 0.5 / sqrt(3); greedy (1, 0, 1)."""
    rewards = iter([t(1, 0, 1), t(1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1)])
    real_rollout, truncated, greedy = egpo.rollout, [], []

    def rollout(*args, **kwargs):
        batch = real_rollout(*args, **kwargs)
        batch["rewards"] = next(rewards)
        truncated.append(batch["truncated"])
        greedy.append(kwargs.get("greedy", False))
        return batch

    monkeypatch.setattr(egpo, "rollout", rollout)
    cfg = egpo.resolve(egpo.Config(eval_samples=4, eval_max_new_tokens=5, eval_temperature=0.7, eval_top_k=5))
    policy, tok = egpo.load_policy(cfg, torch.device("cpu"))
    m = egpo.evaluate(policy, tok, [tok(q)["input_ids"] for q in ("1+2=", "3+4=", "5+6=")], ["3", "7", "11"], cfg,
                      prefix="toy/")
    assert m["toy/eval_acc"] == pytest.approx(2 / 3) and m["toy/eval_acc_sampled"] == pytest.approx(0.5)
    assert m["toy/eval_acc_sampled_se"] == pytest.approx(0.5 / 3 ** 0.5)
    assert m["toy/eval_truncated"] == pytest.approx(truncated[1].float().mean().item())  # the samples', not greedy's
    assert len(truncated[1]) == 12 and greedy == [True, False]  # eval_acc is the greedy answers'


def test_evaluation_only_on_benchmarks_writes_one_table(tmp_path, capsys):
    """--steps 0 on a checkpoint: every benchmark in summary.json and one table on the console."""
    model_dir = save_tiny(tmp_path / "model")
    gsm = write_parquet(tmp_path / "gsm8k.parquet", SCHEMAS["gsm8k"] * 1 + [
        {"question": f"What is {a} + 1?", "answer": f"#### {a + 1}"} for a in range(5)])
    mmlu = write_parquet(tmp_path / "mmlu.parquet", SCHEMAS["mmlu-stem"] + [dict(SCHEMAS["mmlu-stem"][0], question="3 =")])
    egpo.main(["--model", str(model_dir), "--dataset", "toy", "--steps", "0", "--eval-samples", "3",
               "--eval-max-new-tokens", "6", "--eval-datasets", f"gsm8k={gsm},mmlu-stem={mmlu}", "--device", "cpu",
               "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    summary = read_json(tmp_path / "run" / "summary.json")
    assert "after" not in summary and summary["steps_done"] == 0
    for name in ("gsm8k", "mmlu-stem"):
        assert {f"{name}/eval_acc", f"{name}/eval_acc_sampled", f"{name}/eval_acc_sampled_se", f"{name}/eval_truncated",
                f"{name}/eval_auroc", f"{name}/eval_entropy_correct", f"{name}/eval_entropy_incorrect"} <= set(summary["before"])
        assert re.search(rf"^{name} +\d+\.\d% +\d+\.\d% ± +\d+\.\d%", out, re.M), out
    assert out.count("pass@1 ± s.e. (k=3)") == 1 and "evaluation on gsm8k (6), mmlu-stem (2)" in out


def test_openr1_prompts_longer_than_1024_tokens_are_left_out(tmp_path, capsys):
    model, tok = egpo.build_tiny_model(seed=0)
    model.config.max_position_embeddings = 4096  # rotary positions: a longer context is only a number
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    long = dict(SCHEMAS["openr1"][0], problem="1+" * 600 + "1", uuid="long")  # > 1024 characters = tokens
    data = write_parquet(tmp_path / "openr1.parquet", SCHEMAS["openr1"] + [long])
    egpo.main(["--model", str(tmp_path / "model"), "--dataset", f"openr1={data}", "--steps", "0", "--eval-size", "0",
               "--max-new-tokens", "4", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert "2 train problems" in capsys.readouterr().out  # 3 verifiable, distinct problems; the long one dropped


def test_ctrl_c_saves_the_checkpoint_and_the_metrics_so_far(tmp_path):
    from transformers import AutoModelForCausalLM

    proc = subprocess.Popen([sys.executable, str(HERE / "egpo.py"), "--steps", "100000", "--sft-steps", "0",
                             "--eval-size", "0", "--out", str(tmp_path)], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,  # Ctrl-C's default, even where a shell ignores it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted after" in err
    records = read_metrics(tmp_path)
    summary = read_json(tmp_path / "summary.json")
    assert summary["interrupted"] and summary["steps_done"] == len(records) >= 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").config.model_type == "qwen2"


# ---------------------------------------------------------------- long runs: --resume
LONG = QUICK + ["--steps", "3", "--log-completions"]  # the run the tests below stop and resume


@pytest.fixture(scope="module")
def in_one_go(tmp_path_factory):
    """LONG (with these extra flags) run in one go, once per module: what a resumed run must equal."""
    runs = {}

    def run(*flags):
        if flags not in runs:
            runs[flags] = tmp_path_factory.mktemp("one-go")
            egpo.main(LONG + list(flags) + ["--out", str(runs[flags])])
        return runs[flags]
    return run


def assert_same_run(a, b):
    """The same final weights bit for bit, the same metrics.jsonl and completions.jsonl (the
    timings aside) and the same summary.json, its "before" the evaluation of the original start."""
    from safetensors.torch import load_file

    wa, wb = (load_file(d / "checkpoint" / "model.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.dumps(without(read_metrics(a), egpo.TIME_KEYS)) == json.dumps(without(read_metrics(b), egpo.TIME_KEYS))
    assert (a / "completions.jsonl").read_text() == (b / "completions.jsonl").read_text()
    assert read_json(a / "summary.json") == read_json(b / "summary.json")


def send_sigint_in_rl_step(monkeypatch, *calls):
    """Ctrl-C to this process at the start of the rl_step calls numbered `calls` (a call twice: twice)."""
    real_rl_step, n = egpo.rl_step, []

    def rl_step(*args, **kwargs):
        n.append(1)
        for _ in range(calls.count(len(n))):
            os.kill(os.getpid(), signal.SIGINT)
        return real_rl_step(*args, **kwargs)

    monkeypatch.setattr(egpo, "rl_step", rl_step)
    return n


@pytest.mark.parametrize("flags", [(), ("--algo", "dapo", "--beta", "0.1", "--mu", "2")], ids=["egpo", "dapo-kl-mu2"])
def test_a_run_stopped_and_resumed_ends_as_the_run_in_one_go(in_one_go, flags, tmp_path, monkeypatch):
    """Ctrl-C during step 1 of 3 (the run stops after that step and saves), then --resume: the
    optimizer state, the step, the data position, every random generator, DAPO's draws and the
    frozen reference model all carry over."""
    calls = send_sigint_in_rl_step(monkeypatch, 1)
    with pytest.raises(SystemExit) as e:
        egpo.main(LONG + list(flags) + ["--out", str(tmp_path)])
    assert e.value.code == 130 and [r["step"] for r in read_metrics(tmp_path)] == [1]
    assert read_json(tmp_path / "checkpoint" / "trainer_state.json")["step"] == 1
    egpo.main(["--resume", str(tmp_path)])
    assert len(calls) == 3
    assert_same_run(in_one_go(*flags), tmp_path)


def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(in_one_go, tmp_path):
    """SIGKILL in the middle of step 2's checkpoint (its model files written, its optimizer state
    not): checkpoint/ still holds step 1, whole, and --resume from it ends as the run in one go."""
    die_in_the_third_save = (  # torch.save writes the optimizer state, then the generators: twice per checkpoint
        "import os, signal, sys, torch, egpo\n"
        "saves, save = [], torch.save\n"
        "def save_or_die(*args, **kwargs):\n"
        "    saves.append(1)\n"
        "    if len(saves) == 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return save(*args, **kwargs)\n"
        "torch.save = save_or_die\n"
        "egpo.main(sys.argv[1:])\n")
    p = subprocess.run([sys.executable, "-c", die_in_the_third_save, *LONG, "--save-every", "1", "--out", str(tmp_path)],
                       cwd=HERE, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (tmp_path / "checkpoint.new" / "model.safetensors").exists()
    assert not (tmp_path / "checkpoint.new" / "trainer_state.json").exists()  # half-written, never read
    assert read_json(tmp_path / "checkpoint" / "trainer_state.json")["step"] == 1
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]  # step 2 was logged: it is done again
    egpo.main(["--resume", str(tmp_path)])
    assert_same_run(in_one_go(), tmp_path)


def test_resume_refuses_bad_input_with_one_line_and_changes_nothing(in_one_go, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(in_one_go(), run)

    def files():
        return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}

    for argv, words in [(["--model", "tiny"], ["--model", "drop it"]), (["--out", str(tmp_path)], ["--out"]),
                        (["--algo", "grpo"], ["--algo grpo differs from the run's --algo egpo"]),
                        (["--lr", "0.1"], ["--lr 0.1 differs from the run's --lr 0.0001"]),
                        (["--steps", "3"], ["has done 3 steps of its --steps 3"])]:
        before = files()
        expect_user_error(["--resume", str(run)] + argv, capsys, *words)
        assert files() == before
    expect_user_error(["--resume", str(tmp_path / "nowhere")], capsys, "not a run folder")
    checkpoint, config = run / "checkpoint", read_json(run / "config.json")
    for other in ({**config, "run_id": "another run"}, {k: v for k, v in config.items() if k != "run_id"}):
        (run / "config.json").write_text(json.dumps(other))  # another run's config, or a config without an id
        expect_user_error(["--resume", str(run), "--steps", "4"], capsys, "is not the checkpoint of the run",
                          f"--model {checkpoint}")
    (run / "config.json").write_text(json.dumps(config))

    class RunsCode:  # what a malicious pickle does when it is loaded without weights_only=True
        def __reduce__(self):
            return open, (str(tmp_path / "code-ran"), "w")

    optimizer = (checkpoint / "optimizer.pt").read_bytes()
    torch.save({"state": RunsCode()}, checkpoint / "optimizer.pt")
    before = files()
    expect_user_error(["--resume", str(run), "--steps", "4"], capsys, "more than tensors and plain values")
    assert files() == before and not (tmp_path / "code-ran").exists()
    (checkpoint / "optimizer.pt").write_bytes(optimizer)
    (checkpoint / "trainer_state.json").unlink()  # as a write cut off would leave it
    expect_user_error(["--resume", str(run), "--steps", "4"], capsys, "no readable trainer_state.json")
    shutil.rmtree(checkpoint)
    expect_user_error(["--resume", str(run), "--steps", "4"], capsys, "has no checkpoint to resume from")


def test_an_fsdp_run_resumes_on_as_many_processes_only(in_one_go, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(in_one_go(), run)
    state = read_json(run / "checkpoint" / "trainer_state.json")
    (run / "checkpoint" / "trainer_state.json").write_text(json.dumps({**state, "world_size": 2}))
    cfg = egpo.parse_args(["--resume", str(run), "--steps", "4"])
    assert egpo.resume_point(cfg, 1)["step"] == 3  # DDP: 2 processes' checkpoint on 1
    with pytest.raises(egpo.UserError, match="with --fsdp, whose optimizer state is sharded by process"):
        egpo.resume_point(dataclasses.replace(cfg, fsdp=True), 1)


def test_a_checkpoint_is_found_after_a_kill_between_the_two_renames(in_one_go, tmp_path):
    """save_checkpoint moves checkpoint/ to checkpoint.old/, then checkpoint.new/ to checkpoint/: a
    kill in between leaves checkpoint.old/, whole, and a complete checkpoint.new/ is not trusted. A
    checkpoint.old/ left beside checkpoint/ (a kill while it was being deleted) is replaced."""
    run = tmp_path / "run"
    shutil.copytree(in_one_go(), run)
    (run / "checkpoint").rename(run / "checkpoint.old")
    assert egpo.last_checkpoint(str(run))["path"] == str(run / "checkpoint.old")
    shutil.copytree(run / "checkpoint.old", run / "checkpoint.new")
    assert egpo.last_checkpoint(str(run))["path"] == str(run / "checkpoint.old")
    shutil.copytree(run / "checkpoint.old", run / "checkpoint")
    egpo.main(["--resume", str(run), "--steps", "4"])
    assert read_json(run / "checkpoint" / "trainer_state.json")["step"] == 4
    assert sorted(p.name for p in run.glob("checkpoint*")) == ["checkpoint"]


def test_ctrl_c_in_the_last_step_ends_the_run_and_twice_stops_at_once_without_a_checkpoint(tmp_path, monkeypatch):
    send_sigint_in_rl_step(monkeypatch, 3)
    egpo.main(LONG + ["--out", str(tmp_path / "last")])  # the run is done: no exit code 130
    assert "interrupted" not in read_json(tmp_path / "last" / "summary.json")
    send_sigint_in_rl_step(monkeypatch, 1, 1)
    with pytest.raises(SystemExit) as e:
        egpo.main(LONG + ["--out", str(tmp_path / "twice")])
    assert e.value.code == 130 and read_metrics(tmp_path / "twice") == []
    assert read_json(tmp_path / "twice" / "summary.json")["interrupted"]
    assert not (tmp_path / "twice" / "checkpoint").exists()  # step 1 was half done


def test_a_folder_named_tiny_does_not_change_what_tiny_means(tmp_path, monkeypatch):
    save_tiny(tmp_path / "tiny", layers=1)  # not the tiny model
    monkeypatch.chdir(tmp_path)
    assert egpo.is_tiny("tiny") and not egpo.is_tiny(str(tmp_path / "tiny"))


def test_an_empty_resume_starts_a_new_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": "other"}))  # not a run to take over
    cfg = egpo.parse_args(["--resume", "", "--steps", "3"])
    assert cfg.resume == "" and cfg.out is None and cfg.steps == 3 and cfg.model == "tiny"


# ---------------------------------------------------------------- a run folder belongs to one run
def folder_files(folder):
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_a_new_run_refuses_a_folder_that_holds_a_run_and_overwrite_replaces_it_whole(in_one_go, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(in_one_go(), run)
    before = folder_files(run)
    expect_user_error(QUICK + ["--seed", "1", "--out", str(run)], capsys, "holds a run already", f"--resume {run}",
                      "--overwrite")
    assert folder_files(run) == before
    (run / "notes.txt").write_text("mine")  # not a run's file: kept
    egpo.main(QUICK + ["--seed", "1", "--overwrite", "--out", str(run)])
    config = read_json(run / "config.json")
    assert config["seed"] == 1 and config["run_id"] != json.loads(before[run / "config.json"])["run_id"]
    assert not (run / "completions.jsonl").exists()  # the old run's, which this one does not write
    assert [r["step"] for r in read_metrics(run)] == [1, 2] and (run / "notes.txt").read_text() == "mine"
    assert read_json(run / "checkpoint" / "trainer_state.json")["run_id"] == config["run_id"]


def test_a_checkpoint_of_another_run_is_never_resumed(in_one_go, tmp_path, monkeypatch, capsys):
    """A run stopped in its warm-up, before any checkpoint: another run's checkpoint put in its folder
    is refused by --resume, and the stopped run names no checkpoint as its own."""
    def stop_in_warmup(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(egpo, "sft_warmup", stop_in_warmup)
    with pytest.raises(SystemExit) as e:
        egpo.main(LONG + ["--lr", "0.01", "--out", str(tmp_path)])
    assert e.value.code == 130 and read_json(tmp_path / "summary.json")["interrupted"]
    assert "model in" not in capsys.readouterr().out
    shutil.copytree(in_one_go() / "checkpoint", tmp_path / "checkpoint")
    expect_user_error(["--resume", str(tmp_path)], capsys, "is not the checkpoint of the run")


def test_the_last_checkpoint_is_written_through_one_ctrl_c_and_given_up_at_two(tmp_path):
    """SIGINT (a real one) as the end-of-run save starts: the run still ends with its checkpoint and
    is not interrupted. Twice: it stops at once, and summary.json says which checkpoint is left."""
    ctrl_c_in_last_save = (  # a checkpoint's first torch.save writes optimizer.pt: step 2's, then step 3's
        "import os, signal, sys, torch, egpo\n"
        "times, saves, save = int(sys.argv.pop(1)), [], torch.save\n"
        "def save_after_ctrl_c(obj, path, *args, **kwargs):\n"
        "    saves.append(str(path).endswith('optimizer.pt'))\n"
        "    if saves[-1] and sum(saves) == 2:\n"
        "        for _ in range(times):\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "    return save(obj, path, *args, **kwargs)\n"
        "torch.save = save_after_ctrl_c\n"
        "egpo.main(sys.argv[1:])\n")
    for times in (1, 2):
        out = tmp_path / f"ctrl-c-{times}"
        p = subprocess.run([sys.executable, "-c", ctrl_c_in_last_save, str(times), *LONG, "--save-every", "2",
                            "--out", str(out)], cwd=HERE, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
        summary, state = read_json(out / "summary.json"), read_json(out / "checkpoint" / "trainer_state.json")
        assert summary["steps_done"] == 3 and "Traceback" not in p.stderr, p.stderr[-2000:]
        if times == 1:
            assert p.returncode == 0 and "interrupted" not in summary and state["step"] == 3
            assert "stopping once the last checkpoint is written" in p.stderr
        else:
            assert p.returncode == 130 and summary["interrupted"] and state["step"] == 2
            assert summary["checkpoint_error"].startswith("step 3: KeyboardInterrupt")
            assert summary["last_checkpoint"] == {"path": str(out / "checkpoint"), "step": 2}
            assert "checkpoint of step 3 was not written" in p.stdout


def test_a_failed_save_is_one_line_and_summary_json_names_the_checkpoint_left(tmp_path, monkeypatch, capsys):
    real_save, saves = torch.save, []

    def disk_full_at_the_second_save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 3:  # optimizer.pt of step 2 (each checkpoint: optimizer.pt, rng.pt)
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_the_second_save)
    with pytest.raises(SystemExit) as e:
        egpo.main(LONG + ["--save-every", "1", "--out", str(tmp_path)])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert e.value.code == 2 and last.startswith("error: could not write"), last
    assert "No space left on device" in last and "holds step 1" in last
    summary = read_json(tmp_path / "summary.json")
    assert summary["steps_done"] == 2 and summary["last_checkpoint"]["step"] == 1
    assert read_json(tmp_path / "checkpoint" / "trainer_state.json")["step"] == 1


def test_config_and_summary_are_written_whole_or_not_at_all(in_one_go, tmp_path):
    """A file-size limit (as a full disk) stops a resumed run while it rewrites config.json: the
    run's config.json and summary.json are left as they were, and the run resumes later."""
    resource = pytest.importorskip("resource")
    run = tmp_path / "run"
    shutil.copytree(in_one_go(), run)
    config, summary = (run / "config.json").read_bytes(), (run / "summary.json").read_bytes()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    p = subprocess.run([sys.executable, str(HERE / "egpo.py"), "--resume", str(run), "--steps", "4"], cwd=HERE,
                       capture_output=True, text=True, timeout=300, preexec_fn=small_files,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode != 0 and len(config) > 1024
    assert (run / "config.json").read_bytes() == config and (run / "summary.json").read_bytes() == summary
    egpo.main(["--resume", str(run), "--steps", "4"])
    assert read_json(run / "summary.json")["steps_done"] == 4


def test_the_tiny_tokenizer_survives_save_and_reload(tmp_path):
    from transformers import AutoTokenizer

    model, tok = egpo.build_tiny_model(0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "Question: 12+30=\nPlease reason.\nAnswer: 8 #### 85 " + "".join(egpo.TINY_VOCAB[3:])
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and again(text)["input_ids"] == ids  # a token per character
    assert again.decode(ids) == tok.decode(ids) == text
    assert egpo.is_tiny(str(tmp_path))


def test_a_toy_task_of_ten_digits_and_more():
    tr, te = egpo.make_toy_task(12, 5, seed=0)  # more pairs than a range can hold
    assert len(te) == 5 and len({r["question"] for r in tr + te}) == len(tr) + len(te)
    assert all(egpo.verify(r["solution"], r["answer"]) == 1 for r in te)


def test_a_toy_task_whose_answers_do_not_fit_says_so(capsys):
    """4 digits: a worked answer is 46 characters and the stop token, over the default 40."""
    for digits in (4, 3):
        cfg = egpo.resolve(egpo.Config(toy_digits=digits, eval_size=4))
        policy, tok = egpo.load_policy(cfg, torch.device("cpu"))
        egpo.load_data(cfg, tok, policy)
        out = capsys.readouterr().out
        assert ("takes up to 47 tokens, more than --max-new-tokens 40" in out) == (digits == 4), out


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    expect_user_error(["--out", str(tmp_path / "file" / "run")], capsys, "is not a folder this run can write in")


def test_a_flag_is_never_abbreviated():
    with pytest.raises(SystemExit):
        egpo.parse_args(["--step", "0"])  # --step is not --steps


def test_resume_takes_its_checkpoint_folder_and_auto_device_and_records_a_moved_folder(in_one_go, tmp_path):
    run = tmp_path / "moved"
    shutil.copytree(in_one_go(), run)
    cfg = egpo.parse_args(["--resume", str(run / "checkpoint"), "--device", "auto", "--steps", "4"])
    assert (cfg.resume, cfg.out, cfg.device, cfg.steps) == (str(run), str(run), "cpu", 4)
    egpo.main(["--resume", str(run / "checkpoint"), "--steps", "4"])
    assert read_json(run / "config.json")["out"] == str(run)


def test_a_damaged_checkpoint_or_a_missing_reference_is_one_line_and_changes_nothing(in_one_go, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(in_one_go("--beta", "0.1"), run)
    shutil.move(run / "reference", tmp_path / "reference")
    before = folder_files(run)
    expect_user_error(["--resume", str(run), "--steps", "4"], capsys, "reference/", "is missing")
    assert folder_files(run) == before
    shutil.move(tmp_path / "reference", run / "reference")
    weights = run / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut off
    before = folder_files(run)
    expect_user_error(["--resume", str(run), "--steps", "4"], capsys, "could not load the model in")
    expect_user_error(["--model", str(run / "checkpoint"), "--out", str(tmp_path / "new")], capsys,
                      "could not load the model in")
    assert folder_files(run) == before and not (tmp_path / "new").exists()


def test_an_early_evaluation_is_named_by_its_step(tmp_path, monkeypatch, capsys):
    """Stopped after step 3 with --eval-every 2: "after" is the evaluation of step 2, and says so."""
    send_sigint_in_rl_step(monkeypatch, 3)
    with pytest.raises(SystemExit):
        egpo.main(QUICK + ["--steps", "5", "--eval-every", "2", "--out", str(tmp_path)])
    summary = read_json(tmp_path / "summary.json")
    assert (summary["steps_done"], summary["after_step"]) == (3, 2)
    assert summary["after"]["eval_acc"] == read_metrics(tmp_path)[1]["eval_acc"]
    assert "after 2 RL steps" in capsys.readouterr().out


def test_sigterm_before_the_rl_steps_leaves_a_summary(tmp_path):
    stop_in_warmup = ("import os, signal, sys, egpo\n"
                      "egpo.sft_warmup = lambda *args: os.kill(os.getpid(), signal.SIGTERM)\n"
                      "egpo.main(sys.argv[1:])\n")
    p = subprocess.run([sys.executable, "-c", stop_in_warmup, *QUICK, "--out", str(tmp_path)], cwd=HERE,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 130 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert read_json(tmp_path / "summary.json") == {"steps_done": 0, "interrupted": True}


def test_an_unreachable_hub_is_one_line_at_once_and_names_hf_hub_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    for flags in (["--model", "Qwen2.5-0.5B"], ["--dataset", "gsm8k"]):
        p = run_cli(*flags, "--out", str(tmp_path / "run"), env=env, timeout=300)
        err = p.stderr.strip()
        assert p.returncode == 2 and err.startswith("error: ") and "\n" not in err, err
        assert "does not answer" in err and "HF_HUB_OFFLINE=1" in err and "loading " in p.stdout, err


def test_help_documents_every_flag_of_the_spec(capsys):
    with pytest.raises(SystemExit) as e:
        egpo.parse_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for name in """model dataset algo calibration steps prompts-per-step group-size max-new-tokens temperature
    top-p lr beta clip-eps-low clip-eps-high loss-agg mu lambda-min lambda-max nsr renorm entropy-span
    max-resample thinking sft-steps sft-target toy-digits micro-batch-size gradient-checkpointing bf16 eval-every eval-size
    log-completions seed device out""".split():
        assert re.search(rf"--{name}\b(?!-)", text), name
    help_of = " ".join(text.split()).split("--entropy-span")[-1]
    assert "other --algo: only the logged entropies" in help_of  # accepted, and says what it does there


@pytest.mark.parametrize("cuda", [True, False])
def test_auto_device_and_bf16(cuda, monkeypatch):
    """The tiny demo runs on the CPU in fp32 (its README numbers are CPU numbers); a real model
    goes to CUDA when there is one, with bf16 autocast unless --no-bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda)
    tiny = egpo.resolve(egpo.parse_args([]))
    assert (tiny.device, tiny.bf16) == ("cpu", False)
    real = egpo.resolve(egpo.parse_args(["--model", "some/model"]))
    assert (real.device, real.bf16) == ("cuda" if cuda else "cpu", cuda)  # what is in effect
    assert egpo.resolve(egpo.parse_args(["--model", "some/model", "--no-bf16"])).bf16 is False
    if cuda:
        assert egpo.resolve(egpo.parse_args(["--bf16", "--device", "cuda"])).bf16 is True


def test_a_gpu_without_native_bf16_trains_in_fp32_and_says_so(monkeypatch, capsys):
    """A T4 (Colab's free tier) emulates bf16: auto chooses fp32 there, with a notice; --bf16 still forces it."""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: asked.append(
        including_emulation) or including_emulation)  # emulated only
    cfg = egpo.resolve(egpo.parse_args(["--model", "some/model"]))
    assert (cfg.device, cfg.bf16, asked) == ("cuda", False, [False])
    assert "no native bf16" in capsys.readouterr().out
    assert egpo.resolve(egpo.parse_args(["--model", "some/model", "--bf16"])).bf16 is True


def test_more_processes_than_gpus_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun --nproc_per_node 2 sets it, on a machine with 1 GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    expect_user_error(["--device", "cuda", "--out", str(tmp_path)], capsys, "2 processes", "1 GPU(s)",
                      "--nproc_per_node 1")


def test_the_peak_gpu_memory_is_each_steps_own(monkeypatch):
    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    cfg = egpo.resolve(egpo.Config(steps=3))
    run = egpo.Run(cfg, None, random.Random(0), torch.Generator(), torch.device("cuda"))
    for step in run.steps():  # a fresh peak at the start of each step
        assert resets == [torch.device("cuda")] * step


# ---------------------------------------------------------------- torchrun: DDP and FSDP on CPU (gloo)
# 17 held-out problems: shares of 8 and 9, so the processes run different numbers of rollouts
DIST = ["--steps", "2", "--sft-steps", "0", "--eval-size", "17", "--prompts-per-step", "4", "--group-size", "4",
        "--max-new-tokens", "30"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one-process")
    egpo.main(DIST + ["--log-completions", "--out", str(out)])
    return out


def torchrun(*args, nproc=2, **kwargs):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           str(HERE / "egpo.py"), *args], capture_output=True, text=True, cwd=HERE, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}, **kwargs)


@pytest.mark.parametrize("mode,nproc", [([], (2, 1)), ([], (1, 2)), (["--fsdp"], (2, 2))],
                         ids=["ddp-2-then-1", "ddp-1-then-2", "fsdp-2-then-2"])
def test_two_processes_make_the_update_and_the_metrics_of_one(one_process, tmp_path, mode, nproc):
    """torchrun with 2 CPU processes: each samples 2 of the 4 groups (the same rows as one process,
    from the same noise) and the token-mean denominator is summed over both, so after 2 steps the
    weights equal one process's to 1e-6 and so does every logged number but the timings. The two
    processes' responses have different numbers of tokens: a per-process denominator fails here.
    Each run stops after step 1 and is resumed to step 2: under DDP on the other number of processes
    (the prompts and noise are drawn alike on every process), under FSDP on as many, each process
    reloading its own shard of AdamW's state."""
    from safetensors.torch import load_file

    def run(n, *args):
        return torchrun(*args, nproc=n) if n > 1 else run_cli(*args, env={"OMP_NUM_THREADS": "1"}, timeout=600)

    p = run(nproc[0], *DIST, *mode, "--steps", "1", "--log-completions", "--out", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    if mode:
        assert {f.name for f in (tmp_path / "checkpoint").glob("optimizer*")} == {"optimizer-rank0.pt",
                                                                                 "optimizer-rank1.pt"}
    p = run(nproc[1], "--resume", str(tmp_path), "--steps", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("pass@1") == 2  # rank 0's summary only: a table before and one after RL
    assert read_json(tmp_path / "config.json")["world_size"] == nproc[0]
    one, two = (load_file(d / "checkpoint" / "model.safetensors") for d in (one_process, tmp_path))
    assert set(one) <= set(two) and max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-6
    a, b = (without(read_metrics(d), egpo.TIME_KEYS) + [read_json(d / "summary.json")["after"]]
            for d in (one_process, tmp_path))
    b[0] = {k: v for k, v in b[0].items() if not k.startswith("eval_")}  # the stopped run evaluated at step 1
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert_close(x, y)
    c1, c2 = ([json.loads(line) for line in (d / "completions.jsonl").read_text().splitlines()]
              for d in (one_process, tmp_path))  # every response of both processes, groups numbered globally
    assert [(r["group"], r["completion"], r["reward"]) for r in c1] == [(r["group"], r["completion"], r["reward"])
                                                                        for r in c2]


def count_gradient_reductions(rank, port, out):
    """Worker of the test below, one of 2 gloo processes: under DDP and under FSDP, one rl_step on
    a fixed batch (this process's 2 groups of 4) with one and with two micro-batches. Rank 0
    saves the number of gradient reductions (DDP's bucket all-reduces, counted by a comm hook;
    FSDP's reduce-scatters, one per sharded unit) and the full gradients."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    count, reduce_scatter = [], _fsdp_param_group.foreach_reduce
    _fsdp_param_group.foreach_reduce = lambda *args, **kwargs: count.append(1) or reduce_scatter(*args, **kwargs)
    questions = [("12+34=", "5+7="), ("3+4=", "99+1=")][rank]
    results = {}
    for fsdp in (False, True):
        for micro_batch_size in (8, 4):
            cfg = egpo.resolve(egpo.Config(max_new_tokens=6, group_size=4, prompts_per_step=4, fsdp=fsdp,
                                           micro_batch_size=micro_batch_size, max_grad_norm=0))
            torch.manual_seed(0)
            policy, tok = egpo.load_policy(cfg, torch.device("cpu"))
            policy = egpo.parallelize(policy, cfg)
            if not fsdp:
                policy.register_comm_hook(None, lambda _, bucket: count.append(1) or allreduce_hook(None, bucket))
            noise = torch.rand(8, 6, generator=torch.Generator().manual_seed(rank))
            batch = egpo.sample_batch(policy, tok, lambda: ([tok(q)["input_ids"] for q in questions], ["0", "0"], noise),
                                      cfg)
            batch["rewards"] = t(1, 0, 1, 0, 0, 1, 1, 1)
            count.clear()
            egpo.rl_step(policy, None, torch.optim.SGD(policy.parameters(), lr=0.0), batch, cfg)
            grads = [p.grad.full_tensor() if fsdp else p.grad for p in policy.parameters()]
            results[fsdp, micro_batch_size] = (len(count), torch.cat([g.flatten() for g in grads]))
    if rank == 0:
        torch.save(results, out)
    del policy  # as egpo.main: the models freed before their process group, not at exit, where gloo's
    gc.collect()  # teardown aborted (SIGABRT) in about 1 run in 20
    torch.distributed.destroy_process_group()


def sample_with_a_bf16_copy(rank, port, out):
    """Worker of the test below, one of 2 gloo processes: under FSDP with --bf16, full_weights gives
    a bf16 copy of the sharded weights, which rank 0 compares with its own unsharded model cast to
    bf16: the weights, the buffers, and greedy and sampled tokens and log-probs."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    cfg = egpo.resolve(egpo.Config(max_new_tokens=6, group_size=4, prompts_per_step=4, fsdp=True))
    torch.manual_seed(0)
    policy, tok = egpo.load_policy(cfg, torch.device("cpu"))
    reference = copy.deepcopy(policy)  # in bf16 but for its output layer, fp32 and untied
    for p in reference.parameters():
        p.data = p.data.to(torch.bfloat16)
    reference.lm.lm_head.weight = torch.nn.Parameter(policy.lm.lm_head.weight.detach().clone())
    sharded = egpo.parallelize(policy, cfg)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])  # one left-padded row
    attn = (ids != 0).long()
    noise = torch.rand(2, 6, generator=torch.Generator().manual_seed(0))
    results = {}
    with egpo.full_weights(sharded, bf16=True) as sampler:
        ours, theirs = (dict(sampler.named_parameters()), dict(reference.named_parameters()))
        results["weights"] = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        results["dtypes"] = {k: str(x.dtype) for k, x in ours.items() if x.dtype != torch.bfloat16}
        buffers = dict(reference.named_buffers())
        results["buffers"] = all(torch.equal(x, buffers[k]) for k, x in sampler.named_buffers())
        for name, u in (("greedy", None), ("sampled", noise)):
            a, b = (egpo.sample(m, ids, attn, [1], 0, 6, noise=u) for m in (sampler, reference))
            results[name] = all(torch.equal(x, y) for x, y in zip(a, b))
    if rank == 0:
        torch.save(results, out)
    del policy, sharded, sampler
    gc.collect()
    torch.distributed.destroy_process_group()


def test_fsdp_with_bf16_samples_from_a_bf16_copy_of_its_weights(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(sample_with_a_bf16_copy, args=(port, tmp_path / "out.pt"), nprocs=2)
    assert torch.load(tmp_path / "out.pt") == {"weights": True, "dtypes": {"lm.lm_head.weight": "torch.float32"},
                                               "buffers": True, "greedy": True, "sampled": True}


def test_gradients_are_reduced_once_per_optimizer_step(tmp_path):
    """DDP all-reduces and FSDP reduce-scatters the gradients after the last micro-batch only:
    two micro-batches reduce as often as one, and leave the same gradients (to 1e-6)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(count_gradient_reductions, args=(port, tmp_path / "out.pt"), nprocs=2)
    results = torch.load(tmp_path / "out.pt")
    for fsdp in (False, True):
        (n_one, one), (n_two, two) = results[fsdp, 8], results[fsdp, 4]
        assert n_one == n_two == (3 if fsdp else 1)  # FSDP: 2 decoder layers and the root; DDP: one bucket
        assert one.abs().sum() > 0 and torch.allclose(one, two, rtol=0, atol=1e-6)


def test_dapo_under_torchrun_and_ctrl_c_on_one_process_stops_both_and_saves(tmp_path):
    """DAPO's dynamic sampling with 2 processes: the same rounds on both, whole groups. SIGINT to
    rank 1 only: both processes stop after the same step, and rank 0 writes the checkpoint, the
    metrics so far and summary.json."""
    from transformers import AutoModelForCausalLM

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(HERE / "egpo.py"),
           *DIST, "--steps", "100000", "--eval-size", "0", "--algo", "dapo", "--max-resample", "2", "--out",
           str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    rank1 = [pid for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
             if b"RANK=1\0" in Path(f"/proc/{pid}/environ").read_bytes()]
    assert len(rank1) == 1
    os.kill(int(rank1[0]), signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert "interrupted after" in err, err[-2000:]
    records, summary = read_metrics(tmp_path), read_json(tmp_path / "summary.json")
    assert summary["interrupted"] and summary["steps_done"] == len(records) >= 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint").config.model_type == "qwen2"
    assert all(r["groups_sampled"] in (4, 8) for r in records)  # B = 4 groups, at most 2 rounds
    assert all(r["groups_all_correct"] + r["groups_all_wrong"] + r["groups_mixed"] == 4 for r in records)
    # resumed, then SIGTERM to every process (as torchrun and schedulers send it): one line says so
    proc = subprocess.Popen(cmd[:6] + ["--resume", str(tmp_path)], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and len(metrics.read_text().splitlines()) < len(records) + 2:
        time.sleep(0.2)
    for pid in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
        os.kill(int(pid), signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert err.count("SIGTERM: stopping after this step") == 1, err[-2000:]
    assert read_json(tmp_path / "summary.json")["steps_done"] > len(records)


def test_torchrun_errors(capsys, monkeypatch, tmp_path):
    expect_user_error(["--fsdp", "--out", str(tmp_path)], capsys, "torchrun --nproc_per_node N")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the check comes before joining the group
    expect_user_error(["--prompts-per-step", "3", "--out", str(tmp_path)], capsys, "multiple of the 2 processes")


# ---------------------------------------------------------------- errors: one line, exit code 2
def expect_user_error(argv, capsys, *words):
    capsys.readouterr()  # what came before
    with pytest.raises(SystemExit) as e:
        egpo.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("argv,words", [
    (["--group-size", "1"], ["--group-size must be >= 2"]),
    (["--prompts-per-step", "0"], ["--prompts-per-step must be >= 1"]),
    (["--steps", "-1"], ["--steps must be >= 0"]),
    (["--lambda-min", "1.5"], ["--lambda-min must be in (0, 1]"]),
    (["--lambda-max", "0.5"], ["--lambda-max must be >= 1"]),
    (["--lr", "0"], ["--lr must be > 0"]),
    (["--beta", "-0.1"], ["--beta must be >= 0"]),
    (["--algo", "dapo", "--max-resample", "0"], ["--max-resample must be >= 1"]),
    (["--eval-samples", "0"], ["--eval-samples must be >= 1"]),
    (["--eval-top-p", "1.5"], ["--eval-top-p must be in (0, 1]"]),
    (["--top-p", "0"], ["--top-p must be in (0, 1]"]),  # the open bounds: 0 itself is out
    (["--lambda-min", "0"], ["--lambda-min must be in (0, 1]"]),
    (["--temperature", "0"], ["--temperature must be > 0"]),
    (["--eval-datasets", "nope=x.parquet"], ["unknown dataset 'nope'", "math500"]),
    (["--algo", "grpo", "--calibration", "symmetric"], ["--calibration", "does nothing under --algo grpo"]),
    (["--algo", "dapo", "--nsr", "off", "--lambda-min", "0.5"], ["--lambda-min, --nsr", "--algo egpo"]),
    # rejected before any model is loaded: an unknown model would otherwise be the error
    (["--model", "no/model", "--max-grad-norm", "-1"], ["--max-grad-norm must be >= 0", "0 = no clipping"]),
    (["--model", "no/model", "--clip-eps-low", "1"], ["--clip-eps-low must be in [0, 1)"]),
    (["--model", "no/model", "--clip-eps-low", "-0.1"], ["--clip-eps-low must be in [0, 1)"]),
    (["--model", "no/model", "--clip-eps-high", "-0.5"], ["--clip-eps-high must be >= 0"]),
    (["--model", "no/model", "--clip-eps-high", "inf"], ["--clip-eps-high must be >= 0 (got inf)"]),
    (["--model", "no/model", "--temperature", "nan"], ["--temperature must be > 0 (got nan)"]),
    (["--model", "no/model", "--micro-batch-size", "0"], ["--micro-batch-size must be >= 1"]),
    (["--model", "no/model", "--micro-batch-tokens", "0"], ["--micro-batch-tokens must be >= 1"]),
    (["--model", "no/model", "--max-resample", "3"], ["--max-resample", "--algo dapo"]),
    (["--model", "no/model", "--algo", "grpo", "--max-resample", "3"], ["--max-resample", "--algo dapo"]),
    (["--model", "no/model", "--device", "cpu", "--bf16"], ["--bf16", "CUDA", "--device cpu"]),
])
def test_bad_flags_give_a_one_line_error(argv, words, capsys, tmp_path):
    expect_user_error(argv + ["--out", str(tmp_path)], capsys, *words)


def test_cuda_without_cuda_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    expect_user_error(["--device", "cuda", "--out", str(tmp_path)], capsys, "CUDA is not available", "--device cpu")


def test_unknown_model_with_the_hub_unreachable(tmp_path):
    p = run_cli("--model", "no-such-org/no-such-model", "--out", str(tmp_path), timeout=300)
    err = p.stderr.strip()
    assert p.returncode == 2 and err.startswith("error: ") and "\n" not in err, err
    assert "pass a local path" in err and "python egpo.py" in err


def test_the_tiny_model_on_a_file_says_what_it_needs_to_learn(tmp_path, capsys):
    egpo.resolve(egpo.parse_args(["--dataset", str(tmp_path / "mine.jsonl")]))
    out = capsys.readouterr().out
    assert "expect 0% reward" in out and "--sft-steps N" in out and "#### 42" in out
    egpo.resolve(egpo.parse_args([]))  # the toy task: nothing to say
    egpo.resolve(egpo.parse_args(["--dataset", str(tmp_path / "mine.jsonl"), "--sft-steps", "100"]))
    assert capsys.readouterr().out == ""


def test_dataset_errors(tmp_path, capsys):
    missing = str(tmp_path / "nope.jsonl")
    expect_user_error(["--dataset", missing, "--out", str(tmp_path)], capsys, "does not exist")
    (tmp_path / "data.txt").write_text("hello")
    expect_user_error(["--dataset", str(tmp_path / "data.txt"), "--out", str(tmp_path)], capsys,
                      ".jsonl/.json/.parquet/.csv")
    wrong = write_parquet(tmp_path / "wrong.parquet", [{"problem": "1+1", "solution": "2"}] * 4)
    expect_user_error(["--dataset", str(wrong), "--out", str(tmp_path)], capsys, "needs 'question' and 'answer'")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "1+1", "answer": "2"}\n{not json\n')
    expect_user_error(["--dataset", str(broken), "--out", str(tmp_path)], capsys, "could not read")
    plain = tmp_path / "plain.jsonl"  # answers without a worked solution: nothing to warm up on
    plain.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(9)))
    expect_user_error(["--dataset", str(plain), "--eval-size", "2", "--sft-steps", "5", "--out", str(tmp_path)],
                      capsys, "--sft-steps needs worked solutions")


def test_a_reading_error_without_a_message_is_still_one_line(tmp_path, capsys, monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise RuntimeError()  # some library errors carry no message

    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    monkeypatch.setattr(datasets, "load_dataset", fail)
    expect_user_error(["--dataset", str(data), "--out", str(tmp_path)], capsys, f"could not read {data} as jsonl: ?")


def test_prompt_longer_than_the_context_is_a_clear_error(tmp_path, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"question": "1+" * 150 + str(i), "answer": "151"}) + "\n" for i in range(4)))
    expect_user_error(["--dataset", str(data), "--eval-size", "1", "--out", str(tmp_path)], capsys,
                      "exceeds the model's context of 256", "--max-new-tokens")
    _, tok = egpo.build_tiny_model(0)  # prompts of 236 tokens: they fit alone, not with 40 more
    question = "1" * (235 - len(egpo.build_prompt(tok, "", "file")))
    assert len(egpo.build_prompt(tok, question + "0", "file")) == 236
    data.write_text("".join(json.dumps({"question": question + str(i), "answer": "1"}) + "\n" for i in range(4)))
    expect_user_error(["--dataset", str(data), "--eval-size", "1", "--out", str(tmp_path)], capsys,
                      "exceeds the model's context of 256")


# ---------------------------------------------------------------- scripts/: the commands behind the README's numbers
SCRIPTS = {}


def script(name):
    """scripts/NAME.py as a module: each is run here in a tiny setting, in this process."""
    if name not in SCRIPTS:
        spec = importlib.util.spec_from_file_location(name, HERE / "scripts" / f"{name}.py")
        SCRIPTS[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(SCRIPTS[name])
    return SCRIPTS[name]


def test_every_script_has_help_and_a_test_below():
    tested = {"table_study", "bench_vs_trl", "sampler_vs_generate", "logprob_memory", "calibration_cost", "gpu_check",
              "mutation_check"}
    assert {p.stem for p in (HERE / "scripts").glob("*.py")} == tested
    for name in tested:
        with pytest.raises(SystemExit) as e:
            script(name).main(["--help"])
        assert e.value.code == 0


def test_table_study_script_reports_the_runs_means_and_paired_differences(tmp_path, capsys):
    small = ["--seeds", "2", "--methods", "GRPO,EGPO", "--digits", "2", "--steps", "2", "--jobs", "1", "--out",
             str(tmp_path), "--warmup-args", "--sft-steps 6 --sft-target 0",
             "--egpo-args", "--eval-size 4 --prompts-per-step 2 --group-size 4 --max-new-tokens 20"]
    script("table_study").main(small)
    out = capsys.readouterr().out
    acc = {m: [read_json(tmp_path / f"{m}-s{s}" / "summary.json")["after"]["eval_acc"] for s in (0, 1)]
           for m in ("GRPO", "EGPO")}
    egpo_row = next(line for line in out.splitlines() if line.startswith("| EGPO |"))
    assert egpo_row.split(" | ")[1] == f"{50 * sum(acc['EGPO']):.1f}"  # the mean over the two seeds, in %
    d = [100 * (e - g) for e, g in zip(acc["EGPO"], acc["GRPO"])]
    half = 12.706 * abs(d[0] - d[1]) / 2 ** 0.5 / 2 ** 0.5  # Student's t (1 dof) x stdev / sqrt(2)
    assert egpo_row.split(" | ")[2] == f"{sum(d) / 2:+.1f} [{sum(d) / 2 - half:+.1f}, {sum(d) / 2 + half:+.1f}]"
    assert "2 seeds, 2-digit task, 2 RL steps of 2 x 4" in out and "warm-up steps [6, 6]" in out
    script("table_study").main(small)  # every run is complete: none runs again
    out = capsys.readouterr().out
    assert "2 runs reused, 0 to run" in out and "4 runs reused, 0 to run" in out
    shutil.rmtree(tmp_path / "warm-s1" / "checkpoint")  # a warm-up without its checkpoint is not done
    assert not script("table_study").done(str(tmp_path / "warm-s1"), 0, checkpoint=True)
    assert script("table_study").done(str(tmp_path / "warm-s0"), 0, checkpoint=True)
    script("table_study").main(small)
    assert "1 runs reused, 1 to run" in capsys.readouterr().out and (tmp_path / "warm-s1" / "checkpoint").is_dir()


def test_mutation_check_script_tells_a_killed_mutant_from_a_survivor(monkeypatch, capsys):
    """A planted bug fails the suite in the copy (killed); a mutation that changes nothing survives."""
    mutation_check = script("mutation_check")
    monkeypatch.setattr(mutation_check, "MUTATIONS", [m for m in mutation_check.MUTATIONS if m[0] == "eq2-biased-std"]
                        + [("identity", "def grpo_advantages(", "def grpo_advantages(")])
    results = mutation_check.main(["--pytest-args", "test_egpo.py -k grpo_advantages_equal_hand_values", "--jobs", "1"])
    assert results == {"eq2-biased-std": ("I", "killed"), "identity": ("I", "survived")}
    out = capsys.readouterr().out
    assert "test_grpo_advantages_equal_hand_values" in out and "Part I   1 of 2 killed (50%)" in out
    monkeypatch.setattr(mutation_check, "MUTATIONS", [("gone", "no such code", "x")])
    with pytest.raises(SystemExit, match="gone"):
        mutation_check.main([])


def test_sampler_benchmark_script(capsys):
    generate, ours = script("sampler_vs_generate").main(["--rows", "4", "--new-tokens", "4", "--rounds", "1"])
    assert generate > 0 and ours > 0 and "cpu: generated tokens/s, generate" in capsys.readouterr().out


def test_logprob_memory_script_measures_both_ways(capsys):
    for how in ("full", "chunked"):  # without --how, each runs in a process of its own
        script("logprob_memory").main(["--how", how, "--vocab", "500", "--hidden", "64", "--intermediate", "64",
                                       "--rows", "2", "--prompt", "4", "--response", "8"])
    assert re.findall(r"^(full|chunked): \d+\.\d\d GiB above the model$", capsys.readouterr().out, re.M) == \
        ["full", "chunked"]


def test_calibration_cost_script(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"time_sample": t, "time_update": 0.1}) + "\n"
                                                    for t in (0.1, 0.3, 0.2)))
    script("calibration_cost").main(["--calls", "5", "--repeats", "1", "--metrics", str(tmp_path / "metrics.jsonl")])
    assert re.search(r"egpo_advantages \d+ us.*of the run's median step \(300 ms\)", capsys.readouterr().out)


def test_trl_comparison_script_times_egpo_and_trl_when_it_is_installed(capsys):
    script("bench_vs_trl").main(["--steps", "2", "--rounds", "1"])
    out = capsys.readouterr().out
    assert re.search(r"median of 1: egpo\.py \d+\.\d{3}", out)
    try:
        import trl  # noqa: F401
        assert "egpo.py / TRL = " in out
    except ImportError:
        assert "TRL is not installed" in out


def test_gpu_check_script_on_the_cpu(tmp_path, capsys, monkeypatch):
    """The GPU check's code on the tiny shape and the CPU, with one stage made to fail: the report
    holds every stage, the failed one with its error and output, and nothing else goes to OUT. Here
    the resumed run equals the straight one exactly, the sampler's log-probs are the update's, the
    weights are cast once, and the FSDP bf16 copy is the weights. Without CUDA, --device cuda says
    it needs a GPU."""
    out, work = tmp_path / "out", tmp_path / "work"
    script("gpu_check").main(["--device", "cpu", "--shape", "tiny", "--steps", "2", "--new-tokens", "4", "--out",
                              str(out), "--work", str(work), "--fail", "kv_cache"])
    report = read_json(out / "gpu_check.json")
    assert os.listdir(out) == ["gpu_check.json"] and (work / "model" / "config.json").is_file()
    assert report["kv_cache"]["error"] == "RuntimeError: failed on purpose (--fail)"
    assert "Traceback" in report["kv_cache"]["output_tail"] and "sampler_vs_generate" in report
    assert report["train"]["median clip_frac"] == 0
    assert report["resume"] == {"max weight difference to the straight run": 0.0}
    assert report["left_padding"]["greedy tokens equal to generate's"] == 1.0
    assert report["left_padding"]["max (nats)"] < 1e-4
    assert report["casts"] == {"weight casts at the first token": 10, "at each token after it": 0}  # 1 layer
    assert report["fsdp_bf16"]["bf16 copy equals the weights cast to bf16"] is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        script("gpu_check").main(["--out", str(tmp_path)])
    assert "needs a GPU" in str(e.value.code)


# ---------------------------------------------------------------- the notebook
def notebook():
    return json.loads((HERE / "tiny_demo.ipynb").read_text())


def notebook_namespace(*tags):
    """The source of tiny_demo.ipynb's cells tagged `tags` (in this order), executed here: the checker, the
    conclusions, the reference solutions, without running the notebook."""
    namespace = {}
    for tag in tags:
        for cell in notebook()["cells"]:
            if cell["cell_type"] == "code" and tag in cell["metadata"].get("tags", []):
                exec("".join(cell["source"]), namespace)
    return namespace


def notebook_evidence(nb):
    """From an executed notebook: the seeds and numbers of its per-seed table, as printed, and the
    conclusions it printed under the table."""
    outputs = [o for cell in nb["cells"] if cell["cell_type"] == "code" for o in cell.get("outputs", [])]
    per_seed = next(md for o in outputs
                    if (md := "".join(o.get("data", {}).get("text/markdown", ""))).startswith("**Each seed**"))
    rows = [line.strip("|").split("|") for line in per_seed.splitlines() if re.match(r"\| \d+ \|", line)]
    column = lambda i: [float(row[i]) for row in rows]  # noqa: E731
    table = {"greedy accuracy": (" points", 1, column(3), column(4)),
             "sampled accuracy": (" points", 1, column(6), column(7)),
             "AUROC of −H": ("", 3, column(9), column(10)), "entropy gap": ("", 3, column(12), column(13))}
    printed = next(text for o in outputs if (text := "".join(o.get("text", ""))).startswith("CPU capability"))
    return [int(row[0]) for row in rows], table, printed.splitlines()[1:]


def test_notebook_conclusions_follow_the_table():
    """The sentences under the evidence table come from `conclusions`, a pure function of the table's
    numbers: its signs and counts of seeds follow made-up tables where EGPO is above, below, mixed, tied."""
    conclusions = notebook_namespace("conclusions")["conclusions"]
    acc = lambda grpo, egpo_: {"greedy accuracy": (" points", 1, grpo, egpo_)}  # noqa: E731
    above = conclusions([0, 1, 2], acc([70.0, 80.0, 90.0], [71.0, 80.5, 92.0]))
    assert above[0].startswith("greedy accuracy: EGPO − GRPO = +1.0, +0.5, +2.0 points on seeds 0, 1, 2; "
                               "EGPO above GRPO on 3 of 3, below on 0; mean +1.2 points")
    assert "spans 20.0 points from seed to seed, more than that mean" in above[0]
    assert "EGPO ahead on all 3 seeds happens one time in 8" in above[0]
    below = conclusions([0, 1, 2], acc([70.0, 80.0, 90.0], [60.0, 79.0, 85.0]))[0]
    assert "EGPO above GRPO on 0 of 3, below on 3; mean -5.3 points" in below and "GRPO ahead on all 3" in below
    mixed = conclusions([0, 1, 2, 3], acc([70.0, 71.0, 72.0, 73.0], [80.0, 60.0, 72.0, 90.0]))[0]
    assert "above GRPO on 2 of 4, below on 1, equal on 1; mean +4.0 points" in mixed
    assert "spans 3.0 points from seed to seed, less than that mean" in mixed and "ahead on all" not in mixed
    one = conclusions([0], {"AUROC of −H": ("", 3, [0.8], [0.85])})
    assert one[0] == ("AUROC of −H: EGPO − GRPO = +0.050 on seed 0; EGPO above GRPO on 1 of 1, below on 0; one seed "
                      "shows no spread between seeds to weigh this difference against.")
    assert one[-1].startswith("Whatever these signs, 1 seed of this toy cannot rank the methods")


def test_committed_notebook_prints_the_conclusions_of_its_own_table():
    """tiny_demo.ipynb is committed executed: what it printed under its per-seed table is what
    `conclusions` says of that table's numbers, it names the machine's CPU capability, and its
    exercises are shipped not attempted."""
    nb = notebook()
    seeds, table, printed = notebook_evidence(nb)
    assert seeds and printed == notebook_namespace("conclusions")["conclusions"](seeds, table)
    text = "".join("".join(o.get("text", "")) for cell in nb["cells"] if cell["cell_type"] == "code"
                   for o in cell["outputs"])
    assert re.search(r"this machine: .*CPU capability \w+", text)
    assert text.count("not attempted yet") == 4 and text.count("agrees with egpo.py") == 4
    exercises = ["".join(cell["source"]) for cell in nb["cells"] if "exercise" in cell["metadata"].get("tags", [])]
    assert len(exercises) == 4 and all("raise NotImplementedError()" in source for source in exercises)


def test_notebook_markdown_states_no_results_of_its_own():
    """A markdown cell holds no result of a run (another CPU would contradict it): its numbers are the
    method's constants, or quotes of docs/results.md, which it links, with the intervals written there."""
    constants = {"2602.22751", "0.8", "0.14", "0.5", "0.01", "4.4", "95%"}
    results = (HERE / "docs" / "results.md").read_text()
    for cell in notebook()["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] != "markdown":
            continue
        numbers = set(re.findall(r"[+\-−]?\d+(?:\.\d+)?%|[+\-−]?\d+\.\d+", source)) - constants
        if numbers:
            assert "docs/results.md" in source, numbers
            assert all(x.lstrip("+").rstrip("%") in results for x in numbers), numbers
            for interval in re.findall(r"[+-]\d+\.\d+ \[[+-]\d+\.\d+, [+-]\d+\.\d+\]", source):
                assert interval in results, interval


PLANTED = {  # one mistake per exercise, and the hint that must come with it
    "Eq. 5": (lambda logprobs, mask: -(logprobs * mask).sum(-1) / logprobs.shape[-1],
              "only the tokens of S_i count"),
    "Eqs. 7-8": (lambda rewards, entropy, group_size, lambda_min=0.8, lambda_max=2.0:
                 egpo.confidence_ratio(entropy, group_size).clamp(lambda_min, lambda_max),  # C1's rule
                 "never weakened: w = max(1, c)"),
    "Eqs. 11, 13": (lambda entropy, group_size, lambda_min=0.8, lambda_max=2.0: -torch.ones_like(entropy),  # C4's
                    "so Ã = −0.8: the most unsure are pushed gently"),
    "Eq. 12": (lambda logprobs, old_logprobs, advantages, mask, clip_eps_low=0.2, clip_eps_high=0.2:
               egpo.masked_mean(-torch.exp(logprobs - old_logprobs).clamp(1 - clip_eps_low, 1 + clip_eps_high)
                                * advantages[:, None], mask),  # the clipped term alone, no min
               "a clip never removes a penalty"),
}


def test_notebook_checker_passes_egpo_and_catches_planted_mistakes():
    """Each exercise's `check` passes egpo.py's function and the appendix's solution, says "not attempted"
    for a stub, and stops a planted mistake at its first failing case with the equation's hint."""
    ns = notebook_namespace("checker")
    check = ns["check"]

    def weights(rewards, entropy, group_size, lambda_min=0.8, lambda_max=2.0):  # Eq. 8 on egpo.py's Eq. 7
        c = egpo.confidence_ratio(entropy, group_size).clamp(lambda_min, lambda_max)
        return torch.where(rewards > 0, c.clamp(min=1.0), c.clamp(max=1.0))

    references = {"Eq. 5": egpo.sequence_entropy, "Eqs. 7-8": weights,
                  "Eqs. 11, 13": lambda entropy, group_size, **kw: egpo.egpo_advantages(
                      torch.zeros_like(entropy), entropy, group_size, **kw),
                  "Eq. 12": lambda *args, **kw: egpo.policy_loss(*args, **kw)[0]}
    for exercise, reference in references.items():
        check(exercise, reference, strict=True)
        with pytest.raises(AssertionError, match="not attempted yet"):
            check(exercise, lambda **kw: None, strict=True)
        mistake, hint = PLANTED[exercise]
        with pytest.raises(AssertionError) as failure:
            check(exercise, mistake, strict=True)
        assert hint in str(failure.value) and "expected" in str(failure.value)
    solutions = notebook_namespace("checker", "solution")  # each solution cell checks itself, strictly here
    for name in ("entropy_proxy", "calibration_weights", "nsr_advantages", "ppo_clip_loss"):
        exercise = {"entropy_proxy": "Eq. 5", "calibration_weights": "Eqs. 7-8", "nsr_advantages": "Eqs. 11, 13",
                    "ppo_clip_loss": "Eq. 12"}[name]
        solutions["check"](exercise, solutions[f"{name}_solution"], strict=True)


@pytest.mark.skipif(not os.environ.get("EGPO_NOTEBOOK"), reason="executes tiny_demo.ipynb (minutes): "
                                                              "EGPO_NOTEBOOK=1 pytest -q -k notebook")
def test_tiny_demo_notebook_runs_end_to_end(tmp_path, monkeypatch):
    """Executes every cell of tiny_demo.ipynb on two seeds, with a prediction written in section 7 so that
    its run happens too, started from docs/ (a few minutes): nbclient raises on the first cell that fails. The folders of an
    earlier execution are replaced, any other folder is left alone, and what it prints under the evidence
    table is what `conclusions` says of that table."""
    import nbformat
    from nbclient import NotebookClient

    for stale in ("warm-s0", "egpo-s1", "elsewhere"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "config.json").write_text("{}")
    monkeypatch.setenv("EGPO_NOTEBOOK_OUT", str(tmp_path))  # the kernel inherits both: runs land here
    monkeypatch.setenv("EGPO_NOTEBOOK_SEEDS", "0,1")
    nb = nbformat.read(HERE / "tiny_demo.ipynb", as_version=4)
    prediction = next(cell for cell in nb.cells if cell.source.startswith("PREDICTION = "))
    prediction.source = 'PREDICTION = "a test: no prediction"'
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(HERE / "docs")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 6
    assert (tmp_path / "quadrants.png").is_file() and (tmp_path / "elsewhere" / "config.json").is_file()
    for seed in (0, 1):
        warmup = read_json(tmp_path / f"warm-s{seed}" / "summary.json")
        assert warmup["steps_done"] == 0 and 0 < warmup["sft_steps_done"] <= 1000
        for algo in ("grpo", "egpo"):
            summary = read_json(tmp_path / f"{algo}-s{seed}" / "summary.json")
            assert summary["steps_done"] == 100 and 0 <= summary["after"]["eval_acc"] <= 1
    assert read_json(tmp_path / "nsr-off-s0" / "config.json")["nsr"] == "off"
    text = "".join(o.get("text", "") for o in outputs)
    assert "by hand == egpo.egpo_advantages" in text and "equals the warm-up run's own: True" in text
    assert "the largest change is 0.0e+00 (A = 0: no gradient)" in text and "Your prediction was" in text
    assert text.count("not attempted yet") == 4 and text.count("agrees with egpo.py") == 4
    seeds, table, printed = notebook_evidence(nb)
    assert seeds == [0, 1] and printed == notebook_namespace("conclusions")["conclusions"](seeds, table)


def test_results_tables_are_the_committed_notebook_output():
    """docs/results.md copies the notebook's evidence table and its per-seed table: re-executing
    the notebook without updating them fails here."""
    outputs = [o for cell in notebook()["cells"] if cell["cell_type"] == "code" for o in cell["outputs"]]
    tables = ["".join(o["data"]["text/markdown"]) for o in outputs if "text/markdown" in o.get("data", {})]
    summary = next(t for t in tables if t.startswith("**After 100 RL steps"))
    rows = [line for line in summary.splitlines() if line.startswith(("| GRPO |", "| EGPO |"))]
    assert len(rows) == 2
    results = (HERE / "docs" / "results.md").read_text()
    for row in rows:
        assert row in results, row
    per_seed = next(t for t in tables if t.startswith("**Each seed**"))
    for row in [line for line in per_seed.splitlines() if re.match(r"\| \d+ \|", line)]:
        assert row in results, row

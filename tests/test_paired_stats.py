"""Paired statistics of the verification gate: reference values, hand computations, and the gate's
error rates by simulation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from edge_tl.errors import ConfigError, DatasetError
from edge_tl.metrics import balanced_accuracy, confusion_matrix, escape_and_false_reject
from edge_tl.paired_counts import (
    LabelFreeCounts, PairedTable, escape_rate_delta, escape_table, label_free_counts, paired_tables)
from edge_tl.paired_intervals import (
    agreement_interval, balanced_accuracy_delta_interval, escape_rate_delta_interval, fidelity_drop_bound,
    mcnemar_exact, new_escape_bound, newcombe_limits, newcombe_paired_interval, wilson_interval)
from edge_tl.paired_stats import GateDecision, Verdict, decide, defect_images_for_pass, gate_verdicts, images_to_settle

# Produced by running Newcombe_square_and_add_CI_paired_2x2 (with its Wilson_score_CI_1x2) of the R
# package contingencytables (Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables,
# 2017, ch. 8) in R 4.2.2, printed with 15 decimals. R's table n is [[n11, n12], [n21, n22]] and its
# estimate is row margin minus column margin, (n12 - n21) / N: with the artifact as rows, n11 is
# both_right, n12 artifact_only, n21 float_only, n22 both_wrong.
# (n11, n12, n21, n22, alpha, estimate, L, U)
R_NEWCOMBE = [
    (1, 1, 7, 12, 0.05, -0.285714285714286, -0.506920226686141, -0.025559124164860),  # package example (Bentur 2009)
    (59, 6, 16, 80, 0.05, -0.062111801242236, -0.118621195638710, -0.004625113933050),  # package example (Cavo 2012)
    (40, 0, 0, 10, 0.05, 0.0, -0.057092247699851, 0.057092247699851),  # no discordant pairs
    (45, 5, 0, 0, 0.05, 0.1, 0.008975448080590, 0.213602314374796),  # zero row margin: psi = 0
    (30, 0, 4, 0, 0.05, -0.117647058823529, -0.266208427703718, 0.006194119051890),  # zero column margin
    (3, 10, 12, 2, 0.05, -0.074074074074074, -0.383390055884567, 0.251894715469724),  # A < 0
    (5, 5, 5, 6, 0.05, 0.0, -0.277846012710692, 0.277846012710692),  # 0 <= A <= N/2: psi = 0
    (9500, 60, 140, 300, 0.05, -0.008, -0.010835267134604, -0.005243575419022),  # big table
    (59, 6, 16, 80, 0.10, -0.062111801242236, -0.109744842871790, -0.013785990793168),  # 90%
]

DRAWS = 10_000
SIDE_ERROR = 0.025  # alpha / 2 at alpha = 0.05: what each one-sided decision may get wrong
SIDE_LIMIT = SIDE_ERROR + 3 * math.sqrt(SIDE_ERROR * (1 - SIDE_ERROR) / DRAWS)  # binomial 3-sigma noise


def r_table(n11: int, n12: int, n21: int, n22: int) -> PairedTable:
    return PairedTable(both_right=n11, float_only=n21, artifact_only=n12, both_wrong=n22)


@pytest.mark.parametrize("n11, n12, n21, n22, alpha, estimate, lower, upper", R_NEWCOMBE)
def test_newcombe_matches_contingencytables(n11, n12, n21, n22, alpha, estimate, lower, upper):
    table = r_table(n11, n12, n21, n22)
    assert table.delta == pytest.approx(estimate, abs=1e-14)
    assert newcombe_paired_interval(table, 1 - alpha) == pytest.approx((lower, upper), abs=1e-13)


def test_newcombe_vectorised_and_swapped_models():
    counts = np.array([[r[0], r[2], r[1], r[3]] for r in R_NEWCOMBE[:8]])  # CELLS order
    delta, lower, upper = newcombe_limits(counts, 0.95)
    np.testing.assert_allclose(lower, [r[6] for r in R_NEWCOMBE[:8]], atol=1e-13)
    np.testing.assert_allclose(upper, [r[7] for r in R_NEWCOMBE[:8]], atol=1e-13)
    # swapping the models negates the difference and mirrors the interval
    swapped = r_table(59, 16, 6, 80)
    assert newcombe_paired_interval(swapped) == pytest.approx((0.004625113933050, 0.118621195638710), abs=1e-13)


@pytest.mark.parametrize("successes, n, confidence", [(0, 10, 0.95), (3, 10, 0.95), (10, 10, 0.9), (57, 1000, 0.99)])
def test_wilson_matches_scipy(successes, n, confidence):
    reference = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    assert wilson_interval(successes, n, confidence) == pytest.approx((reference.low, reference.high), abs=1e-14)
    assert agreement_interval(successes, n, confidence) == wilson_interval(successes, n, confidence)


def test_mover_combines_two_classes_by_hand():
    # the two package examples as two classes, per-class limits from the R values above
    tables = [r_table(1, 1, 7, 12), r_table(59, 6, 16, 80)]
    (e1, l1, u1), (e2, l2, u2) = [row[5:] for row in R_NEWCOMBE[:2]]
    estimate = (e1 + e2) / 2
    lower = estimate - math.sqrt(((e1 - l1) / 2) ** 2 + ((e2 - l2) / 2) ** 2)
    upper = estimate + math.sqrt(((u1 - e1) / 2) ** 2 + ((u2 - e2) / 2) ** 2)
    assert (estimate, lower, upper) == pytest.approx((-0.173913043478261, -0.288067960122596, -0.040697590828623),
                                                     abs=1e-12)
    assert balanced_accuracy_delta_interval(tables) == pytest.approx((estimate, lower, upper), abs=1e-13)


def test_mcnemar_exact():
    assert mcnemar_exact(PairedTable(90, 5, 0, 5)) == 1 / 32  # 5 lost, 0 gained: (1/2)**5
    assert mcnemar_exact(PairedTable(90, 0, 0, 10)) == 1.0  # no discordant pairs
    assert mcnemar_exact(PairedTable(80, 0, 5, 15)) == 1.0  # only gains
    for lost, gained in [(7, 2), (3, 3), (12, 30), (40, 21)]:
        expected = stats.binomtest(lost, lost + gained, 0.5, alternative="greater").pvalue
        assert mcnemar_exact(PairedTable(100, lost, gained, 10)) == pytest.approx(expected, rel=1e-12)


LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
FLOAT = np.array([0, 0, 0, 1, 1, 1, 1, 0, 2, 2, 1, 0])
ARTIFACT = np.array([0, 0, 1, 0, 1, 0, 1, 2, 2, 0, 1, 0])


def test_tables_from_predictions_agree_with_metrics():
    tables = paired_tables(LABELS, FLOAT, ARTIFACT, 3)
    # class 0: both right 2, float only 1, artifact only 1; class 1: both right 2, float only 1, both wrong 1
    # class 2: both right 1, float only 1, both wrong 2
    assert tables == [PairedTable(2, 1, 1, 0), PairedTable(2, 1, 0, 1), PairedTable(1, 1, 0, 2)]
    float_ba = balanced_accuracy(confusion_matrix(LABELS, FLOAT, 3))
    artifact_ba = balanced_accuracy(confusion_matrix(LABELS, ARTIFACT, 3))
    assert balanced_accuracy_delta_interval(tables)[0] == pytest.approx(artifact_ba - float_ba, abs=1e-12)

    escape = escape_table(LABELS, FLOAT, ARTIFACT, ok_index=0)
    # defects 4..11: caught by both 4, 6, 8, 10 (10: both predict 1); float only 5, 9; artifact only 7; both wrong 11
    assert escape == PairedTable(4, 2, 1, 1)
    float_escape = escape_and_false_reject(confusion_matrix(LABELS, FLOAT, 3), 0)[0]
    artifact_escape = escape_and_false_reject(confusion_matrix(LABELS, ARTIFACT, 3), 0)[0]
    assert escape_rate_delta(escape) == pytest.approx(artifact_escape - float_escape, abs=1e-12) == 1 / 8
    estimate, lower, upper = escape_rate_delta_interval(escape)
    catch_lower, catch_upper = newcombe_paired_interval(escape)
    assert (estimate, lower, upper) == (1 / 8, -catch_upper, -catch_lower) and lower < 1 / 8 < upper


def test_bad_inputs_are_refused():
    with pytest.raises(DatasetError, match=r"classes \[1\] have no labelled images"):
        balanced_accuracy_delta_interval([PairedTable(5, 0, 0, 0), PairedTable(0, 0, 0, 0)])
    with pytest.raises(ConfigError, match="confidence 1.5"):
        newcombe_paired_interval(PairedTable(5, 1, 0, 0), 1.5)
    with pytest.raises(ConfigError, match=">= 0"):
        PairedTable(5, -1, 0, 0)
    with pytest.raises(ConfigError, match="max_drop -1"):
        decide([PairedTable(5, 1, 0, 0)], None, -1.0, 0.0)


def test_label_free_bounds():
    # no new escapes in 100 float defect calls: the one-sided exact bound is 1 - (1 - c) ** (1 / n)
    assert new_escape_bound(0, 100, 0.975) == pytest.approx(1 - 0.025 ** (1 / 100), abs=1e-12)
    assert new_escape_bound(3, 200, 0.95) == pytest.approx(stats.beta.ppf(0.95, 4, 197), abs=1e-12)

    flips, counts = [2, 0, 5], [400, 150, 250]
    shares = np.array(flips) / counts
    highs = [stats.binomtest(f, n).proportion_ci(confidence_level=0.95, method="wilson").high
             for f, n in zip(flips, counts)]  # two-sided 95% high = one-sided 97.5% upper
    hand = shares.mean() + math.sqrt(sum(((h - s) / 3) ** 2 for h, s in zip(highs, shares)))
    assert fidelity_drop_bound(flips, counts, 0.975) == pytest.approx((shares.mean(), hand), abs=1e-13)
    with pytest.raises(DatasetError, match="each class needs float calls"):
        fidelity_drop_bound([0, 0], [10, 0], 0.975)

    counted = label_free_counts([0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 0, 2, 0, 1], 3, ok_index=0)
    assert counted == LabelFreeCounts((1, 1, 2), (2, 2, 3), new_ok_calls=2, float_defect_calls=5)
    assert counted.agreement == (3, 7)


def test_decide_record_and_routes():
    tables = [PairedTable(990, 3, 3, 4), PairedTable(985, 2, 2, 11), PairedTable(980, 3, 2, 15)]
    escape = PairedTable(1972, 2, 1, 25)
    decision = decide(tables, escape, max_drop=1.0, max_escape_rise=1.0)
    assert decision.verdict is Verdict.PASS
    assert decision.routes == ("labelled drop", "labelled escape rise")
    assert [i.quantity for i in decision.intervals] == [
        "balanced_accuracy_drop", "recall_drop[0]", "recall_drop[1]", "recall_drop[2]", "escape_rate_rise"]
    drop = decision.intervals[0]
    estimate, lower, upper = balanced_accuracy_delta_interval(tables, 0.95)
    assert (drop.estimate_points, drop.lower_points, drop.upper_points) == pytest.approx(
        (-100 * estimate, -100 * upper, -100 * lower), abs=1e-12)
    assert drop.confidence == 0.95 and drop.upper_points <= 1.0
    record = decision.to_dict()
    assert record["verdict"] == "PASS" and json.loads(json.dumps(record)) == record
    assert GateDecision.from_dict(json.loads(json.dumps(record))) == decision
    assert not decision.bonferroni and decision.mcnemar_p == mcnemar_exact(escape)

    # at a zero escape margin the exact McNemar test is the escape route
    lossy = PairedTable(1960, 12, 1, 27)
    failed = decide(tables, lossy, max_drop=5.0, max_escape_rise=0.0)
    assert failed.verdict is Verdict.FAIL and failed.routes == ("mcnemar escapes",)
    assert mcnemar_exact(lossy) < 0.025 and "McNemar p = 0.001709" in failed.reasons[1]
    assert decide(tables, escape, 1.0, 0.0).verdict is Verdict.INCONCLUSIVE  # no loss, but 0 is not shown


def test_label_free_route_uses_bonferroni_levels():
    # 60 labelled images per class cannot show a 2-point margin; 3000 unlabelled ones with few flips can
    tables = [PairedTable(58, 0, 0, 2), PairedTable(57, 0, 0, 3)]
    escape = PairedTable(57, 0, 0, 3)
    assert decide(tables, escape, 2.0, 2.0).verdict is Verdict.INCONCLUSIVE
    label_free = LabelFreeCounts((3, 2), (1500, 1500), new_ok_calls=1, float_defect_calls=1500)
    decision = decide(tables, escape, 2.0, 2.0, label_free=label_free)
    assert decision.verdict is Verdict.PASS and decision.bonferroni
    assert decision.routes == ("label-free drop", "label-free new escapes")
    by_name = {i.quantity: i for i in decision.intervals}
    assert by_name["balanced_accuracy_drop"].confidence == 0.975  # 1 - alpha/2, two-sided
    assert by_name["label_free_drop"].confidence == 0.9875  # 1 - alpha/4, one-sided
    assert by_name["label_free_drop"].lower_points is None
    assert by_name["label_free_drop"].upper_points == pytest.approx(
        100 * fidelity_drop_bound((3, 2), (1500, 1500), 0.9875)[1], abs=1e-12)
    assert by_name["label_free_new_escape"].upper_points == pytest.approx(
        100 * new_escape_bound(1, 1500, 0.9875), abs=1e-12)
    assert by_name["escape_rate_rise"].upper_points == pytest.approx(
        -100 * newcombe_paired_interval(escape, 0.975)[0], abs=1e-12)
    assert any("Bonferroni" in reason for reason in decision.reasons)
    # labelled evidence of a loss beyond the margin wins over label-free evidence of none
    losing = [PairedTable(40, 18, 0, 2), PairedTable(57, 0, 0, 3)]
    assert decide(losing, escape, 2.0, 2.0, label_free=label_free).verdict is Verdict.FAIL


def simulate_counts(cell_probabilities, n_per_class, seed):
    """Per-class paired tables drawn at once; every defect error is a call of ok (class 0), so the
    escape table is the sum of the defect classes' tables."""
    rng = np.random.default_rng(seed)
    counts = np.stack([rng.multinomial(n_per_class, p, size=DRAWS) for p in cell_probabilities], axis=1)
    return counts, counts[:, 1:].sum(axis=1)


def verdict_shares(cell_probabilities, n_per_class, max_drop, max_escape_rise, seed=0):
    counts, escape = simulate_counts(cell_probabilities, n_per_class, seed)
    verdicts = gate_verdicts(counts, escape, max_drop, max_escape_rise, alpha=0.05)
    return {v.value: float((verdicts == v.value).mean()) for v in Verdict}


# cells (both_right, float_only, artifact_only, both_wrong) for classes ok, defect 1, defect 2
AT_DROP_MARGIN = [(0.95, 0.04, 0.01, 0.0), (0.97, 0.0, 0.0, 0.03), (0.97, 0.0, 0.0, 0.03)]  # 3 points on ok / 3
AT_ESCAPE_MARGIN = [(0.98, 0.01, 0.01, 0.0), (0.97, 0.015, 0.005, 0.01), (0.97, 0.015, 0.005, 0.01)]  # +1 point
NO_ESCAPE_CHANGE = [(0.98, 0.01, 0.01, 0.0), (0.97, 0.01, 0.01, 0.01), (0.97, 0.01, 0.01, 0.01)]
AS_GOOD = [(0.99, 0.005, 0.005, 0.0), (0.98, 0.005, 0.005, 0.01), (0.98, 0.005, 0.005, 0.01)]


@pytest.mark.parametrize("n_per_class", [50, 200, 1000])
@pytest.mark.parametrize("cells, max_escape_rise", [(AT_DROP_MARGIN, 1.0), (AT_ESCAPE_MARGIN, 1.0),
                                                     (NO_ESCAPE_CHANGE, 0.0)])
def test_gate_errs_at_most_alpha_half_on_each_side_at_the_margin(cells, max_escape_rise, n_per_class):
    # At the margin (true balanced-accuracy drop 1 point, or true escape rise at its margin) is the
    # least favourable truth for both errors: worse artifacts pass less often, better ones fail less.
    shares = verdict_shares(cells, n_per_class, 1.0, max_escape_rise, seed=n_per_class)
    assert shares["PASS"] <= SIDE_LIMIT
    assert shares["FAIL"] <= SIDE_LIMIT


def test_inconclusive_share_falls_with_the_sample_for_an_equal_artifact():
    shares = [verdict_shares(AS_GOOD, n, 1.0, 1.0, seed=n) for n in (50, 200, 1000)]
    inconclusive = [s["INCONCLUSIVE"] for s in shares]
    assert inconclusive[0] > 0.99 and inconclusive[0] > inconclusive[1] > inconclusive[2]
    assert inconclusive[2] < 0.05 and all(s["FAIL"] <= SIDE_LIMIT for s in shares)


def test_vectorised_verdicts_equal_decide():
    counts, escape = simulate_counts(AT_ESCAPE_MARGIN, 300, seed=7)
    verdicts = gate_verdicts(counts[:200], escape[:200], 1.0, 1.0)
    for sample in range(200):
        tables = [PairedTable(*map(int, row)) for row in counts[sample]]
        assert decide(tables, PairedTable(*map(int, escape[sample])), 1.0, 1.0).verdict.value == verdicts[sample]


def scaled(tables, escape, factor):
    return [t.scaled(factor) for t in tables], escape.scaled(factor)


def test_images_to_settle_on_the_suggested_factor():
    tables = [PairedTable(190, 3, 2, 5), PairedTable(94, 2, 1, 3), PairedTable(95, 1, 1, 3)]
    escape = PairedTable(189, 3, 2, 6)
    assert decide(tables, escape, 2.0, 2.0).verdict is Verdict.INCONCLUSIVE
    settle = images_to_settle(tables, escape, 2.0, 2.0)
    assert settle.verdict is Verdict.PASS and settle.factor == pytest.approx(settle.previous_factor * 1.02)
    assert decide(*scaled(tables, escape, settle.factor), 2.0, 2.0).verdict is Verdict.PASS
    assert decide(*scaled(tables, escape, settle.previous_factor), 2.0, 2.0).verdict is Verdict.INCONCLUSIVE
    assert settle.additional_images_per_class == tuple(math.ceil((settle.factor - 1) * t.n - 1e-9) for t in tables)
    assert settle.additional_defect_images == math.ceil((settle.factor - 1) * escape.n - 1e-9)


def test_images_to_settle_edge_cases():
    # no discordance: the intervals still shrink with n, so more images settle it
    clean = [PairedTable(48, 0, 0, 2), PairedTable(47, 0, 0, 3)]
    settle = images_to_settle(clean, PairedTable(47, 0, 0, 3), 1.0, 1.0)
    assert settle.verdict is Verdict.PASS and 1 < settle.factor < 100
    # an observed drop exactly at the margin (2 points on class 0 of 2 -> 1 point) never settles
    at_margin = [PairedTable(96, 3, 1, 0), PairedTable(97, 0, 0, 3)]
    assert images_to_settle(at_margin, None, 1.0, 1.0).factor is None
    # already decided: nothing more needed
    decided = images_to_settle([PairedTable(50, 30, 0, 20)], None, 1.0, 1.0)
    assert (decided.factor, decided.verdict, decided.additional_images_per_class) == (1.0, Verdict.FAIL, (0,))


def test_defect_images_for_pass():
    # no flips, float catches all: the rise bound is 1 - n / (n + z**2), so n >= z**2 (1 - m) / m
    z = stats.norm.ppf(0.975)
    for margin in (1.0, 2.0, 3.0):
        assert defect_images_for_pass(margin, 0.0) == math.ceil(z * z * (100 - margin) / margin)
    assert defect_images_for_pass(1.0, 0.01, max_images=20_000) is None  # true rise at the margin
    needed = defect_images_for_pass(2.0, 0.005, max_images=5_000)
    assert decide([PairedTable(needed, 0, 0, 0)], PairedTable(needed - round(0.005 * needed),
                  round(0.005 * needed), 0, 0), 100.0, 2.0).verdict is Verdict.PASS
    assert defect_images_for_pass(2.0, 0.005, power=0.8, max_images=5_000) > needed


def test_gate_decision_is_frozen():
    decision = decide([PairedTable(50, 0, 0, 0)], None, 5.0, 0.0)
    assert isinstance(decision, GateDecision)
    with pytest.raises(AttributeError):
        decision.verdict = Verdict.FAIL  # type: ignore[misc]

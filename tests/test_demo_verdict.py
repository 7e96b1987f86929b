"""The demo's verdicts on the paper's claims, on results whose answer is known."""

import pytest

from tah.toy.verdict import claims, verdict_lines


def _run(seed, standard, always, tah_plus, tah=None, iterated=0.1, oracle=0.9):
    def row(answers, params=100, share=0.0):
        return {"answer_accuracy": answers, "next_token_accuracy": 0.5 + answers / 2, "iterated_share": share,
                "parameters": params}

    models = {"Standard": row(standard), "AlwaysIterate": row(always, 110, 1.0),
              "TaH+": row(tah_plus, 120, iterated)}
    if tah is not None:
        models["TaH"] = row(tah, 90, iterated)
    analysis = {"always1": {"accuracy": 0.8}, "always2": {"accuracy": 0.85}, "oracle": {"accuracy": oracle},
                "overthinking": {"overthink_share": 0.02, "fix_share": 0.3}}
    return {"seed": seed, "models": models, "depth_analysis": analysis}


def _verdicts(runs):
    return {c["claim"]: c for c in claims({"runs": runs})}


def test_clear_margins_on_every_seed_hold():
    found = _verdicts([_run(0, 0.50, 0.45, 0.60, 0.52), _run(1, 0.52, 0.44, 0.63, 0.55),
                       _run(2, 0.49, 0.46, 0.61, 0.50)])
    assert all(c["holds"] for c in found.values()), found
    assert "SE" in found["TaH+ above Standard"]["detail"]


def test_a_margin_within_the_standard_error_does_not_hold():
    found = _verdicts([_run(0, 0.40, 0.30, 0.60), _run(1, 0.60, 0.30, 0.41), _run(2, 0.50, 0.30, 0.52)])
    assert found["TaH+ above AlwaysIterate"]["holds"]
    assert not found["TaH+ above Standard"]["holds"]  # +0.01 mean, SE about 0.1
    assert "seed 1" in found["every seed learns (Standard >= 30% answers) and TaH+ answers best"]["detail"]


def test_the_paired_error_is_shown_beside_the_pooled_one_that_decides():
    # Seeds of very different difficulty, TaH+ 3 points up on each: the pooled SE (seed spread) is
    # large, the paired one (spread of the per-seed differences) small; the verdict keeps the pooled.
    found = _verdicts([_run(0, 0.60, 0.55, 0.63), _run(1, 0.80, 0.75, 0.83), _run(2, 0.90, 0.85, 0.94)])
    detail = found["TaH+ above Standard"]["detail"]
    assert "answers +3.3 points (SE 12.7, paired 0.3)" in detail, detail
    assert not found["TaH+ above Standard"]["holds"]


def test_a_seed_that_never_learned_is_named():
    found = _verdicts([_run(0, 0.50, 0.45, 0.60), _run(1, 0.05, 0.04, 0.06)])
    seeds = found["every seed learns (Standard >= 30% answers) and TaH+ answers best"]
    assert not seeds["holds"] and "seed 1: Standard 5.0%" in seeds["detail"]


@pytest.mark.parametrize(("iterated", "oracle", "claim"), [
    (0.25, 0.9, "TaH+ iterates at most 20% of tokens"),
    (0.1, 0.84, "the oracle policy beats always-1 and always-2")])
def test_iteration_and_oracle_claims_follow_the_figures(iterated, oracle, claim):
    found = _verdicts([_run(0, 0.5, 0.4, 0.6, iterated=iterated, oracle=oracle)])
    assert not found[claim]["holds"]
    assert "1 seed: no error bar" in found["TaH+ above Standard"]["detail"]


def test_lines_say_holds_or_not_for_each_claim():
    runs = [_run(0, 0.5, 0.4, 0.6, 0.3)]
    text = verdict_lines({"runs": runs})
    assert text.count("does not hold") == 1 and "TaH (pruned to fewer parameters)" in text

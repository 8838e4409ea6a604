"""The process reward model: the exact arith step checker, the eval metrics against hand-computed
values, Monte-Carlo labels on the engine, the packed step scores against transformers, training,
save/reload, the CLI's files and its one-line errors."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import subprocess
import sys

import pytest
import torch

from arkfast.generate import default_model_path
from arkfast.models import load_tokenizer
from arkfast.prm import (
    LabelConfig,
    LabelStats,
    PRMConfig,
    PRMTrainConfig,
    ProcessRewardModel,
    best_of_n,
    check_steps,
    encode_trajectory,
    first_error,
    first_error_f1,
    load_prm,
    majority_of_n,
    monte_carlo_labels,
    pack_step_rows,
    pass_at_n,
    predicted_first_error,
    save_prm,
    score_examples,
    step_auroc,
    train_prm,
)
from arkfast.prm.evaluate import solution_record, trajectory_scores
from arkfast.prm.training import supcon_sum
from arkfast.tasks import ArithTask, arith_problems
from arkfast.trajectories import TrajectoryFileError, tokenizer_fingerprint, write_trajectories

TINY = default_model_path()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(TINY)


def _record(tok, problem, response, sample=0):
    return solution_record(ArithTask(), problem, response, sample=sample, fingerprint=tokenizer_fingerprint(tok))


def _corrupt(solution: str, step: int, delta: int = 1) -> str:
    """The reference solution with the result of equation ``step`` off by ``delta``, carried on."""
    lines = solution.split("\n")
    a, rest = lines[step].split(" = ")
    lines[step] = f"{a} = {int(rest) + delta}"
    if step + 1 < len(lines):
        nxt = lines[step + 1].split(" ")
        if nxt[0] != "Answer:":
            nxt[0] = str(int(rest) + delta)
            lines[step + 1] = " ".join(nxt)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the exact arith checker
# ------------------------------------------------------------------------------------------------
REF = "7 + 5 = 12\n12 * 3 = 36\n36 / 4 = 9\nAnswer: 9"


def _steps(text):
    spans, start = [], 0
    for line in text.split("\n"):
        if line.strip():
            spans.append((start, start + len(line)))
        start += len(line) + 1
    return spans


@pytest.mark.parametrize("response, expected", [
    (REF, [True, True, True, True]),
    ("5 + 7 = 12\n3 * 12 = 36\n36 / 4 = 9\nAnswer: 9", [True, True, True, True]),   # operands swapped
    ("7 + 5 = 13\n13 * 3 = 39\n39 / 4 = 9\nAnswer: 9", [False, False, False, True]),  # false equations
    ("7 + 5 = 12\n12 * 2 = 24\n24 / 4 = 6\nAnswer: 6", [True, False, False, False]),  # true, off the reference
    ("7 + 5 = 12\n12 * 3 = 36\nAnswer: 36", [True, True, False]),                     # a step skipped
    ("7 + 5 = 12\nso it is 12\n36 / 4 = 9\n9 + 1 = 10\nAnswer: 10", [True, False, True, False, False]),
    ("37 / 4 = 9\nAnswer: 9", [False, True]),                                         # inexact division
])
def test_check_steps_hand_cases(response, expected):
    right = check_steps(response, _steps(response), REF)
    assert right == expected
    assert first_error(right) == next((i for i, ok in enumerate(expected) if not ok), None)


def test_check_steps_on_generated_solutions():
    for p in arith_problems("train", 30):
        sol = p.meta["solution"]
        n = len(sol.split("\n"))
        assert check_steps(sol, _steps(sol), sol) == [True] * n
        bad = _corrupt(sol, 1)
        assert first_error(check_steps(bad, _steps(bad), sol)) == 1


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def test_step_auroc_hand_values_and_pairs():
    assert step_auroc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert step_auroc([0.1, 0.8, 0.9], [True, True, False]) == 0.0
    # pairs (right, wrong): (0.5 vs 0.5) tie = 1/2, (0.5 vs 0.2) = 1, (0.1 vs 0.5) = 0, (0.1 vs 0.2) = 0
    assert step_auroc([0.5, 0.1, 0.5, 0.2], [True, True, False, False]) == pytest.approx(1.5 / 4)
    assert step_auroc([0.3, 0.4], [True, True]) is None
    rng = random.Random(3)
    for _ in range(20):  # against counting all pairs, with many ties
        n = rng.randint(2, 40)
        scores = [rng.randint(0, 5) / 5 for _ in range(n)]
        right = [rng.random() < 0.6 for _ in range(n)]
        if all(right) or not any(right):
            continue
        pos = [s for s, r in zip(scores, right) if r]
        neg = [s for s, r in zip(scores, right) if not r]
        pairs = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
        assert step_auroc(scores, right) == pytest.approx(pairs / (len(pos) * len(neg)), abs=1e-12)


def test_first_error_f1_hand_values():
    assert predicted_first_error([0.9, 0.4, 0.2]) == 1
    assert predicted_first_error([0.9, 0.6], threshold=0.7) == 1
    assert predicted_first_error([0.9, 0.8]) is None
    # flawed: first errors 1, 2, 0 predicted 1, None, 0 -> 2/3; correct: 2 predicted None, 1 not -> 2/3
    out = first_error_f1([1, None, 0, None, None, 3], [1, 2, 0, None, None, None])
    assert out["error_accuracy"] == pytest.approx(2 / 3)
    assert out["correct_accuracy"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    out = first_error_f1([1, 0], [1, None])  # 1.0 and 0.0 -> F1 0
    assert (out["error_accuracy"], out["correct_accuracy"], out["f1"]) == (1.0, 0.0, 0.0)
    out = first_error_f1([1, None, None], [1, 0, None])  # 1/2 and 1 -> 2/3
    assert out["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert first_error_f1([None], [None])["f1"] is None


def test_best_of_n_majority_pass_hand_values():
    scores = [[0.2, 0.9, 0.5], [0.7, 0.7, 0.1], [0.1, 0.2, 0.3]]
    correct = [[True, False, True], [False, True, True], [False, False, False]]
    answers = [["4", "5", "4"], ["1", "2", "2"], [None, "9", "8"]]
    assert best_of_n(scores, correct) == pytest.approx(0 / 3)  # picks 0.9 (wrong), first 0.7 (wrong), wrong
    assert majority_of_n(answers, correct) == pytest.approx(2 / 3)  # "4" right, "2" right, "9" (first) wrong
    assert pass_at_n(correct) == pytest.approx(2 / 3)
    assert trajectory_scores([0.5, 0.8, 0.25]) == (0.25, 0.1)


def test_supcon_matches_a_plain_python_float64_reference():
    gen = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(7, 5, generator=gen, dtype=torch.float64), dim=-1)
    classes = torch.tensor([1, 0, 1, 1, 0, 0, 1], dtype=torch.bool)
    zl, cl, tau = z.tolist(), classes.tolist(), 0.1
    total = 0.0
    for i in range(7):
        pos = [p for p in range(7) if p != i and cl[p] == cl[i]]
        denom = sum(math.exp(sum(a * b for a, b in zip(zl[i], zl[a])) / tau) for a in range(7) if a != i)
        total += -sum(math.log(math.exp(sum(a * b for a, b in zip(zl[i], zl[p])) / tau) / denom)
                      for p in pos) / len(pos)
    assert supcon_sum(z, classes, tau).item() == pytest.approx(total, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# the model: packed step scores against transformers, save / reload
# ------------------------------------------------------------------------------------------------
def _records(tok, n, seed=0, split="train"):
    """Reference solutions of ``n`` arith problems, every other one corrupted at a random step."""
    rng = random.Random(seed)
    out = []
    for i, p in enumerate(arith_problems(split, n)):
        sol = p.meta["solution"]
        if i % 2:
            sol = _corrupt(sol, rng.randrange(sol.count("\n")), rng.choice([-2, -1, 1, 3]))
        out.append(_record(tok, p, sol))
    return out


def test_packed_step_scores_match_transformers_in_float64(tok):
    from kernel_testing import hf_float64_rtol
    from transformers import AutoModel

    records = _records(tok, 7, seed=1)
    prm = ProcessRewardModel(load_prm_backbone(), PRMConfig(), seed=3).double()
    torch.nn.init.normal_(prm.head.weight, std=1.0, generator=torch.Generator().manual_seed(0))
    examples = [encode_trajectory(tok, r) for r in records]
    assert len(pack_step_rows(examples, 300)) < len(examples)  # several sequences share a row
    ours = score_examples(prm, examples, row_tokens=300)
    # The same maths packed and one sequence at a time: float64 round-off only.
    alone = [score_examples(prm, [ex], row_tokens=len(ex))[0] for ex in examples]
    assert max(abs(a - b) for x, y in zip(ours, alone) for a, b in zip(x, y)) < 1e-12
    hf = AutoModel.from_pretrained(str(TINY), dtype=torch.float64).eval()
    cfg = prm.backbone.config
    # transformers keeps its norms and softmax in float32 (kernel_testing.hf_float64_rtol): a relative
    # error rel in each hidden component moves the logit w.h by at most rel * sum_i |w_i h_i|, and the
    # probability by a quarter of that (sigmoid is 1/4-Lipschitz).
    rel = hf_float64_rtol(cfg.num_layers, cfg.hidden_size, max(len(ex) for ex in examples))
    w = prm.head.weight[0].abs()
    worst = 0.0
    with torch.no_grad():
        for ex, got in zip(examples, ours):
            hidden = hf(torch.tensor([ex.input_ids])).last_hidden_state[0]  # [L, H], final norm applied
            h = hidden[list(ex.step_ends)]  # [S, H]
            want = torch.sigmoid(prm.head(h).squeeze(-1))
            err = (torch.tensor(got, dtype=torch.float64) - want).abs()
            bound = rel * (h.abs() * w).sum(-1) / 4
            worst = max(worst, (err / bound).max().item())
    assert worst <= 1.0, f"error {worst:.2f} x the bound"


def load_prm_backbone():
    from arkfast.models import load_model

    return load_model(TINY)


def test_step_ends_are_each_steps_last_token(tok):
    record = _records(tok, 1)[0]
    ex = encode_trajectory(tok, record)
    ids = list(ex.input_ids)
    # every step but the last ends on the token holding its newline (the tiny tokenizer has one
    # "\nAnswer: " token, which starts in the gap after the last equation); the last step on the
    # response's last token
    assert all(tok.decode([ids[e]]).startswith("\n") for e in ex.step_ends[:-1])
    assert ex.step_ends[-1] == len(ids) - 1
    text = record["response"]
    for k, (s, e) in enumerate(record["steps"][1:-1], start=1):
        assert tok.decode(ids[ex.step_ends[k - 1] + 1:ex.step_ends[k] + 1]).lstrip().startswith(text[s:e])


def test_save_and_reload_round_trip(tmp_path, tok):
    records = _records(tok, 5, seed=2)
    prm = ProcessRewardModel(load_prm_backbone(), PRMConfig(projection_dim=16, tokenizer=tokenizer_fingerprint(tok),
                                                            label_source="outcome"), seed=1)
    examples = [encode_trajectory(tok, r) for r in records]
    before = score_examples(prm, examples)
    save_prm(prm, tmp_path / "prm", tokenizer=tok)
    save_prm(prm, tmp_path / "prm", tokenizer=tok)  # over an existing folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prm"]
    again = load_prm(tmp_path / "prm")
    assert again.config == prm.config
    assert score_examples(again, examples) == before
    for name, p in prm.head_state().items():
        assert torch.equal(again.head_state()[name], p), name
    with pytest.raises(ValueError, match="not a PRM folder"):
        load_prm(TINY)


# ------------------------------------------------------------------------------------------------
# Monte-Carlo labels on the engine
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm():
    import arkfast

    return arkfast.LLM(str(TINY), max_num_seqs=64)


def test_monte_carlo_labels_on_reference_and_corrupted_solutions(llm, tok):
    # Train problems 1 and 2: the tiny model completes every prefix of their reference solutions to the
    # gold answer at temperature 0.3 (found by labelling the first 12 with k = 8). Corrupting step 1's
    # result (carried into step 2's first operand, step 2's result kept) makes step 1's prefix lead
    # elsewhere; from step 2 on the prefixes hold the right value again.
    problems = arith_problems("train", 3)[1:]
    clean = [_record(tok, p, p.meta["solution"]) for p in problems]
    bad = [_record(tok, p, _corrupt(p.meta["solution"], 1), sample=1) for p in problems]
    cfg = LabelConfig(k=4, temperature=0.3, seed=0)
    stats = LabelStats()
    out = {r["id"]: r for r in monte_carlo_labels(llm, clean + bad, cfg, stats)}
    assert len(out) == 4
    for r in clean:
        labels = out[r["id"]]
        assert labels["step_labels"] == [1.0] * len(r["steps"])
        assert labels["rollouts_correct"] == [4] * len(r["steps"])
        assert labels["label_source"] == "monte-carlo" and labels["label_k"] == 4
    for r in bad:
        labels = out[r["id"]]["step_labels"]
        assert labels[0] == 1.0 and labels[1] < 1.0, labels
        assert labels[1] <= 0.25
    # 4 rollouts x (steps - 1) prefixes per trajectory; most prompt tokens come from the prefix cache
    assert stats.requests == sum(4 * (len(r["steps"]) - 1) for r in clean + bad)
    assert stats.prefix_cache_hit_rate > 0.8, stats.as_dict()
    again = {r["id"]: r for r in monte_carlo_labels(llm, bad, cfg)}  # seeded: the same labels
    assert all(again[r["id"]]["rollouts_correct"] == out[r["id"]]["rollouts_correct"] for r in bad)
    hard = {r["id"]: r for r in monte_carlo_labels(llm, bad, LabelConfig(k=4, temperature=0.3, hard=True))}
    for r in bad:
        assert hard[r["id"]]["step_labels"] == [float(n > 0) for n in out[r["id"]]["rollouts_correct"]]
        assert hard[r["id"]]["label_source"] == "monte-carlo-hard"


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------
def _exact_examples(tok, records):
    return [encode_trajectory(tok, r, [float(ok) for ok in check_steps(r["response"], r["steps"],
                                                                     r["meta"]["solution"])])
            for r in records]


def test_training_lowers_the_loss_and_ranks_right_steps_above_corrupted_ones(tok):
    # 16 arith trajectories, half with one corrupted step, labelled by the exact checker. On data this
    # small the PRM learns these trajectories, not arithmetic (held-out ranking is what prm eval
    # measures, on thousands of steps); this checks the loop fits its labels through the packed rows.
    records = _records(tok, 16, seed=4)
    examples = _exact_examples(tok, records)
    truth = [bool(v) for ex in examples for v in ex.labels]
    assert 0 < truth.count(False) < len(truth)
    prm = ProcessRewardModel(load_prm_backbone(), PRMConfig(), seed=0)
    before = step_auroc([s for ss in score_examples(prm, examples) for s in ss], truth)
    rows = pack_step_rows(examples, 384)
    assert len(rows) > 1
    result = train_prm(prm, rows, PRMTrainConfig(steps=20, batch_rows=1, lr=3e-3, log_every=1, seed=0), log=None)
    losses = [m["bce"] for m in result.metrics]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.3 * first, losses
    after = step_auroc([s for ss in score_examples(prm, examples) for s in ss], truth)
    assert after > 0.95 and after > before + 0.2, (before, after)


def test_contrastive_projection_head_trains(tok):
    rows = pack_step_rows(_exact_examples(tok, _records(tok, 8, seed=6)), 400)
    prm = ProcessRewardModel(load_prm_backbone(), PRMConfig(projection_dim=8), seed=0)
    start = {k: v.detach().clone() for k, v in prm.head_state().items()}
    result = train_prm(prm, rows, PRMTrainConfig(steps=3, batch_rows=1, contrastive_weight=0.5, log_every=1),
                       log=None)
    assert all(m["contrastive"] > 0 for m in result.metrics)
    for name, p in prm.head_state().items():
        assert not torch.equal(p, start[name]), f"{name} did not change"
    with pytest.raises(ValueError, match="projection head"):
        train_prm(ProcessRewardModel(load_prm_backbone()), rows,
                  PRMTrainConfig(steps=1, contrastive_weight=0.5), log=None)


def test_a_stopped_run_resumed_continues_the_same_loss_curve(tmp_path, tok):
    # The uninterrupted run and one stopped after 4 of 7 steps (saved at 2 and at the stop), then resumed
    # in a fresh PRM: the same rows in the same order through the same optimiser state, so on one CPU
    # the same floating-point operations in the same order, bit for bit.
    rows = pack_step_rows(_exact_examples(tok, _records(tok, 10, seed=8)), 300)
    assert len(rows) >= 3  # an epoch ends inside the run: the row order's generator state is resumed too
    kw = dict(steps=7, batch_rows=2, lr=3e-3, log_every=1, save_every=2, seed=1, contrastive_weight=0.3)
    whole = ProcessRewardModel(load_prm_backbone(), PRMConfig(projection_dim=4), seed=0)
    full = train_prm(whole, rows, PRMTrainConfig(**kw, output_dir=str(tmp_path / "a")), log=None, data={"x": 1})
    part = ProcessRewardModel(load_prm_backbone(), PRMConfig(projection_dim=4), seed=0)
    train_prm(part, rows, PRMTrainConfig(**kw, output_dir=str(tmp_path / "b"), stop_after=4), log=None,
              data={"x": 1})
    assert json.loads((tmp_path / "b" / "trainer_state.json").read_text())["step"] == 4
    fresh = ProcessRewardModel(load_prm_backbone(), PRMConfig(projection_dim=4), seed=5)
    rest = train_prm(fresh, rows, PRMTrainConfig(**kw, output_dir=str(tmp_path / "b")), log=None, resume=True,
                     data={"x": 1})
    keys = ("step", "bce", "contrastive", "lr", "grad_norm", "tokens")
    assert [[m[k] for k in keys] for m in rest.metrics] == [[m[k] for k in keys] for m in full.metrics]
    for (name, a), (_, b) in zip(whole.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="trained with lr=0.003, now lr=0.001"):
        train_prm(fresh, rows, PRMTrainConfig(**{**kw, "lr": 1e-3}, output_dir=str(tmp_path / "b")), log=None,
                  resume=True, data={"x": 1})
    with pytest.raises(ValueError, match="trained with x=1, now x=2"):
        train_prm(fresh, rows, PRMTrainConfig(**kw, output_dir=str(tmp_path / "b")), log=None, resume=True,
                  data={"x": 2})
    with pytest.raises(ValueError, match="no trainer state"):
        train_prm(fresh, rows, PRMTrainConfig(**kw, output_dir=str(tmp_path / "c")), log=None, resume=True)


# ------------------------------------------------------------------------------------------------
# log-probability features and the head fit
# ------------------------------------------------------------------------------------------------
def _reference_logprob_features(backbone, tok, record):
    """The LOGPROB_FEATURES of one trajectory, one token at a time in float64 from the backbone's
    next-token distributions over the sequence alone (the definitions in arkfast.prm.model)."""
    from arkfast.models import VarlenContext
    from arkfast.trajectories import chat_prompt_ids, encode_response

    prompt = chat_prompt_ids(tok, record["prompt"])
    response, ranges = encode_response(tok, record["response"], record["steps"])
    ids = torch.tensor(prompt + response)
    ctx, positions = VarlenContext.from_lengths([len(ids)])
    with torch.no_grad():
        logp = torch.log_softmax(backbone.compute_logits(backbone(ids, positions, ctx)).double(), -1)
    marker = [i for i in range(len(tok)) if "=" in tok.decode([i])]
    out, cum, cum_res, cum_op, ntok, low = [], 0.0, 0.0, 0.0, 0, math.inf
    for k, (t0, t1) in enumerate(ranges):
        lps, ents, last = [], [], -1
        for j, t in enumerate(range(len(prompt) + t0, len(prompt) + t1)):
            dist = logp[t - 1]
            lps.append(float(dist[ids[t]]))
            ents.append(float(-(dist.exp() * dist).sum()))
            if int(ids[t]) in marker:
                last = j
        step, res = sum(lps), sum(lps[last + 1:])
        cum, cum_res, cum_op, ntok, low = cum + step, cum_res + res, cum_op + step - res, ntok + t1 - t0, min(low, step)
        out.append([step, min(lps), cum, low, k, step / len(lps), sum(ents), ntok, res, step - res, cum_res, cum_op,
                    sum(a + b for a, b in zip(lps, ents))])
    return out


def test_logprob_features_packed_match_a_per_token_reference(tok):
    from arkfast.prm.model import LOGPROB_FEATURES, result_marker_ids

    records = _records(tok, 7, seed=11)
    markers = result_marker_ids(tok)
    assert tok.encode(" = ", add_special_tokens=False)[0] in markers
    prm = ProcessRewardModel(load_prm_backbone(), PRMConfig(features="logprobs", result_marker_ids=markers)).double()
    examples = [encode_trajectory(tok, r) for r in records]
    rows = pack_step_rows(examples, 300)
    assert len(rows) < len(examples)  # several sequences share a row
    got = {}
    with torch.no_grad():
        for row in rows:
            ids, positions, ctx, step_index, _ = row.to_device("cpu")
            raw, h = prm.raw_step_inputs(ids, positions, ctx, step_index, row.step_tokens("cpu"))
            assert h is None and raw.shape == (row.total_steps, len(LOGPROB_FEATURES))
            for m, part in zip(row.members, torch.split(raw, list(row.num_steps))):
                got[m] = part
    for i, r in enumerate(records):
        want = torch.tensor(_reference_logprob_features(prm.backbone, tok, r), dtype=torch.float64)
        assert torch.allclose(got[i], want, rtol=1e-9, atol=1e-9), (i, got[i] - want)
    # the equations' results are split from their operands; the answer step (no '=') is all result
    last = got[0][-1]
    assert last[LOGPROB_FEATURES.index("operand_logprob")] == 0
    assert got[0][0][LOGPROB_FEATURES.index("operand_logprob")] < 0
    with pytest.raises(ValueError, match="response_start"):
        score_examples(prm, [dataclasses.replace(examples[0], response_start=None)])


def test_step_targets_soft_and_hard():
    from arkfast.prm.training import step_targets

    assert step_targets([0.0, 0.125, 1.0], "soft") == [0.0, 0.125, 1.0]
    assert step_targets([0.0, 0.125, 1.0], "hard") == [0.0, 1.0, 1.0]
    assert step_targets([1.0, 0.0], "hard") == [1.0, 0.0]  # outcome labels stay
    with pytest.raises(ValueError, match="targets must be one of soft, hard"):
        step_targets([0.5], "half")


def test_fit_head_on_logprob_features_fits_saves_and_ignores_the_seed(tmp_path, tok):
    from arkfast.prm.model import result_marker_ids
    from arkfast.prm.training import HeadFitConfig, fit_head

    examples = _exact_examples(tok, _records(tok, 16, seed=4))
    rows = pack_step_rows(examples, 384)
    config = PRMConfig(features="logprobs", result_marker_ids=result_marker_ids(tok), tokenizer=tokenizer_fingerprint(tok))
    truth = [bool(v) for ex in examples for v in ex.labels]
    scores = []
    for seed in (0, 7):  # the head's random init is replaced by the fit, which starts from zero weights
        prm = ProcessRewardModel(load_prm_backbone(), config, seed=seed)
        backbone = {k: v.clone() for k, v in prm.backbone.state_dict().items()}
        result = fit_head(prm, rows, HeadFitConfig(l2=1e-3, output_dir=str(tmp_path / f"m{seed}")), log=None)
        assert result.metrics[0]["bce"] == pytest.approx(math.log(2))  # zero weights: every step at 1/2
        assert result.metrics[-1]["bce"] < 0.9 * result.metrics[0]["bce"]
        assert all(torch.equal(v, backbone[k]) for k, v in prm.backbone.state_dict().items())  # frozen
        assert float(prm.feature_std.min()) > 0 and float(prm.feature_mean.abs().sum()) > 0
        scores.append(score_examples(prm, examples))
        again = load_prm(tmp_path / f"m{seed}")
        assert again.config == config
        assert score_examples(again, examples) == scores[-1]
    assert scores[0] == scores[1]
    assert step_auroc([s for ss in scores[0] for s in ss], truth) > 0.75
    with pytest.raises(ValueError, match="log-probability features"):
        fit_head(ProcessRewardModel(load_prm_backbone()), rows, HeadFitConfig(), log=None)


def test_rollout_scoring_gives_a_logprob_prm_each_steps_tokens(tok):
    # GRPO scores its engine rollouts through StepExamples of its own; a log-probability PRM needs their
    # response_start, and then scores a rollout as it scores the same text as a trajectory record.
    from types import SimpleNamespace

    from arkfast.distill.rollout import score_groups
    from arkfast.prm.model import result_marker_ids
    from arkfast.trajectories import chat_prompt_ids, encode_response

    prm = ProcessRewardModel(load_prm_backbone(), PRMConfig(features="logprobs", result_marker_ids=result_marker_ids(tok)))
    torch.nn.init.normal_(prm.head.weight, std=0.02, generator=torch.Generator().manual_seed(0))
    records = _records(tok, 3, seed=12)
    rollouts = []
    for r in records:
        ids, ranges = encode_response(tok, r["response"], r["steps"])
        rollouts.append(SimpleNamespace(prompt=SimpleNamespace(prompt_ids=tuple(chat_prompt_ids(tok, r["prompt"]))),
                                        token_ids=ids, steps=ranges, step_scores=None))
    score_groups(prm, [rollouts])
    want = score_examples(prm, [encode_trajectory(tok, r) for r in records])
    for r, w in zip(rollouts, want):
        assert r.step_scores == pytest.approx(w, abs=1e-6)
    assert max(max(w) for w in want) - min(min(w) for w in want) > 0.05  # scores that tell steps apart


def test_hidden_plus_logprobs_head_reads_both(tok):
    from arkfast.prm.model import LOGPROB_FEATURES

    prm = ProcessRewardModel(load_prm_backbone(), PRMConfig(features="hidden+logprobs", result_marker_ids=[101]))
    assert prm.head.in_features == prm.backbone.config.hidden_size + len(LOGPROB_FEATURES)
    row = pack_step_rows([encode_trajectory(tok, r) for r in _records(tok, 2)], 300)[0]
    ids, positions, ctx, step_index, _ = row.to_device("cpu")
    with torch.no_grad():
        x = prm.step_hidden(ids, positions, ctx, step_index, row.step_tokens("cpu"))
        raw, h = prm.raw_step_inputs(ids, positions, ctx, step_index, row.step_tokens("cpu"))
    assert torch.equal(x[:, len(LOGPROB_FEATURES):], h) and torch.equal(x[:, :len(LOGPROB_FEATURES)], raw)
    with pytest.raises(ValueError, match="features must be one of"):
        PRMConfig(features="logits")


# ------------------------------------------------------------------------------------------------
# the CLI: files, resume, scores, one-line errors
# ------------------------------------------------------------------------------------------------
def _cli(*argv):
    from arkfast.prm.__main__ import main

    return main(list(map(str, argv)))


def test_label_appends_and_resumes_after_a_truncated_line(tmp_path, tok):
    traj = tmp_path / "pad.jsonl"
    records = _records(tok, 5, seed=7)
    write_trajectories(traj, records)
    out = tmp_path / "labels.jsonl"
    _cli("label", "--trajectories", traj, "--output", out, "--method", "outcome", "--limit", 3)
    lines = out.read_text().splitlines()
    assert len(lines) == 3
    with pytest.raises(ValueError, match="already exists"):
        _cli("label", "--trajectories", traj, "--output", out, "--method", "outcome", "--limit", 3)
    out.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])  # killed in mid-write of the third
    _cli("label", "--trajectories", traj, "--output", out, "--method", "outcome", "--limit", 3, "--resume")
    again = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in again] == [json.loads(line)["id"] for line in lines]
    by_id = {r["id"]: r for r in records}
    for r in again:
        assert r["step_labels"] == [float(by_id[r["id"]]["correct"])] * len(r["steps"])
    with pytest.raises(ValueError, match="k=8, now k=4|method='outcome', now method='monte-carlo'"):
        _cli("label", "--trajectories", traj, "--output", out, "--limit", 3, "--resume", "--k", "4")


def test_score_writes_step_and_trajectory_scores(tmp_path, tok):
    traj = tmp_path / "pad.jsonl"
    records = _records(tok, 4, seed=8)
    write_trajectories(traj, records)
    prm = ProcessRewardModel(load_prm_backbone(), PRMConfig(tokenizer=tokenizer_fingerprint(tok)), seed=2)
    save_prm(prm, tmp_path / "prm", tokenizer=tok)
    out = tmp_path / "scored.jsonl"
    _cli("score", "--input", traj, "--prm", tmp_path / "prm", "--output", out)
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    want = score_examples(prm, [encode_trajectory(tok, r) for r in records])
    for r, w in zip(scored, want):
        assert r["step_scores"] == pytest.approx(w, abs=1e-6)
        assert r["score_min"] == min(r["step_scores"])
        assert r["score_prod"] == pytest.approx(math.prod(r["step_scores"]), rel=1e-12)
        assert r["response"] == records[scored.index(r)]["response"]


def test_train_cli_saves_its_state_and_resumes(tmp_path, tok):
    traj = tmp_path / "pad.jsonl"
    write_trajectories(traj, _records(tok, 6, seed=9))
    labels = tmp_path / "labels.jsonl"
    _cli("label", "--trajectories", traj, "--output", labels, "--method", "outcome")
    args = ("train", "--labels", labels, "--output", tmp_path / "m", "--features", "hidden", "--steps", 4,
            "--save-every", 2, "--eval-every", 0, "--row-tokens", 256, "--val-fraction", 0.2)
    _cli(*args)
    state = json.loads((tmp_path / "m" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["finished"] and state["data"]["labels_sha256"].startswith("sha256:")
    weights = {k: v.clone() for k, v in load_prm(tmp_path / "m").state_dict().items()}
    (tmp_path / "m" / "trainer_state.json").write_text(json.dumps({**state, "finished": False}))  # as if killed
    with pytest.raises(ValueError, match="stopped at step 4; pass --resume"):
        _cli(*args)
    _cli(*args, "--resume")  # nothing left to do: the saved weights stay as they were
    assert all(torch.equal(v, weights[k]) for k, v in load_prm(tmp_path / "m").state_dict().items())
    with open(labels, "a") as f:
        f.write(labels.read_text().splitlines()[0].replace('"id": "', '"id": "extra-') + "\n")
    with pytest.raises(ValueError, match="trained with labels_sha256="):
        _cli(*args, "--resume")


def test_train_cli_default_fits_a_logprob_head(tmp_path, tok):
    traj = tmp_path / "pad.jsonl"
    records = _records(tok, 8, seed=9)
    write_trajectories(traj, records)
    labels = tmp_path / "labels.jsonl"
    _cli("label", "--trajectories", traj, "--output", labels, "--method", "outcome")
    summary = _cli("train", "--labels", labels, "--output", tmp_path / "m", "--val-fraction", 0.25, "--base-model", TINY)
    assert summary["features"] == "logprobs" and summary["targets"] == "hard"
    assert summary["last_bce"] < summary["first_bce"] and summary["held_out_bce_after"] is not None
    saved = json.loads((tmp_path / "m" / "prm_config.json").read_text())
    assert saved["features"] == "logprobs" and saved["targets"] == "hard" and 101 in saved["result_marker_ids"]
    assert not (tmp_path / "m" / "trainer_state.json").exists()
    scored = tmp_path / "scored.jsonl"
    _cli("score", "--input", traj, "--prm", tmp_path / "m", "--output", scored)
    want = score_examples(load_prm(tmp_path / "m"), [encode_trajectory(tok, r) for r in records])
    got = [json.loads(line)["step_scores"] for line in scored.read_text().splitlines()]
    assert all(g == pytest.approx(w, abs=1e-6) for g, w in zip(got, want))
    with pytest.raises(ValueError, match="without --resume"):
        _cli("train", "--labels", labels, "--output", tmp_path / "m", "--resume")
    with pytest.raises(ValueError, match="--projection-dim"):
        _cli("train", "--labels", labels, "--output", tmp_path / "m2", "--projection-dim", 8, "--base-model", TINY)


def test_train_cli_default_backbone_is_the_rsft_student_distilled_first(tmp_path, tok, monkeypatch):
    # With no --base-model a log-probability PRM reads the R-SFT student of the default run folder,
    # and distils it first when it is missing (here a stand-in for python -m arkfast.distill --mode rsft
    # that copies the tiny model into place); --features hidden keeps the embedded tiny model.
    import shutil

    import arkfast.distill.cli

    monkeypatch.chdir(tmp_path)
    traj = tmp_path / "pad.jsonl"
    write_trajectories(traj, _records(tok, 6, seed=9))
    labels = tmp_path / "labels.jsonl"
    _cli("label", "--trajectories", traj, "--output", labels, "--method", "outcome")
    student = tmp_path / "runs" / "arith-train" / "distill" / "rsft" / "model"
    calls = []

    def fake_distill(argv):
        calls.append(argv)
        shutil.copytree(TINY, student)
        return {}

    monkeypatch.setattr(arkfast.distill.cli, "main", fake_distill)
    _cli("train", "--labels", labels, "--output", tmp_path / "m")
    assert calls == [["--mode", "rsft"]]
    assert json.loads((tmp_path / "m" / "prm_config.json").read_text())["base_model"] == str(student)
    _cli("train", "--labels", labels, "--output", tmp_path / "m2")  # the student is there now: used as it is
    assert len(calls) == 1
    _cli("train", "--labels", labels, "--output", tmp_path / "m3", "--features", "hidden", "--steps", 1)
    assert json.loads((tmp_path / "m3" / "prm_config.json").read_text())["base_model"] == str(TINY)


def test_bad_inputs_get_errors_naming_file_line_and_field(tmp_path, tok):
    records = _records(tok, 2)
    other = tmp_path / "other.jsonl"
    write_trajectories(other, [records[0], {**records[1], "tokenizer": "sha256:" + "0" * 64}])
    with pytest.raises(TrajectoryFileError, match=r"other.jsonl:2: field 'tokenizer': made for tokenizer"):
        _cli("label", "--trajectories", other, "--output", tmp_path / "l.jsonl", "--method", "outcome")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({k: v for k, v in records[0].items() if k != "steps"}) + "\n")
    with pytest.raises(TrajectoryFileError, match=r"missing.jsonl:1: field 'steps': missing"):
        _cli("label", "--trajectories", missing, "--output", tmp_path / "l.jsonl", "--method", "outcome")
    unlabelled = tmp_path / "unlabelled.jsonl"
    write_trajectories(unlabelled, records)
    with pytest.raises(TrajectoryFileError, match=r"unlabelled.jsonl:1: field 'step_labels': missing"):
        _cli("train", "--labels", unlabelled, "--output", tmp_path / "m", "--base-model", TINY)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = subprocess.run([sys.executable, "-m", "arkfast.prm", "label", "--trajectories", str(empty),
                           "--output", str(tmp_path / "l.jsonl"), "--method", "outcome"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {empty}: empty file")
    assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1


def test_eval_numbers_match_a_recount_of_the_samples(llm, tok):
    from arkfast.prm.evaluate import evaluate_samples, sample_solutions

    task, n = ArithTask(), 3
    samples = sample_solutions(llm, task, arith_problems("test", 4), n=n, temperature=0.5, seed=1, use_tqdm=False)
    assert [s["id"] for s in samples[:n]] == [f"arith-test-0/r1/a{j}" for j in range(n)]
    prm = ProcessRewardModel(load_prm_backbone(), PRMConfig(), seed=5)
    out = evaluate_samples(prm, tok, samples, n=n)
    scores = score_examples(prm, [encode_trajectory(tok, s) for s in samples])
    right = [check_steps(s["response"], s["steps"], s["meta"]["solution"]) for s in samples]
    flat = [(x, ok) for ss, rr in zip(scores, right) for x, ok in zip(ss, rr)]
    assert out["steps"] == len(flat) and out["right_steps"] == sum(ok for _, ok in flat)
    assert out["step_auroc"] == step_auroc([x for x, _ in flat], [ok for _, ok in flat])
    groups = range(0, len(samples), n)
    picks = [max(range(i, i + n), key=lambda j: (min(scores[j]), -j)) for i in groups]
    assert out["best_of_n_accuracy"] == sum(samples[j]["correct"] for j in picks) / len(picks)
    assert out["pass_at_n"] == sum(any(s["correct"] for s in samples[i:i + n]) for i in groups) / len(picks)
    assert out["sample_accuracy"] == sum(s["correct"] for s in samples) / len(samples)
    fe = first_error_f1([predicted_first_error(ss) for ss in scores], [first_error(rr) for rr in right])
    assert out["first_error_f1"] == fe["f1"]

"""Interaction graphs of debates (typed edges, statistics, the Mantel test) and the self-correction
records, on hand-made debate records."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from test_trajectories import debate, sol, turn, write_debates

from arkfast.debate import PromptBuilder
from arkfast.generate import default_model_path
from arkfast.models import load_tokenizer
from arkfast.tasks import ArithTask, Problem
from arkfast.trajectories.graphs import build_graph, graph_statistics, mantel_test, step_diversity


@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer(default_model_path())


def three_agents():
    """Round 1: a0 right (9), a1 wrong (8), a2 wrong (7), majority 9. Round 2: a0 takes a1's 8, a1
    takes a0's 9, a2 keeps 7 (the vote's tie rule: 8, seen first)."""
    rounds = [[turn(0, sol(9)), turn(1, sol(8), "8"), turn(2, sol(7), "7")],
              [turn(0, sol(8), "8"), turn(1, sol(9)), turn(2, sol(7, "\ncheck"), "7")]]
    return debate("p1", rounds, final="8", round_majority=["9", "8"], round_majority_correct=[True, False])


def edges_of(graph):
    return sorted((e["type"], tuple(e["from"]), tuple(e["to"])) for e in graph["edges"])


def test_edges_are_typed_by_each_agents_transition():
    graph, _ = build_graph(three_agents(), ArithTask(), permutations=0)
    assert [(n["round"], n["agent"], n["answer"], n["correct"], n["trajectory"]) for n in graph["nodes"]] == [
        (1, 0, "9", True, "p1/r1/a0"), (1, 1, "8", False, "p1/r1/a1"), (1, 2, "7", False, "p1/r1/a2"),
        (2, 0, "8", False, "p1/r2/a0"), (2, 1, "9", True, "p1/r2/a1"), (2, 2, "7", False, "p1/r2/a2")]
    assert edges_of(graph) == sorted([
        ("continues", (1, 0), (2, 0)), ("continues", (1, 1), (2, 1)), ("continues", (1, 2), (2, 2)),
        ("revises", (1, 0), (2, 0)), ("revises", (1, 1), (2, 1)),
        ("corrupts", (1, 0), (2, 0)), ("corrects", (1, 1), (2, 1)),
        ("adopts", (1, 1), (2, 0)), ("adopts", (1, 0), (2, 1))])
    s = graph["stats"]
    assert s["transitions"] == {"wrong->right": 1, "right->wrong": 1, "wrong->wrong": 1, "right->right": 0}
    # a1 and a2 were off the majority (9): a1 adopts it; a0 held it and leaves it
    assert s["adoption"] == {"minority": 2, "adopted": 1, "majority": 1, "left": 1}
    assert s["majority_flips"] == ["right->wrong"]


def test_a_lost_answer_revises_and_equal_answers_adopt_nobody():
    rounds = [[turn(0, sol(9)), turn(1, sol(9))], [turn(0, "no idea", None, correct=False), turn(1, sol(9, " ok"))]]
    graph, _ = build_graph(debate("p2", rounds, round_majority=["9", "9"], round_majority_correct=[True, True]),
                           ArithTask(), permutations=0)
    assert edges_of(graph) == [("continues", (1, 0), (2, 0)), ("continues", (1, 1), (2, 1)),
                               ("corrupts", (1, 0), (2, 0)), ("revises", (1, 0), (2, 0))]
    assert graph["stats"]["majority_flips"] == [] and graph["stats"]["mantel"] is None  # 2 answers: no test


def test_pooled_statistics_leave_out_errored_records():
    broken = debate("p3", [[turn(0, sol(8), "8")], [turn(0, sol(9))]], error="round 2: refused",
                    round_majority=["8"], round_majority_correct=[False])
    graphs = [build_graph(r, ArithTask(), permutations=0) for r in (three_agents(), three_agents(), broken)]
    stats = graph_statistics(graphs, permutations=0)
    assert stats["problems"] == 2 and stats["with_error"] == 1
    assert stats["transitions"] == {"wrong->right": 2, "right->wrong": 2, "wrong->wrong": 2, "right->right": 0}
    assert stats["transition_shares"]["wrong->right"] == pytest.approx(1 / 3)
    assert stats["edges"]["adopts"] == 4 and stats["majority_flips"]["right->wrong"] == 2
    assert stats["mantel"] == {"testable": 0, "permutations": 0}


def test_mantel_statistic_and_p_against_a_loop_reference():
    texts = [sol(9), sol(9, "\n1 + 1 = 2"), sol(8), "7 + 1 = 8\nAnswer: 8", sol(9, "\n2 + 2 = 4"), sol(6)]
    scores = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    d = step_diversity(texts, "line")
    assert d[0, 1] == pytest.approx(1 - 2 / 3) and d[0, 0] == 0 and np.allclose(d, d.T)
    k = 299
    test = mantel_test(d, scores, k, np.random.default_rng(5))
    iu = np.triu_indices(6, 1)

    def r_of(c):
        e = np.abs(c[:, None] - c[None, :])
        return np.corrcoef(d[iu], e[iu])[0, 1]

    c = np.asarray(scores)
    assert test["r"] == pytest.approx(r_of(c), abs=1e-12)
    perms = np.argsort(np.random.default_rng(5).random((k, 6)), axis=1)  # the same draws, one at a time
    null = np.array([r_of(c[p]) for p in perms])
    np.testing.assert_allclose(test["null"], null, atol=1e-12)
    assert test["p"] == pytest.approx((1 + np.sum(null >= test["r"] - 1e-12)) / (k + 1))
    # all permutations of 6 labels: the exact p, which the random test estimates
    exact = np.mean([r_of(c[list(p)]) >= test["r"] - 1e-12 for p in itertools.permutations(range(6))])
    assert abs(test["p"] - exact) < 0.05
    assert mantel_test(d, [1.0] * 6, k, np.random.default_rng(0)) is None  # no score difference


def test_self_correction_records_come_only_from_real_wrong_to_right_transitions(tiny_tok):
    from collections import Counter

    from arkfast.trajectories.correction import correction_records, revision_prompt_ids
    from arkfast.trajectories.schema import tokenizer_fingerprint, validate_record

    rounds = [[turn(0, sol(8), "8"), turn(1, sol(9)), turn(2, sol(9)), turn(3, sol(7), "7"),
               turn(4, sol(6), "6"), turn(5, "thinking...", None, correct=False), turn(6, sol(5), "5")],
              [turn(0, sol(9, "\nchecked")), turn(1, sol(9)), turn(2, sol(8), "8"), turn(3, sol(6), "6"),
               turn(4, sol(9), finish="length"), turn(5, sol(9)), turn(6, sol(9, "\nchecked"))]]
    record = debate("p4", rounds)
    counts = Counter()
    out = correction_records(record, "mem:1", tiny_tok, tokenizer_fingerprint(tiny_tok), None, counts, {})
    # a0, a6: wrong -> right; a1: right -> right; a2 right -> wrong, a3 wrong -> wrong: nothing; a4: the
    # revision was cut at max_tokens; a5: the draft had no answer
    assert [(r["source"]["agent"], r["transition"]) for r in out] == [(0, "corrects"), (1, "continues"),
                                                                       (6, "corrects")]
    assert counts["correct.corrects"] == 2 and counts["correct.continues"] == 1
    builder = PromptBuilder(tiny_tok, ArithTask())
    problem = Problem(record["id"], record["question"], record["gold"], meta=record["meta"])
    for r in out:
        assert validate_record(r) is None and r["correct"] and r["source"]["round"] == 2
        draft = rounds[0][r["source"]["agent"]]
        assert r["draft"] == {"response": draft["text"], "answer": draft["answer"], "correct": draft["correct"],
                              "round": 1}
        assert r["response"] == rounds[1][r["source"]["agent"]]["text"]
        # exactly the ids generate --protocol self-refine sends for the revision of this draft
        assert revision_prompt_ids(tiny_tok, r["prompt"]) == builder.shared_round(problem, [draft["text"]])[0]
    # a repeated (draft, revision) pair of one problem is a duplicate
    again = correction_records(debate("p5", [[rounds[0][0], turn(1, sol(8), "8")],
                                             [rounds[1][0], turn(1, sol(9, "\nchecked"))]]),
                               "mem:2", tiny_tok, "fp", None, counts, {})
    assert len(again) == 1 and counts["correct.duplicate"] == 1


def test_cli_writes_graphs_and_correct_records_and_prints_the_table(tmp_path, capsys):
    from arkfast.trajectories.__main__ import main

    records = [three_agents(), debate("p6", [[turn(0, sol(8), "8"), turn(1, sol(9))],
                                               [turn(0, sol(9)), turn(1, sol(9))]],
                                       round_majority=["8", "9"], round_majority_correct=[False, True])]
    path = write_debates(tmp_path / "d.jsonl", records)
    stats = main(["--debates", str(path), "--output", str(tmp_path / "o"), "--mantel-permutations", "19"])
    graphs = [json.loads(line) for line in (tmp_path / "o" / "graphs.jsonl").read_text().splitlines()]
    assert [g["problem_id"] for g in graphs] == ["p1", "p6"]
    assert stats["graphs"]["transitions"] == {"wrong->right": 2, "right->wrong": 1, "wrong->wrong": 1,
                                              "right->right": 1}
    assert stats["correct"] == {"records": 3, "corrects": 2, "continues": 1, "duplicate": 0}
    assert json.loads((tmp_path / "o" / "stats.json").read_text())["graphs"] == json.loads(json.dumps(stats["graphs"]))
    out = capsys.readouterr().out
    assert "agent round r -> r+1" in out and "minority agents adopting the majority" in out
    assert "majority flips" in out and "metric freedom" in out

"""Debates as interaction graphs (MAGDi, arXiv 2402.01620; typed edges after SMAGDi, arXiv 2511.05528),
their statistics, and the metric-freedom diagnostic (AdaSkill, arXiv 2604.01608).

One graph per debate record (``graphs.jsonl``)::

    nodes  one per agent turn: {"round": r >= 1, "agent": a, "answer": str|null, "correct": bool,
           "trajectory": "<problem_id>/r<r>/a<a>"}   (the id the turn's text has in the trajectory sets)
    edges  {"type": T, "from": [r, a], "to": [r + 1, a']}, typed:
           continues  (r, a) -> (r + 1, a): every agent's next turn
           revises    (r, a) -> (r + 1, a): the agent changed its answer (canonical forms differ)
           corrects   (r, a) -> (r + 1, a): wrong -> right
           corrupts   (r, a) -> (r + 1, a): right -> wrong
           adopts     (r, b) -> (r + 1, a), b != a: a's new answer is peer b's round-r answer, which
                      differed from a's own round-r answer (one edge per such peer)

An answer that is null (none extracted) equals nothing, so a turn that loses or gains its answer
``revises``. ``corrects`` and ``corrupts`` read the turns' ``correct`` labels (the task's grading at
generation). A record with an ``error`` gets its graph (the rounds it has) but is left out of the
statistics.

Statistics, per problem (the graph's ``stats``) and pooled (:func:`graph_statistics`):

* the transition matrix: each agent's correctness in round r against round r + 1, counted over
  agents and consecutive rounds;
* adoption of the majority: agents whose round-r answer was not round r's majority answer
  (``minority``) and how many of them give that majority answer in round r + 1 (``adopted``);
  agents that held the majority and leave it (``left``);
* majority flips: problems whose majority answer changes from one round to the next, by the
  correctness before and after.

**Metric freedom** (:func:`mantel_test`). Over the ``n`` answers of a problem (every turn that has an
answer, all rounds), two ``n x n`` matrices:

* output diversity ``D_ij = 1 - |S_i & S_j| / |S_i | S_j|``, the Jaccard distance of the answers'
  sets of reasoning steps (each step's text normalised as de-duplication does; the task's default
  step segmentation), and
* score difference ``E_ij = |c_i - c_j|``, with ``c`` the verifier's score (1 right, 0 wrong).

The Mantel statistic is Pearson's ``r`` between the ``n(n-1)/2`` upper-triangle entries of ``D`` and
``E``. Its null distribution comes from ``K`` random relabellings of the answers (the same
permutation applied to the rows and the columns of ``E``), one-sided:
``p = (1 + #{r_perm >= r}) / (K + 1)``. A problem is testable when both triangles vary (it has right
and wrong answers, and some two answers differ in their steps). Pooled: the mean ``r`` over testable
problems, the share with ``p < 0.05``, and the permutation p of the mean (each permutation relabels
every problem at once). Reading: ``r`` near 1 means the committee's diversity *is* the split between
right and wrong answers (distilling the right ones is the whole gain); ``r`` near 0 means answers
differ about as much within the right ones as across the split: the diversity is free of the
metric, and distilling several distinct right trajectories (DA) can add what one cannot.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .build import _task, normalise
from .steps import default_step_mode, segment_steps

__all__ = ["EDGE_TYPES", "TRANSITIONS", "build_graph", "format_graph_stats", "graph_statistics", "mantel_test",
           "step_diversity"]

EDGE_TYPES = ("continues", "adopts", "revises", "corrects", "corrupts")
TRANSITIONS = ("wrong->right", "right->wrong", "wrong->wrong", "right->right")


def _transition(before: bool, after: bool) -> str:
    return f"{'right' if before else 'wrong'}->{'right' if after else 'wrong'}"


def step_diversity(texts: Sequence[str], mode: str) -> np.ndarray:
    """``D [n, n]`` float64: the Jaccard distance of each pair's sets of normalised steps (0 on the
    diagonal; two texts without steps are at distance 0)."""
    sets = [{normalise(t[s:e]) for s, e in segment_steps(t, mode)} for t in texts]
    n = len(sets)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            union = len(sets[i] | sets[j])
            out[i, j] = out[j, i] = 1.0 - len(sets[i] & sets[j]) / union if union else 0.0
    return out


def _upper(m: np.ndarray) -> np.ndarray:
    return m[np.triu_indices(m.shape[0], 1)]


def mantel_test(diversity: np.ndarray, scores: Sequence[float], permutations: int,
                rng: np.random.Generator) -> dict[str, Any] | None:
    """Mantel test of ``diversity [n, n]`` against ``E_ij = |scores_i - scores_j|`` (see the module
    docstring): ``{"r", "p", "answers", "null"}`` with ``null`` the ``permutations`` relabelled
    statistics (float64 array), or ``None`` when either triangle is constant (r undefined)."""
    c = np.asarray(scores, dtype=np.float64)
    n = c.shape[0]
    d = _upper(diversity)
    if n < 3 or np.ptp(d) == 0 or np.ptp(c) == 0:
        return None
    i, j = np.triu_indices(n, 1)
    d = d - d.mean()
    perms = np.vstack([np.arange(n), np.argsort(rng.random((permutations, n)), axis=1)])  # [K + 1, n]
    e = np.abs(c[perms[:, i]] - c[perms[:, j]])  # [K + 1, pairs]; row 0: the observed labels
    e = e - e.mean(axis=1, keepdims=True)
    # A relabelling permutes the pairs, so |E - mean E| is the same for every row.
    r = (e @ d) / (np.linalg.norm(e, axis=1) * np.linalg.norm(d))  # [K + 1]
    return {"r": float(r[0]), "p": float((1 + np.sum(r[1:] >= r[0] - 1e-12)) / (permutations + 1)),
            "answers": n, "null": r[1:]}


def _seed(seed: int, problem_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{problem_id}".encode()).digest()[:8], "big")


def build_graph(record: dict[str, Any], task: Any, *, permutations: int = 199, seed: int = 0,
                step_mode: str | None = None) -> tuple[dict[str, Any], np.ndarray | None]:
    """``(graph, null)``: the interaction graph of one debate record (see the module docstring) with
    its per-problem ``stats``, and the Mantel null statistics (``None`` when not testable)."""
    canon = task.canonical
    pid = record["id"]
    rounds = record["rounds"]
    nodes = [{"round": r + 1, "agent": t["agent"], "answer": t["answer"], "correct": t["correct"],
              "trajectory": f"{pid}/r{r + 1}/a{t['agent']}"} for r, turns in enumerate(rounds) for t in turns]
    edges: list[dict[str, Any]] = []
    transitions: Counter = Counter()
    adoption = Counter()
    majorities = [canon(m) for m in record.get("round_majority") or []]
    for r in range(len(rounds) - 1):
        before = {t["agent"]: t for t in rounds[r]}
        majority = majorities[r] if r < len(majorities) else None
        for t in rounds[r + 1]:
            a, prev = t["agent"], before.get(t["agent"])
            if prev is None:
                continue
            link = {"from": [r + 1, a], "to": [r + 2, a]}
            edges.append({"type": "continues", **link})
            old, new = canon(prev["answer"]), canon(t["answer"])
            if old is None or new is None or old != new:
                edges.append({"type": "revises", **link})
            if not prev["correct"] and t["correct"]:
                edges.append({"type": "corrects", **link})
            if prev["correct"] and not t["correct"]:
                edges.append({"type": "corrupts", **link})
            transitions[_transition(prev["correct"], t["correct"])] += 1
            if new is not None and new != old:
                for b, peer in sorted(before.items()):
                    if b != a and canon(peer["answer"]) == new:
                        edges.append({"type": "adopts", "from": [r + 1, b], "to": [r + 2, a]})
            if majority is not None:
                if old != majority:
                    adoption["minority"] += 1
                    adoption["adopted"] += new == majority
                else:
                    adoption["majority"] += 1
                    adoption["left"] += new != majority
    correct = record.get("round_majority_correct") or []
    flips = [_transition(correct[r], correct[r + 1]) for r in range(len(majorities) - 1)
             if majorities[r] != majorities[r + 1]]

    answered = [t for turns in rounds for t in turns if t["answer"] is not None]
    mode = step_mode or default_step_mode(record["task"])
    test = mantel_test(step_diversity([t["text"] for t in answered], mode), [float(t["correct"]) for t in answered],
                       permutations, np.random.default_rng(_seed(seed, pid))) if permutations else None
    stats = {"transitions": {k: transitions[k] for k in TRANSITIONS},
             "edges": {k: sum(e["type"] == k for e in edges) for k in EDGE_TYPES},
             "majority": list(record.get("round_majority") or []), "majority_correct": list(correct),
             "majority_flips": flips,
             "adoption": {k: adoption[k] for k in ("minority", "adopted", "majority", "left")},
             "mantel": None if test is None else {"r": test["r"], "p": test["p"], "answers": test["answers"]}}
    graph = {"problem_id": pid, "task": record["task"], "gold": record["gold"], "final_answer": record["final_answer"],
             "correct": record["correct"], "error": record["error"], "nodes": nodes, "edges": edges, "stats": stats}
    return graph, None if test is None else test["null"]


def graph_statistics(graphs: Iterable[tuple[dict[str, Any], np.ndarray | None]], permutations: int) -> dict[str, Any]:
    """The pooled statistics of :func:`build_graph` outputs (records with an ``error`` left out)."""
    transitions, edges, adoption, flips = Counter(), Counter(), Counter(), Counter()
    problems = with_error = flipped = 0
    rs, ps, nulls = [], [], []
    for graph, null in graphs:
        if graph["error"] is not None:
            with_error += 1
            continue
        problems += 1
        s = graph["stats"]
        transitions.update(s["transitions"])
        edges.update(s["edges"])
        adoption.update(s["adoption"])
        flips.update(s["majority_flips"])
        flipped += bool(s["majority_flips"])
        if s["mantel"] is not None:
            rs.append(s["mantel"]["r"])
            ps.append(s["mantel"]["p"])
            nulls.append(null)
    total = sum(transitions.values())
    mantel: dict[str, Any] = {"testable": len(rs), "permutations": permutations}
    if rs:
        observed = float(np.mean(rs))
        null_mean = np.mean(np.vstack(nulls), axis=0)  # [K]: each permutation relabels every problem at once
        mantel.update({"mean_r": observed, "median_r": float(np.median(rs)),
                       "share_p_below_0.05": float(np.mean(np.asarray(ps) < 0.05)),
                       "p_of_mean": float((1 + np.sum(null_mean >= observed - 1e-12)) / (permutations + 1))})
    return {"problems": problems, "with_error": with_error,
            "transitions": {k: transitions[k] for k in TRANSITIONS},
            "transition_shares": {k: transitions[k] / total if total else 0.0 for k in TRANSITIONS},
            "edges": {k: edges[k] for k in EDGE_TYPES},
            "adoption": {k: adoption[k] for k in ("minority", "adopted", "majority", "left")},
            "majority_flips": {"problems": flipped, **{k: flips[k] for k in TRANSITIONS if k != "right->right"}},
            "mantel": mantel}


def format_graph_stats(stats: dict[str, Any]) -> str:
    """The printed table: the transition matrix, edges, majority adoption and flips, metric freedom."""
    t, share = stats["transitions"], stats["transition_shares"]
    a, f, m = stats["adoption"], stats["majority_flips"], stats["mantel"]
    n = stats["problems"]
    lines = [f"interaction graphs: {n:,} problems ({stats['with_error']:,} with an error left out)", "",
             f"{'agent round r -> r+1':<24}{'right after':>14}{'wrong after':>14}"]
    for before in ("right", "wrong"):
        cells = [f"{t[f'{before}->{after}']:,} ({100 * share[f'{before}->{after}']:.1f}%)" for after in ("right", "wrong")]
        lines.append(f"{before + ' before':<24}{cells[0]:>14}{cells[1]:>14}")
    lines += ["", "edges  " + ", ".join(f"{k} {v:,}" for k, v in stats["edges"].items())]

    def pct(k: int, of: int) -> str:
        return f"{k:,} of {of:,} ({100 * k / of:.1f}%)" if of else f"{k:,} of 0"

    lines += [f"minority agents adopting the majority   {pct(a['adopted'], a['minority'])}",
              f"majority agents leaving it              {pct(a['left'], a['majority'])}",
              (f"problems whose majority flips           {pct(f['problems'], n)}: wrong->right {f['wrong->right']:,}, "
               f"right->wrong {f['right->wrong']:,}, wrong->wrong {f['wrong->wrong']:,}"), ""]
    if m["testable"]:
        lines.append(f"metric freedom (Mantel, step diversity vs score difference, {m['permutations']} permutations): "
                     f"{m['testable']:,} testable problems, mean r {m['mean_r']:.3f} (median {m['median_r']:.3f}), "
                     f"p < 0.05 in {100 * m['share_p_below_0.05']:.1f}%, p of the mean {m['p_of_mean']:.3g}")
    else:
        lines.append("metric freedom (Mantel): no testable problem (none has right and wrong answers with "
                     "differing steps)")
    return "\n".join(lines)


def build_graphs(debates: Iterable[tuple[str, dict[str, Any]]], *, permutations: int = 199, seed: int = 0,
                 step_mode: str | None = None, progress: Any = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """``(graphs, stats)`` for ``(where, record)`` pairs from :func:`~.build.load_debates`."""
    tasks: dict[str, Any] = {}
    out = []
    for where, record in debates:
        out.append(build_graph(record, _task(record["task"], where, tasks), permutations=permutations, seed=seed,
                               step_mode=step_mode))
        if progress is not None:
            progress.update(1)
    return [g for g, _ in out], graph_statistics(out, permutations)

"""--mode graph (margin ranking and a correctness head on pooled states, trained through the LM),
--mode correct (self-correction records), --span-weights: float64 references, data rules, a short run
resumed bit for bit."""
from __future__ import annotations

import json

import pytest
import torch
from test_distill import arith_records, grads, random_examples, small_config, tiny_model

from arkfast.distill import DistillConfig, build_parser, distill, format_summary, load_examples
from arkfast.distill.checkpoints import read_jsonl
from arkfast.distill.graph import GraphObjective, concat_graph_rows, graph_rows
from arkfast.generate import default_model_path
from arkfast.models import VarlenContext, load_tokenizer
from arkfast.train import IGNORE_INDEX
from arkfast.trajectories import encode_response, write_trajectories
from kernel_testing import assert_close


@pytest.fixture(scope="module")
def tiny_tok():
    return load_tokenizer(default_model_path())


def node_groups(seed: int):
    """Three problems: 2 right + 2 wrong nodes, 1 right + 3 wrong, 3 right + 0 wrong (no pair)."""
    examples = iter(random_examples(12, seed))
    shape = [(2, 2), (1, 3), (3, 0)]
    return [[(next(examples), True) for _ in range(r)] + [(next(examples), False) for _ in range(w)] for r, w in shape]


def reference_loss(objective, groups, beta, alpha, margin):
    """Each node alone through the decoder: pooled = mean of its response hidden states; the sums of
    the module docstring of arkfast.distill.graph normalised by the step's N, P, J."""
    model = objective.decoder
    tokens, pooled, right, problem = [], [], [], []
    n_targets = 0
    for g, group in enumerate(groups):
        for example, correct in group:
            ids, labels, weights = example.tensors()
            ctx, positions = VarlenContext.from_lengths([len(example)])
            hidden = model(ids, positions, ctx)
            if correct:
                logits = model.compute_logits(hidden)
                ce = torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
                tokens.append((weights.double() * ce).sum())
                n_targets += int((labels != IGNORE_INDEX).sum())
            pooled.append(hidden[len(example.prompt):].mean(0))
            right.append(correct)
            problem.append(g)
    p = torch.stack(pooled)
    s, z = objective.score(p).squeeze(-1), objective.node(p).squeeze(-1)
    pairs = [(i, k) for i in range(len(right)) for k in range(len(right))
             if right[i] and not right[k] and problem[i] == problem[k]]
    mr = sum(torch.relu(margin - (s[i] - s[k])) for i, k in pairs) / len(pairs)
    y = torch.tensor(right, dtype=torch.float64)
    nc = torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="sum") / len(right)
    return sum(tokens) / n_targets + beta * mr + alpha * nc, len(pairs)


@pytest.mark.numerics
@pytest.mark.parametrize("one_row", [True, False])
def test_margin_and_node_terms_match_a_float64_reference(one_row):
    """One packed forward (a problem per packing unit, pooling by index_add over the response positions)
    == each node run alone, loss and every gradient (decoder and heads) in float64. With rows as long as
    the longest problem, the problems land in several rows, fed as micro-batches of two rows
    (concat_graph_rows)."""
    groups = node_groups(seed=7)
    model = tiny_model(seed=2)
    beta, alpha, margin = 0.7, 0.3, 2.0
    objective = GraphObjective(model, margin=margin, margin_weight=beta, node_weight=alpha, seed=1)
    longest = max(sum(len(e) for e, _ in g) for g in groups)
    rows, split = graph_rows(groups, 400 if one_row else longest)
    assert (len(rows) == 1) == one_row and split == 0
    n_targets = sum(r.num_targets for r in rows)
    pairs, nodes = objective.step_counts(rows)
    assert (pairs, nodes) == (2 * 2 + 1 * 3, 11)
    for m in range(0, len(rows), 2):
        objective.loss(concat_graph_rows(rows[m:m + 2]), torch.device("cpu"), n_targets, pairs, nodes).backward()
    packed = objective.pop_metrics()
    g_packed = grads(objective)
    ref, n_pairs = reference_loss(objective, groups, beta, alpha, margin)
    assert n_pairs == pairs
    ref.backward()
    total = packed["token_loss"] + beta * packed["margin_loss"] + alpha * packed["node_loss"]
    assert_close(torch.tensor(total, dtype=torch.float64), ref, torch.float64, name="loss")
    for name, g in grads(objective).items():
        assert_close(g_packed[name], g, torch.float64, name=f"grad {name}")


@pytest.mark.numerics
def test_the_margin_gradient_reaches_every_decoder_weight():
    """The margin term alone moves every decoder parameter (MAGDi's public code pools frozen embeddings,
    so there it moves none); detached pooled states would leave the decoder without a gradient."""
    model = tiny_model(seed=3)
    objective = GraphObjective(model, margin=2.0, margin_weight=1.0, node_weight=0.0, seed=1)
    rows, _ = graph_rows(node_groups(seed=4), 400)
    _, margin, _ = objective.terms(rows[0], torch.device("cpu"))
    assert margin > 0
    margin.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 1e-8, f"no margin gradient reaches {name}"
    assert objective.score.weight.grad.abs().max() > 0 and objective.node.weight.grad is None


def test_a_problem_longer_than_a_row_is_cut_and_its_lost_pairs_counted():
    groups = node_groups(seed=7)
    rows, split = graph_rows(groups, max(len(e) for g in groups for e, _ in g))  # rows of about one node
    kept = sum(r.num_pairs for r in rows)
    assert kept + split == 2 * 2 + 1 * 3 and split > 0
    assert sum(r.num_nodes for r in rows) == 11
    for r in rows:  # a pair joins a right to a wrong node; every pooled position lies in its own node
        assert all(r.node_correct[i] == 1 and r.node_correct[k] == 0 for i, k in r.pairs.tolist())
        ends = torch.tensor((0,) + r.lengths).cumsum(0)
        assert bool(((ends[r.pool_node] <= r.pool_index) & (r.pool_index < ends[r.pool_node + 1])).all())


# -- span weights -----------------------------------------------------------------------------------

def test_span_weights_scale_reasoning_and_answer_tokens(tiny_tok):
    record = arith_records(tiny_tok, 1)[0]
    record["step_scores"] = [0.9, 0.2, 0.7, 0.4, 0.5, 0.6][:len(record["steps"])]
    _, ranges = encode_response(tiny_tok, record["response"], record["steps"])
    for mode, base in (("rsft", [1.0] * len(ranges)), ("pad", None)):
        from arkfast.distill import pad_step_weights

        if base is None:
            base = pad_step_weights(record["step_scores"], "min")
        (examples, _) = _examples([record], tiny_tok, mode, {"steps": 0.5, "answer": 3.0})
        expected = [w * (3.0 if k == len(ranges) - 1 else 0.5) for k, (w, (a, b)) in enumerate(zip(base, ranges))
                    for _ in range(a, b)]
        expected.append(base[-1] * 3.0)  # the end-of-turn token closes the answer span
        assert list(examples[0].weights) == pytest.approx(expected, abs=1e-7)
    # the answer span of the tiny tokenizer: "\nAnswer: " starts in the last equation's step
    answer = [tiny_tok.decode([t]) for t in examples[0].completion[ranges[-1][0]:]]
    assert answer[-1] == "<|im_end|>" and "".join(answer[:-1]) == record["gold"]
    with pytest.raises(ValueError, match="expected steps=W1,answer=W2"):
        DistillConfig(span_weights="reasoning=2")
    assert DistillConfig(span_weights="answer=2").span_weights == {"steps": 1.0, "answer": 2.0}


def _examples(records, tok, mode, span, **kw):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "t.jsonl"
        write_trajectories(path, records)
        return load_examples([path], tok, mode, span_weights=span, **kw)


# -- self-correction ---------------------------------------------------------------------------------

def correction_records(tok):
    """Two corrects and one continues record, from a hand-made debate record."""
    from collections import Counter

    from arkfast.trajectories.correction import correction_records as build
    from arkfast.trajectories.schema import tokenizer_fingerprint

    plain = arith_records(tok, 1)[0]
    right = plain["response"]
    wrong = right.rsplit("\n", 1)[0] + "\nAnswer: 1"
    turns = [[{"agent": a, "text": t, "answer": t.rsplit(" ", 1)[1], "correct": t == right, "finish_reason": "stop"}
              for a, t in enumerate(texts)] for texts in ([wrong, right, wrong[:-1] + "2"], [right, right, right])]
    record = {"id": plain["problem_id"], "question": plain["prompt"][0]["content"].split("\n")[0],
              "gold": plain["gold"], "task": "arith", "rounds": turns, "final_answer": plain["gold"], "correct": True,
              "error": None, "meta": {}}
    return build(record, "mem", tok, tokenizer_fingerprint(tok), None, Counter(), {}), plain


def test_correct_mode_trains_the_revision_of_the_own_draft(tiny_tok):
    from arkfast.debate import PromptBuilder
    from arkfast.tasks import ArithTask, Problem

    records, plain = correction_records(tiny_tok)
    assert [r["transition"] for r in records] == ["corrects", "continues", "corrects"]
    examples, stats = _examples(records + [plain], tiny_tok, "correct", None)
    assert stats.examples == 3 and stats.skipped_continues == 1  # continues left out, the plain record kept
    builder = PromptBuilder(tiny_tok, ArithTask())
    problem = Problem(records[0]["problem_id"], records[0]["prompt"][0]["content"].split("\n")[0], plain["gold"])
    assert list(examples[0].prompt) == builder.shared_round(problem, [records[0]["draft"]["response"]])[0]
    assert list(examples[-1].prompt) == builder.first_round(problem)  # a plain record: the round-1 prompt
    examples, stats = _examples(records, tiny_tok, "correct", None, continues=True)
    assert stats.examples == 3 and stats.skipped_continues == 0
    with pytest.raises(ValueError, match="--mode correct needs self-correction records"):
        _examples([plain], tiny_tok, "correct", None)


def test_a_bad_self_correction_record_names_its_line_and_field(tiny_tok, tmp_path):
    from arkfast.trajectories import TrajectoryFileError, read_trajectories

    records, _ = correction_records(tiny_tok)
    for field, value, message in (("transition", "corrupts", "expected 'corrects' or 'continues'"),
                                  ("draft", {"response": 3}, "expected {")):
        bad = [dict(r) for r in records]
        bad[1][field] = value
        path = tmp_path / f"{field}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in bad))
        with pytest.raises(TrajectoryFileError, match=f"{path}:2: field '{field}': {message}"):
            read_trajectories(path)


# -- whole runs -------------------------------------------------------------------------------------

def graph_file(tok, path):
    """Right and wrong answers of 12 problems (wrong: the last line's number off by one)."""
    records = []
    for r in arith_records(tok, 12, scores=False):
        wrong = dict(r, id=r["id"].replace("/a0", "/a1"), source={"round": 1, "agent": 1}, correct=False,
                     answer="-1")
        wrong["response"] = r["response"].rsplit("\n", 1)[0] + "\nAnswer: -1"
        from arkfast.trajectories import segment_steps

        wrong["steps"] = [list(s) for s in segment_steps(wrong["response"], "line")]
        records += [r, wrong]
    write_trajectories(path, records)
    return path


@pytest.mark.numerics
def test_graph_run_logs_its_terms_and_resumes_bit_for_bit(tiny_tok, tmp_path):
    data = graph_file(tiny_tok, tmp_path / "pad.jsonl")
    over = {"mode": "graph", "row_tokens": 200, "epochs": 2.0, "save_every": 2, "graph_node_weight": 0.5,
            "span_weights": "steps=1,answer=2"}
    ref = distill(small_config(data, tmp_path / "ref", **over), log=None)
    assert ref["data"]["pairs"] == 12 and ref["data"]["right_nodes"] == 12 and ref["data"]["problems"] == 12
    assert "graph: problems / nodes (right) / pairs (lost across rows)  12 / 24 (12) / 12 (0)" in format_summary(ref)
    metrics = read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    assert all({"token_loss", "margin_loss", "node_loss"} <= set(m) for m in metrics)
    assert metrics[-1]["margin_loss"] < metrics[0]["margin_loss"]
    distill(small_config(data, tmp_path / "cut", stop_after=3, **over), log=None)
    resumed = distill(small_config(data, tmp_path / "cut", resume=True, **over), log=None)
    assert resumed["losses"] == ref["losses"]  # the heads' weights and moments came back with the checkpoint
    assert resumed["meta"]["span_weights"] == {"steps": 1.0, "answer": 2.0}
    with pytest.raises(ValueError, match="--mode graph needs right answers"):
        distill(small_config(_wrong_only(tiny_tok, tmp_path), tmp_path / "w", mode="graph"), log=None)


def _wrong_only(tok, tmp_path):
    path = tmp_path / "wrong.jsonl"
    records = [dict(r, correct=False) for r in arith_records(tok, 2, scores=False)]
    write_trajectories(path, records)
    return path


def test_help_lists_the_new_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--span-weights", "--continues", "--graph-margin-weight", "--graph-margin", "--graph-node-weight",
                 "correct", "graph"):
        assert flag in text, flag


@pytest.mark.numerics
def test_graph_mode_under_torchrun_equals_one_process(tiny_tok, tmp_path):
    """Two gloo ranks, each one of a step's two rows against the step's N, P and J: the losses and each
    logged term of one process training both rows, bit for bit (two shares summed, a + b either way;
    the terms are summed over the ranks before they are logged)."""
    import math
    import os
    import subprocess
    import sys

    data = graph_file(tiny_tok, tmp_path / "pad.jsonl")
    settings = small_config(data, tmp_path / "one", mode="graph", row_tokens=200, batch_rows=2, epochs=1.0,
                            save_every=0).to_dict()
    one = distill(DistillConfig(**settings), log=None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29700 + os.getpid() % 1000)}
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", env["MASTER_PORT"],
           "-m", "arkfast.distill", "--data", str(data), "--mode", "graph", "--output", str(out), "--row-tokens", "200",
           "--epochs", "1", "--lr", "1e-3", "--batch-rows", "2", "--save-every", "0", "--eval-limit", "0",
           "--no-progress", "--no-plot", "--no-tensorboard", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = read_jsonl(out / "metrics.jsonl")
    ref = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    assert len(two) == len(ref) == one["steps"]
    for a, b in zip(two, ref):
        assert [a[k] for k in ("loss", "token_loss", "margin_loss", "node_loss")] == \
            [b[k] for k in ("loss", "token_loss", "margin_loss", "node_loss")], a["step"]
        assert all(math.isfinite(a[k]) for k in ("margin_loss", "node_loss"))


def test_graph_mode_refuses_fsdp_before_reading_anything(tmp_path):
    # FSDP shards the plain loss module; the graph objective (decoder + heads) runs under DDP instead.
    from arkfast.distill import DistillConfig, distill

    with pytest.raises(ValueError, match="--mode graph runs without it"):
        distill(DistillConfig(mode="graph", fsdp=True, data=[str(tmp_path / "absent.jsonl")], output=str(tmp_path)))

"""arkfast.trajectories: step segmentation, step -> token ranges, the record schema, the R-SFT / DA / PAD
selection rules and the CLI.

References are independent: plain-Python segmenters written line by line, a per-token ownership scan,
and the tokenizer's own decode of each range.
"""
from __future__ import annotations

import json
import random
import re

import pytest

from arkfast.trajectories import (
    TrajectoryFileError,
    chat_prompt_ids,
    default_step_mode,
    encode_response,
    merge_tokenless_steps,
    read_trajectories,
    segment_steps,
    tokenizer_fingerprint,
    write_trajectories,
)
from model_fixtures import build_tiny_tokenizer

TRICKY = [
    "7 + 5 = 12\n12 - 3 = 9\nAnswer: 9",
    "\n\n  café 😀 naïve\n中文の step\n\n\n",
    "no newline at all",
    "",
    "   \n \n\t\n",
    "first\r\nsecond \n\n\nthird\n",
    "Step 1: add 🙂🙂\n\nStep 2: 中 + 文 = 中文\n   \nAnswer: 42",
    "trailing\n",
    "\nleading",
]


@pytest.fixture(scope="module")
def tiny_tok():
    """The shipped tiny model's tokenizer (character-level pieces, a few merged tokens like
    ``"\\nAnswer: "``; unknown characters map to ``<unk>``)."""
    from transformers import AutoTokenizer

    from arkfast.generate import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()))


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory):
    """A byte-level BPE tokenizer: multi-byte characters split into several tokens with one offset."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path_factory.mktemp("bpe"))))


# ---------------------------------------------------------------- segmentation


def ref_lines(text):
    """One step per line, by hand: walk the lines, strip each, keep the non-empty ones."""
    out, pos = [], 0
    for line in text.split("\n"):
        s, e = pos, pos + len(line)
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if e > s:
            out.append((s, e))
        pos += len(line) + 1
    return out


def ref_paragraphs(text):
    """Blank-line separated paragraphs, by hand: group consecutive non-blank lines."""
    out, pos, cur = [], 0, None
    for line in text.split("\n"):
        if line.strip():
            s = pos + (len(line) - len(line.lstrip()))
            e = pos + len(line.rstrip())
            cur = (s, e) if cur is None else (cur[0], e)
        elif cur is not None:
            out.append(cur)
            cur = None
        pos += len(line) + 1
    if cur is not None:
        out.append(cur)
    return out


def random_text(rng, n):
    alphabet = list("ab c1=+\n\n ") + ["é", "😀", "中", "\t", " \n"]
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("text", TRICKY)
def test_segment_line_and_paragraph_match_reference(text):
    assert segment_steps(text, "line") == ref_lines(text)
    assert segment_steps(text, "paragraph") == ref_paragraphs(text)


def test_segment_random_texts_match_reference():
    rng = random.Random(11)
    for n in [0, 1, 2, 17, 64, 423]:
        for _ in range(20):
            text = random_text(rng, n)
            assert segment_steps(text, "line") == ref_lines(text), repr(text)
            assert segment_steps(text, "paragraph") == ref_paragraphs(text), repr(text)


def test_segment_examples_and_multibyte_offsets_are_characters():
    text = "café 😀\n中文 step\n\nAnswer: 9"
    steps = segment_steps(text, "line")
    assert [text[s:e] for s, e in steps] == ["café 😀", "中文 step", "Answer: 9"]
    assert steps == [(0, 6), (7, 14), (16, 25)]  # str indices: é, 😀 and 中 are one character each
    assert [text[s:e] for s, e in segment_steps(text, "paragraph")] == ["café 😀\n中文 step", "Answer: 9"]
    assert segment_steps("no newline", "line") == [(0, 10)]
    assert segment_steps("\n\n", "line") == [] and segment_steps("", "paragraph") == []


def test_segment_regex_mode():
    text = "Step 1: a\nmore\nStep 2: b\n\nStep 3: c"
    steps = segment_steps(text, r"regex:\n(?=Step \d)")  # zero-width cut before each Step line
    assert [text[s:e] for s, e in steps] == ["Step 1: a\nmore", "Step 2: b", "Step 3: c"]
    steps = segment_steps("a; b;; ;c", "regex:;")
    assert [(s, e) for s, e in steps] == [(0, 1), (3, 4), (8, 9)]
    for bad in ["regex:", "regex:(", "lines", "", "para"]:
        with pytest.raises(ValueError, match="step mode"):
            segment_steps("x", bad)


def test_default_step_mode():
    assert default_step_mode("arith") == "line"
    assert default_step_mode("gsm8k") == "paragraph"
    assert default_step_mode("math") == "paragraph"
    assert default_step_mode("choice") == "paragraph"


# ---------------------------------------------------------------- token ranges


def ref_owners(tokenizer, text, steps):
    """Per token, by a linear scan: the last step whose start is <= the token's first character."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    owners = []
    for a, _ in enc["offset_mapping"]:
        k = 0
        for j, (s, _) in enumerate(steps):
            if s <= a:
                k = j
        owners.append(k)
    return enc["input_ids"], owners


@pytest.mark.parametrize("tok_name", ["tiny_tok", "bpe_tok"])
@pytest.mark.parametrize("mode", ["line", "paragraph", r"regex:\n(?=Step)", "regex: "])
def test_token_ranges_follow_first_character_rule(request, tok_name, mode):
    tok = request.getfixturevalue(tok_name)
    rng = random.Random(5)
    texts = TRICKY + [random_text(rng, n) for n in (1, 17, 64, 150) for _ in range(5)]
    for text in texts:
        steps = merge_tokenless_steps(tok, text, segment_steps(text, mode))
        ids, ranges = encode_response(tok, text, steps)
        ref_ids, owners = ref_owners(tok, text, steps)
        assert ids == list(ref_ids)
        assert len(ranges) == len(steps)
        got = [None] * len(ids)
        for k, (t0, t1) in enumerate(ranges):
            assert t1 > t0, (text, k)  # every step owns a token: its last one is where the PRM reads
            got[t0:t1] = [k] * (t1 - t0)
        assert got == owners or not steps, repr(text)
        if ranges:
            assert ranges[0][0] == 0 and ranges[-1][1] == len(ids)  # the ranges tile the response
        if tok_name == "bpe_tok":  # lossless byte-level: the ranges decode back to the response
            assert "".join(tok.decode(ids[t0:t1]) for t0, t1 in ranges) == (text if steps else "")


def test_token_ranges_multibyte_and_separator(bpe_tok):
    text = "é😀\n中 x"
    steps = segment_steps(text, "line")
    ids, ranges = encode_response(bpe_tok, text, steps)
    pieces = [bpe_tok.decode(ids[a:b]) for a, b in ranges]
    # 😀 is 4 byte-tokens sharing one character offset: all go to step 0, as does the "\n" after it
    assert pieces == ["é😀\n", "中 x"]
    assert ranges[0][1] - ranges[0][0] >= 1 + 4  # the emoji's bytes did not split across steps


def test_boundary_inside_a_token(tiny_tok):
    # the tiny tokenizer has one token "\nAnswer: ": it starts in step 0's gap, so it belongs to step 0
    text = "12 - 3 = 9\nAnswer: 9"
    ids, ranges = encode_response(tiny_tok, text, segment_steps(text, "line"))
    assert [tiny_tok.decode(ids[a:b]) for a, b in ranges] == ["12 - 3 = 9\nAnswer: ", "9"]
    # "wer" lies wholly inside that token: it owns none, is refused, and merge folds it into step 0
    steps = segment_steps(text, "regex:s|:")
    assert [text[s:e] for s, e in steps] == ["12 - 3 = 9\nAn", "wer", "9"]
    with pytest.raises(ValueError, match="step 1 .* owns no token"):
        encode_response(tiny_tok, text, steps)
    merged = merge_tokenless_steps(tiny_tok, text, steps)
    assert [text[s:e] for s, e in merged] == ["12 - 3 = 9\nAnswer", "9"]
    ids, ranges = encode_response(tiny_tok, text, merged)
    assert [tiny_tok.decode(ids[a:b]) for a, b in ranges] == ["12 - 3 = 9\nAnswer: ", "9"]


class OffsetsTokenizer:
    """A stand-in fast tokenizer with given ids and offsets (to pin the rule on odd offset maps)."""

    is_fast = True

    def __init__(self, offsets):
        self.offsets = offsets

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=True):
        return {"input_ids": list(range(len(self.offsets))), "offset_mapping": self.offsets}


def test_empty_offset_token_goes_with_the_token_before_it():
    # "ab\ncd": tokens "a", "b", "\n", a zero-width prefix piece reported as (0, 0), "c", "d"
    tok = OffsetsTokenizer([(0, 1), (1, 2), (2, 3), (0, 0), (3, 4), (4, 5)])
    _, ranges = encode_response(tok, "ab\ncd", segment_steps("ab\ncd", "line"))
    assert ranges == [(0, 4), (4, 6)]
    assert merge_tokenless_steps(tok, "ab\ncd", [(0, 2), (3, 5)]) == [(0, 2), (3, 5)]
    # a step inside one token: "abc" as one token, steps "a", "b", "c" -> only the first owns a token
    tok = OffsetsTokenizer([(0, 3)])
    assert merge_tokenless_steps(tok, "abc", [(0, 1), (1, 2), (2, 3)]) == [(0, 3)]
    assert encode_response(tok, "abc", [(0, 3)]) == ([0], [(0, 1)])


def test_encode_response_rejects_bad_spans(tiny_tok):
    for steps in ([(0, 0)], [(3, 2)], [(0, 99)], [(4, 6), (0, 2)], [(0, 4), (3, 6)], [(-1, 2)]):
        with pytest.raises(ValueError, match="step"):
            encode_response(tiny_tok, "abcdef", steps)


# ---------------------------------------------------------------- tokenizer identity and prompts


def test_fingerprint_is_a_stable_content_hash(tiny_tok, bpe_tok, tmp_path):
    from transformers import AutoTokenizer

    from arkfast.generate import default_model_path

    fp = tokenizer_fingerprint(tiny_tok)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fp)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(default_model_path()))) == fp
    tiny_tok("x" * 50, truncation=True, max_length=4)  # call-time truncation state does not count
    assert tokenizer_fingerprint(tiny_tok) == fp
    assert tokenizer_fingerprint(bpe_tok) != fp
    tiny_tok.save_pretrained(tmp_path / "copy")  # same content in another folder: same fingerprint
    copy = AutoTokenizer.from_pretrained(str(tmp_path / "copy"))
    assert tokenizer_fingerprint(copy) == fp
    copy.chat_template = copy.chat_template.replace("assistant", "bot")  # another template: another hash
    assert tokenizer_fingerprint(copy) != fp


def test_chat_prompt_ids_are_the_engines_round_one_prompt(tiny_tok):
    from arkfast.debate import PromptBuilder, first_round_text
    from arkfast.tasks import ArithTask, arith_problems

    task = ArithTask()
    problem = arith_problems("train", 3)[2]
    messages = [{"role": "user", "content": first_round_text(task, problem)}]
    ids = chat_prompt_ids(tiny_tok, messages)
    assert ids == PromptBuilder(tiny_tok, task).first_round(problem)
    assert tiny_tok.decode(ids).startswith("<|im_start|>user\n" + problem.question)
    assert tiny_tok.decode(ids).endswith("<|im_start|>assistant\n")


# ---------------------------------------------------------------- schema


def make_record(**over):
    rec = {"id": "p1/r1/a0", "problem_id": "p1", "task": "arith", "gold": "9", "answer": "9", "correct": True,
           "source": {"round": 1, "agent": 0}, "prompt": [{"role": "user", "content": "q"}],
           "response": "7 + 2 = 9\nAnswer: 9", "steps": [[0, 9], [10, 19]], "step_scores": None,
           "tokenizer": "sha256:abc"}
    rec.update(over)
    return rec


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_write_and_read_round_trip(tmp_path):
    recs = [make_record(), make_record(id="p1/r2/a3", source={"round": 2, "agent": 3},
                                       step_scores=[0.25, 1], score_min=0.25, score_prod=0.25,
                                       meta={"solution": "é"})]
    path = tmp_path / "sub" / "t.jsonl"
    write_trajectories(path, recs)
    assert read_trajectories(path) == recs
    assert read_trajectories(path, require_step_scores=False, tokenizer="sha256:abc") == recs
    assert [p.name for p in path.parent.iterdir()] == ["t.jsonl"]  # no temp file left behind


def test_write_is_atomic_on_a_bad_record(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trajectories(path, [make_record()])
    before = path.read_bytes()
    with pytest.raises(ValueError, match="record 1 .* field 'steps'"):
        write_trajectories(path, [make_record(id="x"), make_record(id="y", steps=[[0, 99]])])
    assert path.read_bytes() == before  # the old file survives whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]


BAD_RECORDS = {
    "missing field": (make_record(), "gold", r":1: field 'gold': missing"),
    "ill-typed correct": (make_record(correct="yes"), None, r":1: field 'correct': expected true or false"),
    "round 0": (make_record(source={"round": 0, "agent": 0}), None, r":1: field 'source'"),
    "bool agent": (make_record(source={"round": 1, "agent": True}), None, r":1: field 'source'"),
    "prompt not messages": (make_record(prompt="q"), None, r":1: field 'prompt'"),
    "span out of range": (make_record(steps=[[0, 9], [10, 40]]), None, r":1: field 'steps': step 1"),
    "overlapping spans": (make_record(steps=[[0, 9], [5, 12]]), None, r":1: field 'steps': step 1"),
    "span not a pair": (make_record(steps=[[0, 9, 1]]), None, r":1: field 'steps'"),
    "score count": (make_record(step_scores=[0.5]), None, r":1: field 'step_scores': 1 scores for 2"),
    "score range": (make_record(step_scores=[0.5, 1.5]), None, r":1: field 'step_scores'"),
    "answer type": (make_record(answer=9), None, r":1: field 'answer'"),
    "meta type": (make_record(meta=[1]), None, r":1: field 'meta'"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_read_errors_name_file_line_and_field(tmp_path, case):
    rec, drop, pattern = BAD_RECORDS[case]
    rec = dict(rec)
    if drop:
        del rec[drop]
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(rec)])
    with pytest.raises(TrajectoryFileError, match=re.escape(str(path)) + pattern):
        read_trajectories(path)


def test_read_errors_file_level(tmp_path):
    with pytest.raises(TrajectoryFileError, match="no such file"):
        read_trajectories(tmp_path / "missing.jsonl")
    empty = write_lines(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(TrajectoryFileError, match=re.escape(f"{empty}: empty file")):
        read_trajectories(empty)
    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps(make_record()), "", '{"id": "x",'])
    with pytest.raises(TrajectoryFileError, match=re.escape(f"{bad}:3: malformed JSON")) as e:
        read_trajectories(bad)
    assert e.value.line == 3 and isinstance(e.value, ValueError)
    dup = write_lines(tmp_path / "dup.jsonl", [json.dumps(make_record())] * 2)
    with pytest.raises(TrajectoryFileError, match=r":2: field 'id': 'p1/r1/a0' repeats line 1"):
        read_trajectories(dup)
    unscored = write_lines(tmp_path / "u.jsonl", [json.dumps(make_record())])
    with pytest.raises(TrajectoryFileError, match=r":1: field 'step_scores': null"):
        read_trajectories(unscored, require_step_scores=True)


def test_tokenizer_mismatch_is_refused(tmp_path, tiny_tok, bpe_tok):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps(make_record(tokenizer=tokenizer_fingerprint(tiny_tok)))])
    assert len(read_trajectories(path, tokenizer=tiny_tok)) == 1
    with pytest.raises(TrajectoryFileError, match=r":1: field 'tokenizer': made for tokenizer sha256:"):
        read_trajectories(path, tokenizer=bpe_tok)


# ---------------------------------------------------------------- selection rules


def turn(agent, text, answer="9", correct=None, finish="stop", gold="9"):
    return {"agent": agent, "text": text, "answer": answer,
            "correct": (answer == gold) if correct is None else correct, "finish_reason": finish}


def debate(pid, rounds, final="9", gold="9", error=None, **extra):
    from arkfast.tasks import ArithTask

    correct = error is None and ArithTask().grade(final, _problem(pid, gold))
    return {"id": pid, "question": f"Tom has 7 apples ({pid}). He buys 2 more. How many apples?", "gold": gold,
            "meta": {"solution": "7 + 2 = 9\nAnswer: 9"}, "task": "arith", "rounds": rounds,
            "final_answer": final, "correct": correct, "aggregator": None, "error": error, **extra}


def _problem(pid, gold):
    from arkfast.tasks import Problem

    return Problem(pid, "q", gold)


def sol(value, extra=""):
    return f"7 + 2 = {value}{extra}\nAnswer: {value}"


def build(records, tok, **cfg):
    from arkfast.trajectories.build import BuildConfig, build_sets

    return build_sets([(f"mem:{i + 1}", r) for i, r in enumerate(records)], tok, BuildConfig(**cfg))


def test_rsft_takes_a_final_round_consensus_holder(tiny_tok):
    right = debate("p-right", [[turn(0, sol(9)), turn(1, sol(8), "8"), turn(2, sol(9, " "))],
                               [turn(0, sol(8), "8"), turn(1, sol(9)), turn(2, sol(8), "8")]])
    wrong = debate("p-wrong", [[turn(0, sol(9)), turn(1, sol(8), "8")], [turn(0, sol(8), "8"), turn(1, sol(8), "8")]],
                   final="8")
    sets, counts = build([right, wrong], tiny_tok)
    # the only final-round agent holding the right consensus is agent 1 (round 1's right answers do not count)
    assert [r["id"] for r in sets["rsft"]] == ["p-right/r2/a1"]
    assert counts["committee_correct"] == 1 and counts["committee_wrong"] == 1
    # the committee got p-wrong wrong: no R-SFT record, but its one correct trajectory is in DA and PAD
    assert [r["id"] for r in sets["da"] if r["problem_id"] == "p-wrong"] == ["p-wrong/r1/a0"]
    # ... and its three identical wrong ones are one PAD record, a final-round copy
    pad = sorted((r for r in sets["pad"] if r["problem_id"] == "p-wrong"), key=lambda r: r["correct"])
    assert [(r["correct"], r["source"]["round"]) for r in pad] == [(False, 2), (True, 1)]
    # right but no holder: every final-round turn of the right answer was cut off at max_tokens
    cut = debate("p-cut", [[turn(0, sol(9))], [turn(0, sol(9), finish="length")]])
    sets, counts = build([cut], tiny_tok)
    assert sets["rsft"] == [] and counts["rsft_no_candidate"] == 1 and counts["skipped.truncated"] == 1


def test_rsft_tie_rule_is_a_seeded_agent_shuffle(tiny_tok):
    records = [debate(f"p{i}", [[turn(a, sol(9, " " * a)) for a in range(5)]] * 2) for i in range(40)]
    picks = {seed: [r["source"]["agent"] for r in build(records, tiny_tok, seed=seed)[0]["rsft"]] for seed in (0, 1)}
    assert picks[0] == [r["source"]["agent"] for r in build(records, tiny_tok, seed=0)[0]["rsft"]]  # deterministic
    assert len(set(picks[0])) >= 4  # not always the lowest-numbered agent
    assert picks[0] != picks[1]  # the seed decides
    assert all(r["source"]["round"] == 2 for r in build(records, tiny_tok)[0]["rsft"])


def test_da_and_pad_dedup_caps_and_preference(tiny_tok):
    r1 = [turn(a, sol(9, " +0" * a)) for a in range(3)] + [turn(3, sol(5), "5"), turn(4, sol(6), "6")]
    r2 = [turn(0, sol(9, " +0")), turn(1, sol(9, "  \n")), turn(2, sol(9, " +0" * 5)),
          turn(3, sol(9, " +0" * 6)), turn(4, sol(7), "7")]
    sets, counts = build([debate("p", [r1, r2])], tiny_tok, max_per_problem=3)
    da = sets["da"]
    # 7 correct candidates; normalised texts: r2 holds 4 distinct ones ("+0", "" (whitespace), "+0"x5, "+0"x6),
    # r1 repeats "" and "+0" and adds "+0 +0": kept are 3 from round 2 (final round first), none from round 1;
    # 2 repeats, and 5 distinct texts - 3 kept = 2 over the cap
    assert len(da) == 3 and all(r["source"]["round"] == 2 for r in da)
    assert counts["da.duplicate"] == 2 and counts["da.over_cap"] == 2
    assert len({" ".join(r["response"].split()) for r in da}) == 3
    pad = sets["pad"]
    assert sum(r["correct"] for r in pad) == 3 and sum(not r["correct"] for r in pad) == 3  # cap per class
    assert {r["answer"] for r in pad if not r["correct"]} == {"5", "6", "7"}
    assert counts["pad.duplicate"] == 2 and counts["pad.over_cap"] == 2  # the wrong 5, 6, 7 fit the cap
    # a whitespace-only difference is a duplicate; the final-round copy is the one kept
    dup = debate("d", [[turn(0, "7 + 2 = 9\nAnswer: 9")], [turn(0, "7 +  2 = 9 \n\nAnswer: 9")]])
    sets, counts = build([dup], tiny_tok)
    assert [r["id"] for r in sets["da"]] == ["d/r2/a0"] and counts["da.duplicate"] == 1


def test_skipped_candidates_are_counted_by_reason(tiny_tok):
    records = [
        debate("e", [[turn(0, sol(9)), turn(1, sol(9))]], error="engine: out of memory"),
        debate("s", [[turn(0, sol(9), finish="length"), turn(1, "7 + 2 =", answer=None),
                      turn(2, sol(9), finish="abort"), turn(3, sol(9))]],
               aggregator={"text": "Solution 4 is right. Answer: 9", "answer": "9"}),
    ]
    sets, counts = build(records, tiny_tok)
    assert {k: counts[f"skipped.{k}"] for k in ("error", "truncated", "no_answer", "unfinished", "aggregator")} \
        == {"error": 2, "truncated": 1, "no_answer": 1, "unfinished": 1, "aggregator": 1}
    assert counts["candidates"] == 7 and counts["usable"] == 1 and counts["problems_with_error"] == 1
    assert [r["id"] for r in sets["pad"]] == ["s/r1/a3"] and [r["id"] for r in sets["rsft"]] == ["s/r1/a3"]


def test_records_are_round_one_prompts_with_token_aligned_steps(tiny_tok, tmp_path):
    from arkfast.debate import first_round_text
    from arkfast.tasks import ArithTask, Problem

    rec = debate("p", [[turn(0, sol(9)), turn(1, sol(8), "8")], [turn(0, sol(9, "\n\n")), turn(1, sol(9, " "))]])
    sets, counts = build([rec], tiny_tok)
    prompt = [{"role": "user", "content": first_round_text(ArithTask(), Problem("p", rec["question"], "9"))}]
    fp = tokenizer_fingerprint(tiny_tok)
    for name, records in sets.items():
        write_trajectories(tmp_path / f"{name}.jsonl", records)
        for r in read_trajectories(tmp_path / f"{name}.jsonl", tokenizer=tiny_tok):
            assert r["prompt"] == prompt  # a round-2 answer is re-targeted to the single-agent prompt
            assert r["tokenizer"] == fp and r["step_scores"] is None and r["meta"] == rec["meta"]
            assert [r["response"][s:e] for s, e in r["steps"]] == [ln.strip() for ln in r["response"].split("\n")
                                                                     if ln.strip()]
            _, ranges = encode_response(tiny_tok, r["response"], r["steps"])
            assert all(t1 > t0 for t0, t1 in ranges)
    assert any(r["source"]["round"] == 2 for r in sets["da"])
    # accounting: every candidate is usable or skipped; every usable correct one is kept, a duplicate or over cap
    usable_correct = 3
    assert counts["candidates"] == counts["usable"] + sum(v for k, v in counts.items() if k.startswith("skipped."))
    assert len(sets["da"]) + counts["da.duplicate"] + counts["da.over_cap"] == usable_correct
    assert len(sets["pad"]) + counts["pad.duplicate"] + counts["pad.over_cap"] == counts["usable"]


def test_step_mode_flag_overrides_the_task_default(tiny_tok):
    text = "7 + 2 = 9\nso 9\n\nAnswer: 9"
    sets, _ = build([debate("p", [[turn(0, text)]])], tiny_tok, step_mode="paragraph")
    r = sets["rsft"][0]
    assert [r["response"][s:e] for s, e in r["steps"]] == ["7 + 2 = 9\nso 9", "Answer: 9"]


# ---------------------------------------------------------------- the CLI


def write_debates(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")
    return path


def test_cli_errors_name_file_line_and_field(tmp_path):
    from arkfast.trajectories.__main__ import main

    good = debate("p", [[turn(0, sol(9))]])
    with pytest.raises(ValueError, match="no such debates file"):
        main(["--debates", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o")])
    empty = write_debates(tmp_path / "empty.jsonl", [], tail="\n")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: empty file")):
        main(["--debates", str(empty)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good) + "\n\n{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{bad}:3: malformed record")):
        main(["--debates", str(bad)])
    broken = debate("q", [[turn(0, sol(9)), turn(1, sol(9))]])
    del broken["rounds"][0][1]["text"]
    path = tmp_path / "field.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(broken) + "\n")  # a blank line 2 still counts
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: field 'rounds[0][1].text': missing")):
        main(["--debates", str(path)])
    path = write_debates(tmp_path / "type.jsonl", [dict(good, correct="yes")])
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: field 'correct': expected true or false")):
        main(["--debates", str(path)])
    path = write_debates(tmp_path / "task.jsonl", [dict(good, task="chess")])
    with pytest.raises(ValueError, match=re.escape(f"{path}:1: field 'task': unknown task 'chess'")):
        main(["--debates", str(path)])
    a, b = write_debates(tmp_path / "a.jsonl", [good]), write_debates(tmp_path / "b.jsonl", [good])
    with pytest.raises(ValueError, match=re.escape(f"{b}:1: field 'id': problem 'p' was already read at {a}:1")):
        main(["--debates", str(a), str(b)])
    with pytest.raises(SystemExit):
        main(["--debates", str(a), "--steps", "regex:("])
    with pytest.raises(SystemExit):
        main(["--debates", str(a), "--max-per-problem", "0"])


def test_cli_reports_an_incomplete_last_line(tmp_path, capsys):
    from arkfast.trajectories.__main__ import main

    path = write_debates(tmp_path / "d.jsonl", [debate("p", [[turn(0, sol(9))]])], tail='{"id": "cut')
    stats = main(["--debates", str(path), "--output", str(tmp_path / "o")])
    assert stats["incomplete_lines"] == 1 and stats["problems"]["total"] == 1
    assert "incomplete last lines" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "arkfast.trajectories", "--debates", str(tmp_path / "x.jsonl")],
                          check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'x.jsonl'}: no such debates file"]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Four real debates of the tiny model on the arith train split (5 agents x 2 rounds)."""
    from arkfast import generate

    out = tmp_path_factory.mktemp("debates")
    generate.main(["--split", "train", "--limit", "4", "--output", str(out)])
    return out


def test_cli_end_to_end_on_generated_debates(generated, tiny_tok, tmp_path, monkeypatch):
    from arkfast.generate import read_records
    from arkfast.trajectories.__main__ import main

    debates = read_records(generated / "debates.jsonl")
    stats = main(["--debates", str(generated / "debates.jsonl")])
    out = generated / "trajectories"  # default: beside the debates file
    assert json.loads((out / "stats.json").read_text()) == json.loads(json.dumps(stats))
    turns = [(r, t) for d in debates for r, ts in enumerate(d["rounds"]) for t in ts]
    assert stats["candidates"]["total"] == len(turns) == 4 * 5 * 2
    assert stats["problems"]["committee_correct"] == sum(d["correct"] for d in debates)
    usable = [t for _, t in turns if t["finish_reason"] == "stop" and t["answer"] is not None]
    assert stats["candidates"]["usable"] == len(usable)
    sets = {name: read_trajectories(out / f"{name}.jsonl", tokenizer=tiny_tok) if stats["sets"][name]["records"]
            else [] for name in ("rsft", "da", "pad")}
    assert len(sets["rsft"]) == stats["problems"]["committee_correct"] - stats["problems"]["rsft_no_candidate"]
    by_id = {d["id"]: d for d in debates}
    for r in sets["rsft"]:
        d = by_id[r["problem_id"]]
        t = d["rounds"][r["source"]["round"] - 1][r["source"]["agent"]]
        assert r["source"]["round"] == len(d["rounds"]) and t["correct"] and t["text"] == r["response"]
    n_correct = sum(t["correct"] for t in usable)
    assert stats["sets"]["da"]["records"] + stats["sets"]["da"]["duplicate"] + stats["sets"]["da"]["over_cap"] \
        == n_correct
    assert stats["sets"]["pad"]["records"] + stats["sets"]["pad"]["duplicate"] + stats["sets"]["pad"]["over_cap"] \
        == len(usable)
    for r in sets["pad"]:  # every step's text is one line of the response
        assert all("\n" not in r["response"][s:e] for s, e in r["steps"])
    # deterministic: a rebuild writes the same bytes; a cap of 1 keeps one DA record per problem
    before = {name: (out / f"{name}.jsonl").read_bytes() for name in ("rsft", "da", "pad")}
    main(["--debates", str(generated / "debates.jsonl")])
    assert before == {name: (out / f"{name}.jsonl").read_bytes() for name in ("rsft", "da", "pad")}
    capped = main(["--debates", str(generated / "debates.jsonl"), "--output", str(tmp_path / "c"),
                   "--max-per-problem", "1"])
    assert capped["sets"]["da"]["records"] == capped["sets"]["da"]["problems"] <= 4
    # with no arguments: the default debates (here already finished) and runs/arith-train/trajectories
    monkeypatch.chdir(tmp_path)
    default = tmp_path / "runs" / "arith-train" / "debates"
    default.mkdir(parents=True)
    for name in ("debates.jsonl", "summary.json"):
        (default / name).write_bytes((generated / name).read_bytes())
    assert main([])["sets"] == stats["sets"]
    assert (tmp_path / "runs" / "arith-train" / "trajectories" / "rsft.jsonl").read_bytes() == before["rsft"]

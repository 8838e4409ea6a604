"""arkfast.tasks: answer extraction and grading, dataset loading and its errors, the arith generator."""
from __future__ import annotations

import json
import random
import re

import pytest

from arkfast.tasks import (
    ArithConfig,
    ArithTask,
    ChoiceTask,
    GenericTask,
    GSM8KTask,
    MathTask,
    Problem,
    answers_match,
    arith_problems,
    arith_split_of,
    canonical_letter,
    canonical_math,
    canonical_number,
    extract_boxed,
    extract_final,
    extract_letter,
    load_problems,
    parse_number,
)

# ------------------------------------------------------------------------------------------------
# extraction
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("first \\boxed{1} then \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
    ("nested \\boxed{\\sqrt{x^{2}+1}} end", "\\sqrt{x^{2}+1}"),
    ("\\fbox{7}", "7"),
    ("\\boxed 5 is it", "5"),
    ("cut off \\boxed{\\frac{1}{", None),
    ("no box here", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("He pays 3 * 4 = 12 dollars.\n#### 12", "12"),
    ("#### 1,234", "1,234"),
    ("The answer is 42.", "42"),
    ("so the final answer is: $-3.5$.", "-3.5"),
    ("The answer is 42 apples.", "42"),
    ("**Answer:** 17", "17"),
    ("7 + 5 = 12\n12 - 3 = 9\nAnswer: 9", "9"),
    ("Answer: 3\nWait. Answer: 4", "4"),
    ("I get 12 and then 15 cookies", "15"),
    ("it costs $1,250.50 in total", "$1,250.50"),
    ("half is 3/4 of it", "3/4"),
    ("x2 and 12-3", "3"),
    ("the result is \\boxed{8}, not 9", "8"),
    ("nothing numeric", None),
])
def test_extract_final_numeric(text, expected):
    assert extract_final(text, numeric=True) == expected


def test_extract_final_text_falls_back_to_last_line():
    assert extract_final("Let me think.\nParis", numeric=False) == "Paris"
    assert extract_final("The answer is Paris, France.", numeric=False) == "Paris, France"
    assert extract_final("", numeric=False) is None


@pytest.mark.parametrize("raw, value", [
    ("42", "42"), ("-7", "-7"), ("+7", "7"), ("1,234", "1234"), ("1,234,567.0", "1234567"),
    ("$5", "5"), ("5%", "5"), ("\\$5", "5"), ("5.0", "5"), ("5.", "5"), ("0.75", "3/4"), ("3/4", "3/4"),
    (".5", "1/2"), ("\\frac{3}{4}", "3/4"), ("\\dfrac{6}{8}", "3/4"), ("-\\frac12", "-1/2"),
    ("\u22123", "-3"), (" 12 ", "12"), ("1,5", None), ("12,34", None), ("abc", None), ("1/0", None),
    ("x+1", None),
])
def test_canonical_number(raw, value):
    assert canonical_number(raw) == value


def test_numeric_equivalences():
    assert answers_match("0.75", "3/4") and answers_match("1,000", "1000") and answers_match("$12.00", "12")
    assert answers_match("-5", "\u22125") and answers_match("50%", "50")
    assert not answers_match("0.76", "3/4") and not answers_match("-5", "5") and not answers_match(None, "5")
    assert parse_number("2/4") == parse_number("0.5")


def test_exact_match_fallback():
    assert answers_match("  New   York. ", "new york")
    assert answers_match("\\text{Paris}", "paris")
    assert not answers_match("New Jersey", "New York")
    assert canonical_math("\\left( 1, \\dfrac{1}{2} \\right)") == canonical_math("(1,\\frac{1}{2})")
    assert canonical_math("x^{2} + 1") == canonical_math("x^2+1")
    assert canonical_math("\\frac{1}{2}") == canonical_math("0.5")


@pytest.mark.parametrize("text, expected", [
    ("The answer is (C).", "C"),
    ("The answer is C", "C"),
    ("answer: b", "B"),
    ("**Answer:** D", "D"),
    ("The answer is a bit unclear, so option C", "C"),
    ("(A) is wrong and (D) is right", "D"),
    ("I reason...\nB.", "B"),
    ("\\boxed{E}", "E"),
    ("A cat sat. No choice here", None),
])
def test_extract_letter(text, expected):
    assert extract_letter(text) == expected


def test_canonical_letter():
    assert [canonical_letter(s) for s in ("b", "(B)", "B.", "the answer is B", "Z")] == ["B"] * 4 + [None]


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------

GSM8K_ROWS = [
    {"question": "Ann has 3 pens and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "A shop sells 1,200 cups a day for 2 days. How many?", "answer": "1200*2=2400\n#### 2,400"},
]
MATH_ROWS = [
    {"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "solution": "It is $\\boxed{\\frac{3}{4}}$.",
     "level": "Level 1", "type": "Algebra"},
    {"problem": "Simplify $x \\cdot x$.", "solution": "We get $\\boxed{x^{2}}$."},
]
MC_ROWS = [
    {"question": "2 + 2 = ?", "options": ["3", "4", "5", "22"], "answer": "B"},
    {"question": "Capital of France?", "options": ["Rome", "Paris", "Oslo", "Bern"], "answer": 1},
]
MC_LETTER_FIELDS = [{"question": "Pick the even one", "A": "3", "B": "5", "C": "8", "D": "9", "answer": "C"}]
GENERIC_ROWS = [{"prompt": "Capital of Italy?", "target": "Rome"}, {"prompt": "6 * 7?", "target": "42"}]


def _write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_load_gsm8k_shape(tmp_path, kind):
    path = _write(tmp_path / f"gsm.{kind}", GSM8K_ROWS, kind)
    task, problems = load_problems(str(path))
    assert isinstance(task, GSM8KTask)
    assert [p.gold for p in problems] == ["7", "2400"]
    assert [p.id for p in problems] == ["gsm-0", "gsm-1"]
    assert problems[0].meta["solution"] == "3 + 4 = 7"
    assert task.score("3 + 4 = 7, so the answer is 7.", problems[0]) == ("7", True)
    assert task.score("#### 2,400", problems[1]) == ("2,400", True)
    assert task.score("The answer is 2401", problems[1]) == ("2401", False)


def test_load_math_shape(tmp_path):
    task, problems = load_problems(str(_write(tmp_path / "math.jsonl", MATH_ROWS, "jsonl")))
    assert isinstance(task, MathTask)
    assert [p.gold for p in problems] == ["\\frac{3}{4}", "x^{2}"]
    assert problems[0].meta["level"] == "Level 1"
    assert task.score("so \\boxed{0.75}", problems[0])[1]
    assert task.score("so \\boxed{x^2}", problems[1])[1]
    assert not task.score("so \\boxed{2x}", problems[1])[1]


def test_load_choice_shapes(tmp_path):
    task, problems = load_problems(str(_write(tmp_path / "mc.json", MC_ROWS, "json")))
    assert isinstance(task, ChoiceTask)
    assert [p.gold for p in problems] == ["B", "B"]
    assert task.question_text(problems[1]) == "Capital of France?\nA. Rome\nB. Paris\nC. Oslo\nD. Bern"
    assert task.score("The answer is (B).", problems[0]) == ("B", True)
    assert task.score("The answer is Paris.", problems[1]) == ("B", True)  # option text, no letter
    assert task.score("answer: a", problems[1]) == ("A", False)
    task, problems = load_problems(str(_write(tmp_path / "mc2.parquet", MC_LETTER_FIELDS, "parquet")))
    assert isinstance(task, ChoiceTask) and problems[0].choices == ("3", "5", "8", "9")
    assert problems[0].gold == "C"


def test_load_generic_fields(tmp_path):
    path = _write(tmp_path / "qa.jsonl", GENERIC_ROWS, "jsonl")
    task, problems = load_problems(str(path))  # guessed: prompt / target
    assert isinstance(task, GenericTask) and [p.gold for p in problems] == ["Rome", "42"]
    assert task.score("Hmm.\nThe answer is rome.", problems[0])[1]
    assert task.score("6 * 7 = 42", problems[1]) == ("42", True)
    task, problems = load_problems(str(path), question_field="target", answer_field="prompt", limit=1)
    assert len(problems) == 1 and problems[0].question == "Rome"


def test_ids_from_an_id_field_and_limit_keeps_them(tmp_path):
    rows = [dict(r, id=f"q{i}") for i, r in enumerate(GSM8K_ROWS)]
    _, problems = load_problems(str(_write(tmp_path / "g.jsonl", rows, "jsonl")), limit=1)
    assert [p.id for p in problems] == ["q0"]


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "data.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        load_problems(str(path))


def test_empty_file_and_path_like_names_fail_at_once(tmp_path, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=re.escape(f"{empty}: the file is empty")):
        load_problems(str(empty))
    from arkfast.tasks import loading

    def no_hub(name, split):
        raise AssertionError(f"{name!r} was looked up on the hub")
    monkeypatch.setattr(loading, "_load_hub", no_hub)
    # Names that can only be paths (a data-file suffix, or more than owner/name) are never hub names.
    for name in ("data/typo.txt", "data/x.csv", "runs/a/b", "data/gsm8k.jsonl.gz"):
        with pytest.raises(FileNotFoundError, match=re.escape(name)):
            load_problems(name)


def test_malformed_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps(r) for r in GSM8K_ROWS] + ["", '{"question": "x", "answer": ', json.dumps(GSM8K_ROWS[0])]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:4: malformed JSON line")):
        load_problems(str(path))
    path.write_text(json.dumps(GSM8K_ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: expected a JSON object")):
        load_problems(str(path))


def test_malformed_json_array_names_the_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[\n{"question": "a", "answer": "#### 1"},\n{"question": "b" "answer": 2}\n]')
    with pytest.raises(ValueError, match=re.escape(f"{path}:3: malformed JSON")):
        load_problems(str(path))


def test_missing_field_names_it_and_the_fields_present(tmp_path):
    path = _write(tmp_path / "q.jsonl", [{"question": "a?", "response": "1"}], "jsonl")
    with pytest.raises(ValueError, match=r"needs a field 'answer'.*\['question', 'response'\]"):
        load_problems(str(path), task="gsm8k")
    with pytest.raises(ValueError, match=r"needs a field 'gold'.*\['question', 'response'\]"):
        load_problems(str(path), question_field="question", answer_field="gold")
    with pytest.raises(ValueError, match=r"cannot tell the task.*\['question', 'response'\]"):
        load_problems(str(path))


def test_gsm8k_answer_without_marker_is_an_error(tmp_path):
    path = _write(tmp_path / "g.jsonl", [{"question": "a?", "answer": "#### 3"}, {"question": "b?", "answer": "3"}],
                  "jsonl")
    with pytest.raises(ValueError, match="problem g-1: GSM8K answer field 'answer' has no '#### <number>'"):
        load_problems(str(path))


def test_unknown_task_and_bad_suffix(tmp_path):
    path = _write(tmp_path / "g.jsonl", GSM8K_ROWS, "jsonl")
    with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
        load_problems(str(path), task="gsm9k")
    bad = tmp_path / "g.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported suffix '\.csv'"):
        load_problems(f"./{bad}" if not str(bad).startswith("/") else str(bad))


# ------------------------------------------------------------------------------------------------
# arith
# ------------------------------------------------------------------------------------------------


def test_arith_is_deterministic_and_prefix_stable():
    a = arith_problems("test", 40)
    assert a == arith_problems("test", 40)
    assert arith_problems("test", 15) == a[:15]  # asking for more extends, never reshuffles
    assert arith_problems("test", 20, ArithConfig(seed=1)) != a[:20]
    assert len({p.question for p in a}) == len(a)
    assert [p.id for p in a[:2]] == ["arith-test-0", "arith-test-1"]


def test_arith_splits_are_disjoint():
    cfg = ArithConfig()
    test, train = arith_problems("test", 300, cfg), arith_problems("train", 1500, cfg)
    assert not {p.question for p in test} & {p.question for p in train}
    assert all(arith_split_of(p.question, cfg.test_fraction) == "test" for p in test)
    assert all(arith_split_of(p.question, cfg.test_fraction) == "train" for p in train)


@pytest.mark.parametrize("cfg", [ArithConfig(), ArithConfig(min_steps=2, max_steps=4, ops=("+", "-", "*", "/"),
                                                            max_operand=9, max_factor=3, max_value=30, seed=7)])
def test_arith_reference_solutions_are_right_and_graded(cfg):
    task = ArithTask(cfg)
    rng = random.Random(0)
    for p in arith_problems("test", 60, cfg):
        lines = p.meta["solution"].split("\n")
        assert lines[-1] == f"Answer: {p.gold}"
        assert cfg.min_steps <= len(lines) - 1 == p.meta["steps"] <= cfg.max_steps
        value = None
        for line in lines[:-1]:  # every step is "a op b = c", chained, in range, exact
            a, op, b, eq, c = line.split()
            assert eq == "=" and op in cfg.ops and (value is None or int(a) == value)
            assert 0 <= int(c) <= cfg.max_value
            assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
                              "/": int(a) // int(b)}[op] and (op != "/" or int(a) % int(b) == 0)
            value = int(c)
        assert value == int(p.gold)
        assert task.score(p.meta["solution"], p) == (p.gold, True)
        wrong = int(p.gold) + rng.choice([-2, -1, 1, 2, 10])
        perturbed = p.meta["solution"].rsplit("\n", 1)[0] + f"\nAnswer: {wrong}"
        assert task.score(perturbed, p) == (str(wrong), False)
        assert task.score(p.meta["solution"].rsplit("\n", 1)[0], p)[1]  # no answer line: the last number


def test_arith_is_small():
    """Short texts, so a tiny model on a CPU can learn and debate them: a sentence and a line per step."""
    for p in arith_problems("train", 200):
        steps = p.meta["steps"]
        assert len(p.question) < 40 * (steps + 1) and len(p.meta["solution"]) < 18 * steps + 12


def test_arith_config_validation_and_loading():
    with pytest.raises(ValueError, match="min_steps"):
        ArithConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="ops must be"):
        ArithConfig(ops=("^",))
    task, problems = load_problems(None, limit=5)
    assert isinstance(task, ArithTask) and [p.id for p in problems] == [f"arith-test-{i}" for i in range(5)]
    _, train = load_problems("arith", split="train", limit=3)
    assert train[0].id == "arith-train-0"
    with pytest.raises(ValueError, match="arith split"):
        load_problems("arith", split="validation")


def test_problem_validation():
    with pytest.raises(ValueError, match="id"):
        Problem("", "q", "1")
    with pytest.raises(TypeError, match="gold must be a string"):
        Problem("a", "q", 1)

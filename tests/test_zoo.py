"""The embedded tiny model: its tokenizer, its training mix, the train script, and the shipped
checkpoint (loads in arkfast and in transformers with the same logits)."""
from __future__ import annotations

import json
import random

import pytest
import torch

from arkfast.debate import PromptBuilder
from arkfast.models import VarlenContext, load_model
from arkfast.tasks import ArithTask, arith_problems
from arkfast.zoo import tiny_model_path
from arkfast.zoo.data import (
    Mix,
    build_examples,
    parse_steps,
    peer_solutions,
    swap_operands,
    tokenizer_corpus,
    wrong_solution,
)
from arkfast.zoo.tokenizer import SPECIAL_TOKENS, build_tokenizer, load_tokenizer
from kernel_testing import assert_close, hf_float64_rtol

TINY = tiny_model_path()
shipped = pytest.mark.skipif(not (TINY / "config.json").is_file(), reason="no shipped checkpoint")


@pytest.fixture(scope="module")
def problems():
    return arith_problems("train", 60)


@pytest.fixture(scope="module")
def tokenizer(problems):
    """A freshly built tokenizer (small corpus) — the code path train_tiny uses."""
    return build_tokenizer(tokenizer_corpus(problems, seed=0), vocab_size=160)


def _tokenizers(tokenizer):
    yield tokenizer
    if (TINY / "tokenizer.json").is_file():
        yield load_tokenizer(TINY)


def test_digits_are_single_tokens_and_text_round_trips(tokenizer, problems):
    task = ArithTask()
    for tok in _tokenizers(tokenizer):
        for number in ("0", "7", "12", "305", "1000000", "4096"):
            ids = tok.encode(f"Answer: {number}", add_special_tokens=False)
            pieces = tok.convert_ids_to_tokens(ids)
            assert pieces[-len(number):] == list(number), pieces  # one token per digit
        builder = PromptBuilder(tok, task)
        rng = random.Random(0)
        for p in problems[:20]:
            for text in (p.question, p.meta["solution"], "\n\n".join(peer_solutions(p, rng, 5))):
                assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
            ids = builder.shared_round(p, peer_solutions(p, rng, 5))[2]
            assert tok.unk_token_id not in ids
        odd = "Odd ASCII: {x} [y] ~z~ `q` #1 @2 $3 %4 ^5 &6 |7 \\8 ;9"
        assert tok.decode(tok.encode(odd, add_special_tokens=False)) == odd


def test_chat_template_and_special_tokens(tokenizer):
    for tok in _tokenizers(tokenizer):
        text = tok.apply_chat_template([{"role": "user", "content": "Tom has 3 pens."}], tokenize=False,
                                       add_generation_prompt=True)
        assert text == "<|im_start|>user\nTom has 3 pens.<|im_end|>\n<|im_start|>assistant\n"
        assert tok.eos_token == "<|im_end|>" and tok.pad_token == tok.bos_token == "<|endoftext|>"
        assert tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == [0, 1, 2, 3]
        ids = tok.encode(text, add_special_tokens=False)
        assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.eos_token_id in ids
        assert tok.decode(ids) == text


def test_build_tokenizer_rejects_small_vocab(problems):
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        build_tokenizer(["a"], vocab_size=50)


def test_wrong_solutions_are_wrong_and_well_formed(problems):
    rng = random.Random(1)
    task = ArithTask()
    for p in problems:
        steps = parse_steps(p.meta["solution"])
        assert steps and steps[0][0] == int(p.meta["solution"].split()[0])
        for _ in range(5):
            wrong = wrong_solution(p, rng)
            assert wrong.splitlines()[-1].startswith("Answer: ")
            parse_steps(wrong)  # every step line is "a op b = c"
            assert not task.grade(task.extract(wrong, p), p), (p.meta["solution"], wrong)
    peers = peer_solutions(problems[0], rng, 5)
    assert len(peers) == 5


def test_examples_use_the_debate_prompts(tokenizer, problems):
    task = ArithTask()
    builder = PromptBuilder(tokenizer, task)
    only_round1 = build_examples(tokenizer, problems[:5], seed=0, mix=Mix(round1=1, shared=0, classic=0, aggregator=0, swap=0), task=task)
    for ex, p in zip(only_round1, problems):
        assert list(ex.prompt) == builder.first_round(p)
        assert tokenizer.decode(list(ex.completion)) == p.meta["solution"] + "<|im_end|>"
    shared = build_examples(tokenizer, problems[:5], seed=0, mix=Mix(round1=0, shared=1, classic=0, aggregator=0, swap=0), task=task)
    for ex, p in zip(shared, problems):
        text = tokenizer.decode(list(ex.prompt))
        assert text.startswith(tokenizer.decode(builder.first_round(p))[:-len("<|im_end|>\n<|im_start|>assistant\n")])
        assert text.count("\nAgent ") == 5 and text.endswith("<|im_start|>assistant\n")
    mixed = build_examples(tokenizer, problems, seed=0, task=task)
    again = build_examples(tokenizer, problems, seed=0, task=task)
    assert [e.prompt for e in mixed] == [e.prompt for e in again]  # seeded
    assert [e.completion for e in mixed] == [e.completion for e in again]
    for ex, p in zip(mixed, problems):  # default mix: operands sometimes swapped, the solution still right
        text = tokenizer.decode(list(ex.completion))
        assert text.endswith("<|im_end|>") and task.grade(task.extract(text, p), p)



def test_drills_train_only_the_results(tokenizer, problems):
    mix = Mix(round1=0, shared=0, classic=0, aggregator=0, drill=1, drill_lines=7)
    examples = build_examples(tokenizer, problems, seed=3, mix=mix)
    facts = {step for p in problems for step in parse_steps(p.meta["solution"])}
    for ex in examples[:10]:
        text = tokenizer.decode(list(ex.completion))
        assert text.endswith("<|im_end|>")
        lines = text[:-len("<|im_end|>")].split("\n")
        assert len(lines) == 7
        targets = "".join(tokenizer.decode([t]) for t, on in zip(ex.completion, ex.trained) if on)
        expected = ""
        for line in lines:
            a, op, b, eq, c = line.split(" ")
            assert (int(a), op, int(b)) in facts and eq == "="  # lines of the problems' own solutions
            assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            expected += c + "\n"
        assert targets == expected[:-1] + "<|im_end|>"
        assert "Work out each line." in tokenizer.decode(list(ex.prompt))


def test_swap_operands_keeps_solutions_right(problems):
    rng = random.Random(5)
    task = ArithTask()
    swapped_any = False
    for p in problems:
        text = swap_operands(p.meta["solution"], rng, 0.5)
        assert task.grade(task.extract(text, p), p) and text.splitlines()[-1] == p.meta["solution"].splitlines()[-1]
        for mine, ref in zip(text.splitlines()[:-1], p.meta["solution"].splitlines()[:-1]):
            a, op, b, _, c = mine.split(" ")
            ra, rop, rb, _, rc = ref.split(" ")
            assert (op, c) == (rop, rc)
            assert (a, b) == (ra, rb) or (op in "+*" and (a, b) == (rb, ra))
            swapped_any |= (a, b) != (ra, rb)
        assert swap_operands(p.meta["solution"], rng, 0.0) == p.meta["solution"]
    assert swapped_any


def test_peer_accuracy_bounds_the_share_of_right_peers(problems):
    rng = random.Random(2)
    right = [sum(s == p.meta["solution"] for s in peer_solutions(p, rng, 5, (1.0, 1.0))) for p in problems]
    assert right == [5] * len(problems)
    wrong = [sum(s == p.meta["solution"] for s in peer_solutions(p, rng, 5, (0.0, 0.0))) for p in problems]
    assert wrong == [0] * len(problems)
    with pytest.raises(ValueError, match="peer_accuracy"):
        Mix(peer_accuracy=(0.6, 0.4))
    with pytest.raises(ValueError, match="swap"):
        Mix(swap=1.5)

def test_train_tiny_smoke(tmp_path):
    from arkfast.zoo.train_tiny import main

    out = tmp_path / "tiny"
    args = ["--steps", "3", "--train-problems", "40", "--eval-problems", "8", "--hidden-size", "64",
            "--heads", "2", "--kv-heads", "1", "--intermediate-size", "96", "--layers", "1",
            "--vocab-size", "160", "--row-tokens", "1024", "--threads", "1", "--swap", "0.5"]
    report = main(["--output", str(out), *args])  # 2 curriculum steps of round-1 rows, 1 of the mix
    assert report["steps"] == 3 and report["final_eval_loss"] < 6.0
    again = main(["--output", str(tmp_path / "again"), *args])
    assert again["final_eval_loss"] == report["final_eval_loss"]  # reproducible from the seed
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    model = load_model(out)
    assert model.config.hidden_size == 64 and model.config.head_dim == 32
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())


@shipped
def test_shipped_checkpoint_files():
    files = {p.name: p.stat().st_size for p in TINY.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert name in files, name
    assert files["model.safetensors"] <= 20 * 2 ** 20
    cfg = json.loads((TINY / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] // cfg["num_attention_heads"] >= 32  # the GPU attention kernels take it


@shipped
def test_shipped_tokenizer_is_what_train_tiny_builds():
    """The first step of ``python -m arkfast.zoo.train_tiny`` with its defaults rebuilds the shipped
    vocabulary and merges exactly (the rest of the run is covered by the reproducibility smoke test)."""
    from arkfast.zoo.train_tiny import build_parser, make_tokenizer, training_problems

    args = build_parser().parse_args([])
    task, train_problems, _ = training_problems(args)
    built = json.loads(make_tokenizer(args, task, train_problems).backend_tokenizer.to_str())
    assert built == json.loads((TINY / "tokenizer.json").read_text())


@shipped
@pytest.mark.numerics
def test_shipped_checkpoint_matches_transformers():
    from transformers import AutoModelForCausalLM

    """The shipped weights give transformers' logits; both in float64, within the bound on
    transformers' own float32 steps (kernel_testing.hf_float64_rtol)."""
    tok = load_tokenizer(TINY)
    ours = load_model(TINY, dtype=torch.float32).double().eval()
    theirs = AutoModelForCausalLM.from_pretrained(str(TINY), dtype=torch.float64).eval()
    task = ArithTask()
    builder = PromptBuilder(tok, task)
    problems = arith_problems("test", 3)
    prompts = [builder.first_round(problems[0]), builder.first_round(problems[1]) + [5, 6],
               builder.shared_round(problems[2], [p.meta["solution"] for p in problems] * 2)[4]]
    with torch.no_grad():
        ctx, positions = VarlenContext.from_lengths([len(p) for p in prompts])
        hidden = ours(torch.tensor([t for p in prompts for t in p]), positions, ctx)
        logits = ours.compute_logits(hidden).split([len(p) for p in prompts])
        cfg = theirs.config
        rtol = hf_float64_rtol(cfg.num_hidden_layers, cfg.hidden_size, max(map(len, prompts)))
        for ids, mine in zip(prompts, logits):
            ref = theirs(torch.tensor([ids])).logits[0]
            scale = ref.abs().max().item()
            assert_close(mine, ref, torch.float64, atol=rtol * scale, rtol=0.0, name="tiny model logits")


@shipped
def test_default_pipeline_smoke(tmp_path, capsys):
    """``python -m arkfast.generate`` with no model or dataset flag: the shipped model debating the
    arith test split (a handful of problems here; the full default run's figures are in the README)."""
    from arkfast.generate import main

    summary = main(["--limit", "4", "--output", str(tmp_path / "run")])
    assert summary["model"] == str(TINY) and summary["task"] == "arith" and summary["problems"] == 4
    cfg = summary["config"]
    assert (cfg["agents"], cfg["rounds"], cfg["layout"], cfg["temperature"]) == (5, 2, "shared", 0.5)
    records = [json.loads(line) for line in (tmp_path / "run" / "debates.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["error"] is None for r in records)
    for r in records:
        assert [len(turns) for turns in r["rounds"]] == [5, 5]
        assert all(t["finish_reason"] == "stop" for turns in r["rounds"] for t in turns)
    # the model answers in the task's format: every completion ends in an extractable answer line
    assert all(t["answer"] is not None for r in records for turns in r["rounds"] for t in turns)
    assert "single agent" in capsys.readouterr().out

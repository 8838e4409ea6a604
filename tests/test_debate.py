"""arkfast.debate: prompts (shared-prefix layout), majority vote, the scheduling driver, the summary.

The driver runs against :class:`FakeLLM`, a deterministic double of ``arkfast.LLM``'s incremental API
(``add_request`` / ``step`` / ``abort_request`` / ``has_unfinished_requests`` / ``tokenizer``) whose
requests take a chosen number of steps and whose answers come from a test-supplied function.
"""
from __future__ import annotations

import types

import pytest

from arkfast.debate import (
    DebateConfig,
    PromptBuilder,
    default_active_problems,
    format_summary,
    majority_vote,
    render_chat,
    request_seed,
    run_debates,
    summarize,
)
from arkfast.debate.prompts import shared_transcript
from arkfast.tasks import ArithTask, GSM8KTask, Problem, arith_problems
from model_fixtures import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))))


class FakeLLM:
    """``respond(prompt_text, params) -> completion text``; ``steps(prompt_text) -> int`` step() calls
    until the request finishes. Prompts longer than ``max_len`` tokens raise ``ValueError`` like the
    engine. The prefix cache is simulated over 16-token blocks: a full block counts as cached when the
    same token prefix ending at it was submitted before."""

    def __init__(self, tokenizer, respond, steps=lambda text: 1, max_len=100_000):
        self.tokenizer, self.respond, self.steps, self.max_len = tokenizer, respond, steps, max_len
        self.running: dict[str, list] = {}
        self.seen_prefixes: set[tuple[int, ...]] = set()
        self.step_no = 0
        self.log: list[tuple[int, str, str]] = []  # (step number, "add" | "finish" | "abort", request id)

    def add_request(self, prompt, params, request_id=None):
        if len(prompt) > self.max_len:
            raise ValueError(f"prompt has {len(prompt)} tokens, over the context window of {self.max_len}")
        cached = 0
        while cached + 16 <= len(prompt) and tuple(prompt[:cached + 16]) in self.seen_prefixes:
            cached += 16
        self.seen_prefixes.update(tuple(prompt[:end]) for end in range(16, len(prompt) + 1, 16))
        text = self.tokenizer.decode(prompt)
        completion = self.respond(text, params)
        ids = self.tokenizer.encode(completion, add_special_tokens=False)
        out = types.SimpleNamespace(
            request_id=request_id, prompt_token_ids=list(prompt), num_cached_tokens=cached,
            outputs=[types.SimpleNamespace(text=completion, token_ids=ids, finish_reason="stop")])
        self.running[request_id] = [self.steps(text), out]
        self.log.append((self.step_no, "add", request_id))
        return request_id

    def step(self):
        self.step_no += 1
        finished = []
        for rid, entry in list(self.running.items()):
            entry[0] -= 1
            if entry[0] <= 0:
                finished.append(entry[1])
                del self.running[rid]
                self.log.append((self.step_no, "finish", rid))
        return finished

    def has_unfinished_requests(self):
        return bool(self.running)

    def abort_request(self, request_id):
        self.running.pop(request_id, None)
        self.log.append((self.step_no, "abort", request_id))


def _problem_of(text, problems):
    return next(p for p in problems if p.question in text)


def arith_agent(problems):
    """Round 1: agents whose seed is odd answer gold + 1; later rounds and the aggregator: the gold."""
    def respond(text, params):
        p = _problem_of(text, problems)
        revising = "Solutions from the previous round" in text or "other agents" in text or "Final solutions" in text
        wrong = params.seed % 2 == 1 and not revising
        return f"{p.meta['solution'].rsplit(chr(10), 1)[0]}\nAnswer: {int(p.gold) + wrong}"
    return respond


# ------------------------------------------------------------------------------------------------
# prompts
# ------------------------------------------------------------------------------------------------


def test_shared_layout_prompts_share_the_transcript_as_a_token_prefix(tokenizer):
    task = ArithTask()
    problem = arith_problems("test", 1)[0]
    answers = [f"{problem.meta['solution']}\nagent {k} says so" for k in range(5)]
    prompts = PromptBuilder(tokenizer, task).shared_round(problem, answers)
    assert len(prompts) == 5 and len({tuple(p) for p in prompts}) == 5
    prefix = 0
    while all(len(p) > prefix for p in prompts) and len({p[prefix] for p in prompts}) == 1:
        prefix += 1
    transcript = shared_transcript(task, problem, answers)
    for agent, ids in enumerate(prompts):
        text = tokenizer.decode(ids)  # the ids are exactly the chat template's rendering
        suffix = f"You are Agent {agent + 1}: the solution of Agent {agent + 1} above is your own."
        assert text == render_chat(tokenizer, [{"role": "user", "content": transcript + suffix}])
        assert text.endswith(suffix + "<|im_end|>\n<|im_start|>assistant\n")
    common = tokenizer.decode(prompts[0][:prefix])
    # The common prefix holds the whole transcript: the question, every answer and the update request.
    assert common.startswith("<|im_start|>user\n" + problem.question)
    assert common.endswith(transcript) or transcript in common + "\n"
    assert all(a in common for a in answers)
    head = tokenizer.encode("<|im_start|>user\n" + transcript, add_special_tokens=False)
    assert prompts[0][:len(head)] == head and prefix >= len(head)
    for agent, ids in enumerate(prompts):  # only the agent's own line and the template's end follow
        tail = f"You are Agent {agent + 1}: the solution of Agent {agent + 1} above is your own." \
            "<|im_end|>\n<|im_start|>assistant\n"
        assert len(ids) - prefix <= len(tokenizer.encode(tail, add_special_tokens=False))


def test_first_round_and_classic_prompts(tokenizer):
    task = GSM8KTask()
    problem = Problem("p", "Ann has 3 pens and buys 4. How many?", "7")
    builder = PromptBuilder(tokenizer, task)
    text = tokenizer.decode(builder.first_round(problem))
    assert text.startswith("<|im_start|>user\nAnn has 3 pens") and "state your answer at the end" in text
    assert text.endswith("<|im_start|>assistant\n")
    history = [["r1 a0", "r1 a1", "r1 a2"], ["r2 a0", "r2 a1", "r2 a2"]]
    text = tokenizer.decode(builder.classic_round(problem, history, agent=1))
    # Own answers as assistant turns, the others' latest answers in the user turns, the question repeated.
    assert text.count("<|im_start|>assistant\nr1 a1<|im_end|>") == 1
    assert text.count("<|im_start|>assistant\nr2 a1<|im_end|>") == 1
    last_user = text.rsplit("<|im_start|>user\n", 1)[1]
    assert "r2 a0" in last_user and "r2 a2" in last_user and "r2 a1" not in last_user and "r1" not in last_user
    assert problem.question in last_user
    agg = tokenizer.decode(builder.aggregator(problem, ["x", "y"]))
    assert "Solution 1:\nx" in agg and "Solution 2:\ny" in agg


def test_arith_prompt_asks_for_the_answer_line(tokenizer):
    problem = arith_problems("test", 1)[0]
    text = tokenizer.decode(PromptBuilder(tokenizer, ArithTask()).first_round(problem))
    assert "End with a line 'Answer: <number>'." in text


# ------------------------------------------------------------------------------------------------
# votes and seeds
# ------------------------------------------------------------------------------------------------


def test_majority_vote():
    canon = ArithTask().canonical
    assert majority_vote(["3", "4", "4", "3"], canon) == "3"  # tie: the group seen first
    assert majority_vote(["3", "4.0", "4", None, None, None], canon) == "4.0"  # equal numbers are one vote
    assert majority_vote([None, None], canon) is None
    assert majority_vote(["x", "5"], canon) == "5"  # unreadable answers do not vote


def test_request_seeds_are_stable_and_distinct():
    seeds = {request_seed(0, "p", r, a) for r in range(2) for a in range(5)}
    assert len(seeds) == 10 and request_seed(0, "p", 1, 3) == request_seed(0, "p", 1, 3)
    assert request_seed(1, "p", 1, 3) != request_seed(0, "p", 1, 3)


def test_config_validation():
    assert (DebateConfig(protocol="single").num_agents, DebateConfig(protocol="single").num_rounds) == (1, 1)
    assert DebateConfig(protocol="self-consistency", agents=4, rounds=3).num_rounds == 1
    with pytest.raises(ValueError, match="protocol"):
        DebateConfig(protocol="vote")
    with pytest.raises(ValueError, match="agents"):
        DebateConfig(agents=0)
    with pytest.raises(ValueError, match="aggregator"):
        DebateConfig(protocol="single", aggregator=True)
    # Sampling settings fail here, before a run starts (not as one error record per problem).
    for kwargs, message in [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                            ({"top_p": 1.5}, "top_p"), ({"top_k": -5}, "top_k"),
                            ({"temperature": float("nan")}, "temperature")]:
        with pytest.raises(ValueError, match=message):
            DebateConfig(**kwargs)


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------


def test_problems_advance_and_finish_independently(tokenizer):
    problems = arith_problems("test", 3)
    slow = problems[1].question
    llm = FakeLLM(tokenizer, arith_agent(problems), steps=lambda text: 7 if slow in text else 1)
    config = DebateConfig(agents=3, rounds=2, temperature=0.0)
    order = []
    for record in run_debates(llm, ArithTask(), problems, config):
        order.append((record["id"], llm.step_no))
    fast_done = {pid: step for pid, step in order}
    slow_r1_done = max(s for s, ev, rid in llm.log if ev == "finish" and problems[1].id in rid and ":r0:" in rid)
    for p in (problems[0], problems[2]):
        r2_added = min(s for s, ev, rid in llm.log if ev == "add" and p.id in rid and ":r1:" in rid)
        assert r2_added < slow_r1_done  # round 2 did not wait for the slow problem's round 1
        assert fast_done[p.id] < slow_r1_done  # ... and the record came out at once
    assert [pid for pid, _ in order][-1] == problems[1].id
    assert sum(1 for _, ev, _ in llm.log if ev == "add") == 3 * 3 * 2


def test_records_hold_every_turn_votes_and_cost(tokenizer):
    problems = arith_problems("test", 4)
    llm = FakeLLM(tokenizer, arith_agent(problems), steps=lambda text: 1 + len(text) % 3)
    records = list(run_debates(llm, ArithTask(), problems, DebateConfig(agents=5, rounds=2)))
    assert sorted(r["id"] for r in records) == sorted(p.id for p in problems)
    for r in records:
        p = next(p for p in problems if p.id == r["id"])
        assert r["gold"] == p.gold and r["question"] == p.question and r["error"] is None
        assert [len(t) for t in r["rounds"]] == [5, 5] and [t["agent"] for t in r["rounds"][0]] == list(range(5))
        for turns, majority in zip(r["rounds"], r["round_majority"]):
            seeds_wrong = [t["answer"] != p.gold for t in turns]
            assert [t["correct"] for t in turns] == [not w for w in seeds_wrong]
            expected = majority_vote([t["answer"] for t in turns], ArithTask().canonical)
            assert majority == expected
        assert all(t["correct"] for t in r["rounds"][1])  # everyone revised to the gold
        assert r["final_answer"] == p.gold and r["correct"] and r["round_majority_correct"][1]
        turns = [t for ts in r["rounds"] for t in ts]
        assert r["cost"]["prompt_tokens"] == sum(t["prompt_tokens"] for t in turns)
        assert r["cost"]["completion_tokens"] == sum(t["completion_tokens"] for t in turns) > 0
        assert r["cost"]["cached_prompt_tokens"] == sum(t["cached_tokens"] for t in turns)
        assert r["cost"]["seconds"] >= 0
        # shared layout: agents 2..5 of round 2 read the transcript from the (simulated) prefix cache
        r2 = r["rounds"][1]
        assert all(t["cached_tokens"] >= 0.7 * t["prompt_tokens"] for t in r2[1:])
    summary = summarize(records, num_rounds=2)
    assert summary["final_accuracy"] == 1.0 and summary["majority_accuracy_by_round"][1] == 1.0
    assert 0 < summary["prefix_cache_hit_rate"] < 1
    assert "majority of round 2" in format_summary(summary)


def test_protocol_request_counts_and_aggregator(tokenizer):
    problems = arith_problems("test", 2)
    for config, per_problem in [(DebateConfig(protocol="single"), 1),
                                (DebateConfig(protocol="self-consistency", agents=4), 4),
                                (DebateConfig(agents=3, rounds=3, layout="classic"), 9),
                                (DebateConfig(agents=3, rounds=2, aggregator=True), 7)]:
        llm = FakeLLM(tokenizer, arith_agent(problems))
        records = list(run_debates(llm, ArithTask(), problems, config))
        assert sum(1 for _, ev, _ in llm.log if ev == "add") == per_problem * len(problems), config
        for r in records:
            assert len(r["rounds"]) == config.num_rounds and len(r["round_majority"]) == config.num_rounds
            assert (r["aggregator"] is not None) == config.aggregator
            if config.aggregator:
                assert r["aggregator"]["agent"] is None and r["final_answer"] == r["aggregator"]["answer"]
                assert r["cost"]["completion_tokens"] == sum(
                    t["completion_tokens"] for ts in r["rounds"] for t in ts) + r["aggregator"]["completion_tokens"]


def test_aggregator_answer_overrides_the_vote(tokenizer):
    problems = arith_problems("test", 1)
    p = problems[0]

    def respond(text, params):
        return "Answer: 999" if "Final solutions" in text else f"Answer: {p.gold}"
    record, = run_debates(FakeLLM(tokenizer, respond), ArithTask(), problems,
                          DebateConfig(agents=2, rounds=1, protocol="self-consistency", aggregator=True))
    assert record["round_majority"] == [p.gold] and record["final_answer"] == "999" and not record["correct"]


def test_a_refused_prompt_errors_its_problem_only(tokenizer):
    problems = arith_problems("test", 3)
    long = Problem("long", "How many? " * 200, "1")
    llm = FakeLLM(tokenizer, arith_agent(problems + [long]), max_len=700)
    records = {r["id"]: r for r in run_debates(llm, ArithTask(), [problems[0], long, *problems[1:]],
                                               DebateConfig(agents=3, rounds=2))}
    assert set(records) == {p.id for p in problems} | {"long"}
    bad = records["long"]
    assert "round 1, agent 1" in bad["error"] and "context window" in bad["error"]
    assert bad["rounds"] == [[]] and bad["final_answer"] is None and bad["correct"] is False
    assert all(records[p.id]["error"] is None and records[p.id]["correct"] for p in problems)
    assert not llm.running


def test_a_later_round_over_the_window_keeps_the_earlier_rounds(tokenizer):
    problems = arith_problems("test", 2)
    llm = FakeLLM(tokenizer, arith_agent(problems), max_len=200)  # round 1 fits, round 2 does not
    records = list(run_debates(llm, ArithTask(), problems, DebateConfig(agents=3, rounds=2)))
    for r in records:
        assert r["error"].startswith("round 2, agent 1:")
        assert len(r["rounds"][0]) == 3 and r["rounds"][1] == [] and len(r["round_majority"]) == 1
        assert r["final_answer"] is None and not r["correct"]
    summary = summarize(records, num_rounds=2)
    assert summary["errors"] == 2 and summary["majority_accuracy_by_round"][1] == 0.0
    assert not llm.running


def test_max_active_problems_bounds_the_problems_in_flight(tokenizer):
    problems = arith_problems("test", 5)
    llm = FakeLLM(tokenizer, arith_agent(problems))
    started = []
    records = []
    original = llm.add_request

    def add_request(prompt, params, request_id=None):
        started.append(request_id.split(":")[1])
        assert len({pid for pid in started} - {r["id"] for r in records}) <= 2
        return original(prompt, params, request_id)
    llm.add_request = add_request
    records.extend(run_debates(llm, ArithTask(), problems, DebateConfig(agents=2, rounds=2),
                               max_active_problems=2))
    assert len(records) == 5


class FifoLLM(FakeLLM):
    """A first-come-first-served engine double: each step advances only the ``max_num_seqs`` oldest
    requests, like the engine's waiting queue when more requests are queued than fit in a batch."""

    def __init__(self, tokenizer, respond, max_num_seqs):
        super().__init__(tokenizer, respond, steps=lambda text: 2)
        self.config = types.SimpleNamespace(max_num_seqs=max_num_seqs)

    def step(self):
        self.step_no += 1
        finished = []
        for rid in list(self.running)[:self.config.max_num_seqs]:
            entry = self.running[rid]
            entry[0] -= 1
            if entry[0] <= 0:
                finished.append(entry[1])
                del self.running[rid]
                self.log.append((self.step_no, "finish", rid))
        return finished


def test_records_come_out_steadily_behind_a_fifo_engine(tokenizer):
    """By default the driver starts only enough problems to fill the engine's batch twice, so a
    problem's second round does not queue behind every other problem's first round: records (and
    the run's saved progress) come out from early on, not all at the end."""
    problems = arith_problems("test", 24)
    config = DebateConfig(agents=2, rounds=2)
    llm = FifoLLM(tokenizer, arith_agent(problems), max_num_seqs=4)
    assert default_active_problems(llm, config) == 4
    assert default_active_problems(FakeLLM(tokenizer, arith_agent(problems)), config) is None
    done_at = [llm.step_no for _ in run_debates(llm, ArithTask(), problems, config)]
    last_start = max(s for s, ev, rid in llm.log if ev == "add" and ":r0:" in rid)
    assert len(done_at) == 24 and done_at[0] < last_start
    assert done_at[len(done_at) // 2] < 0.7 * done_at[-1]  # half the records well before the end
    assert sum(1 for _, ev, _ in llm.log if ev == "add") == 24 * 2 * 2


def test_summary_numbers():
    def rec(first, maj, final, cached=0, error=None):
        turns = [{"agent": 0, "correct": first}]
        return {"rounds": [turns], "round_majority_correct": maj, "correct": final, "error": error,
                "cost": {"prompt_tokens": 10, "completion_tokens": 3, "cached_prompt_tokens": cached, "seconds": 1.0}}
    records = [rec(True, [True, True], True, 5), rec(False, [True, False], False),
               rec(False, [False, True], True, 5), rec(False, [False], False, error="boom")]
    s = summarize(records, num_rounds=2)
    assert s["problems"] == 4 and s["errors"] == 1
    assert s["single_agent_accuracy"] == 0.25 and s["majority_accuracy_by_round"] == [0.5, 0.5]
    assert s["self_consistency_accuracy"] == 0.5 and s["final_accuracy"] == 0.5
    assert s["tokens_generated"] == 12 and s["prefix_cache_hit_rate"] == 10 / 40


def test_stopping_early_aborts_what_is_in_flight(tokenizer):
    problems = arith_problems("test", 4)
    llm = FakeLLM(tokenizer, arith_agent(problems), steps=lambda text: 1 + len(text) % 5)
    records = run_debates(llm, ArithTask(), problems, DebateConfig(agents=3, rounds=2))
    next(records)
    records.close()
    assert not llm.running and any(ev == "abort" for _, ev, _ in llm.log)


def test_self_refine_drafts_then_revises_its_own_draft(tokenizer):
    """Two calls per problem: the single-agent draft (the same request seed as ``single``, so the same
    sample), then the shared round prompt holding that draft alone, marked as the agent's own."""
    problems = arith_problems("test", 3)
    prompts = []

    def respond(text, params):
        prompts.append(text)
        return arith_agent(problems)(text, params)

    llm = FakeLLM(tokenizer, respond)
    config = DebateConfig(protocol="self-refine", agents=5, rounds=3, seed=1)
    assert (config.num_agents, config.num_rounds) == (1, 2)
    records = list(run_debates(llm, ArithTask(), problems, config))
    assert sum(1 for _, ev, _ in llm.log if ev == "add") == 2 * len(problems)
    single = {r["id"]: r for r in run_debates(FakeLLM(tokenizer, arith_agent(problems)), ArithTask(), problems,
                                             DebateConfig(protocol="single", seed=1))}
    for r in records:
        assert [len(ts) for ts in r["rounds"]] == [1, 1] and r["protocol"] == "self-refine"
        draft, revised = r["rounds"][0][0], r["rounds"][1][0]
        assert draft["text"] == single[r["id"]]["rounds"][0][0]["text"]
        p = next(p for p in problems if p.id == r["id"])
        revision_prompt = next(t for t in prompts if p.question in t and "Solutions from the previous round" in t)
        assert f"Agent 1:\n{draft['text'].strip()}" in revision_prompt and "Agent 2:" not in revision_prompt
        assert "You are Agent 1: the solution of Agent 1 above is your own." in revision_prompt
        assert r["final_answer"] == revised["answer"]
    summary = {**summarize(records, num_rounds=2), "protocol": "self-refine"}
    text = format_summary(summary)
    gain = summary["majority_accuracy_by_round"][1] - summary["majority_accuracy_by_round"][0]
    assert "revised (round 2)" in text and f"{100 * gain:+.1f} points" in text
    with pytest.raises(ValueError, match="self-refine revises with the shared round prompt"):
        DebateConfig(protocol="self-refine", layout="classic")
    with pytest.raises(ValueError, match="aggregator needs more than one agent"):
        DebateConfig(protocol="self-refine", aggregator=True)

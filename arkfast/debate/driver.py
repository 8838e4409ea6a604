"""The driver: runs many problems' debates at once over ``LLM.add_request`` / ``LLM.step``.

Every agent of every started problem is in flight together, so the engine batches across problems
and the prefix cache shares each problem's transcript across its agents. A problem moves to its next
round as soon as its own round is complete (never waiting for other problems), and is yielded the
moment it is done, with its record.

    for record in run_debates(llm, task, problems, DebateConfig(agents=3, rounds=2)):
        print(record["id"], record["final_answer"], record["correct"])
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from arkfast.tasks import Problem, Task

from .prompts import PromptBuilder
from .protocol import DebateConfig, ProblemState, request_seed

__all__ = ["default_active_problems", "run_debates"]


def default_active_problems(llm: Any, config: DebateConfig) -> int | None:
    """How many problems to keep started: ``ceil(2 x max_num_seqs / agents)``, so the engine always has
    a full batch and a batch's worth queued, or ``None`` (all) when ``llm`` does not say its
    ``config.max_num_seqs``."""
    max_num_seqs = getattr(getattr(llm, "config", None), "max_num_seqs", None)
    if not isinstance(max_num_seqs, int):
        return None
    return max(1, -(-2 * max_num_seqs // config.num_agents))


def run_debates(llm: Any, task: Task, problems: Iterable[Problem], config: DebateConfig, *,
                max_active_problems: int | None = None) -> Iterator[dict[str, Any]]:
    """Run ``config``'s protocol on every problem with ``llm`` and yield one record per problem, in
    the order they finish (see :meth:`ProblemState.record` for the fields).

    ``llm``: an ``arkfast.LLM`` (or anything with its ``add_request``/``step``/``abort_request``/
    ``has_unfinished_requests``/``tokenizer``). ``max_active_problems``: start at most this many
    problems at once. ``None``: :func:`default_active_problems`, enough requests to fill the engine's
    batch twice over. (With every problem started at once, each problem's next round would queue behind
    every other problem's first round in the engine's first-come-first-served queue: no record would
    come out, and none be saved, until nearly the end of the run.)
    A problem whose prompt the engine refuses (``ValueError``, e.g. longer than the context window) is
    yielded with its ``error`` set; the other problems go on.
    """
    if max_active_problems is None:
        max_active_problems = default_active_problems(llm, config)
    if max_active_problems is not None and (isinstance(max_active_problems, bool) or not
                                            isinstance(max_active_problems, int) or max_active_problems < 1):
        raise ValueError(f"max_active_problems must be an int >= 1 or None, got {max_active_problems!r}")
    from arkfast import SamplingParams

    if getattr(llm, "tokenizer", None) is None:
        raise ValueError("the model has no tokenizer; debate prompts are built with its chat template")
    builder = PromptBuilder(llm.tokenizer, task)
    waiting = deque(problems)
    in_flight: dict[str, tuple[ProblemState, int | None]] = {}  # request id -> (state, agent or None)
    done: deque[ProblemState] = deque()
    active = 0
    counter = 0

    def params(state: ProblemState, round_index: int, agent: int) -> SamplingParams:
        return SamplingParams(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                              max_tokens=config.max_tokens,
                              seed=request_seed(config.seed, state.problem.id, round_index, agent))

    def submit(state: ProblemState, prompts: list[tuple[int | None, list[int]]], round_index: int) -> None:
        nonlocal counter
        for agent, ids in prompts:
            counter += 1
            rid = f"{counter}:{state.problem.id}:r{round_index}:{'agg' if agent is None else agent}"
            sampling = params(state, round_index, -1 if agent is None else agent)
            try:
                llm.add_request(ids, sampling, request_id=rid)
            except ValueError as e:  # e.g. the prompt is longer than the context window
                where = "aggregator" if agent is None else f"round {round_index + 1}, agent {agent + 1}"
                state.fail(f"{where}: {e}")
                for other in state.outstanding:
                    llm.abort_request(other)
                    in_flight.pop(other, None)
                state.outstanding.clear()
                done.append(state)
                return
            in_flight[rid] = (state, agent)
            state.outstanding.add(rid)

    def advance(state: ProblemState) -> None:
        """Submit the state's next round (or aggregator call), or mark it done."""
        r = len(state.rounds)
        if r < config.num_rounds:
            history = state.history()  # every earlier round's texts, before this round opens
            state.start_round()
            if r == 0:
                ids = builder.first_round(state.problem)
                prompts = [(a, ids) for a in range(config.num_agents)]
            elif config.layout == "shared":
                prompts = list(enumerate(builder.shared_round(state.problem, history[-1])))
            else:
                prompts = [(a, builder.classic_round(state.problem, history, a)) for a in range(config.num_agents)]
            submit(state, prompts, r)
        elif config.aggregator and state.aggregator is None:
            submit(state, [(None, builder.aggregator(state.problem, state.last_texts()))], r)
        else:
            done.append(state)

    try:
        while waiting or in_flight or done:
            while waiting and (max_active_problems is None or active < max_active_problems):
                active += 1
                advance(ProblemState(waiting.popleft(), task, config))
            while done:
                state = done.popleft()
                active -= 1
                state.finish()
                yield state.record()
            if not in_flight:
                continue
            if not llm.has_unfinished_requests():
                raise RuntimeError(f"the engine has no unfinished requests but {len(in_flight)} are awaited")
            for output in llm.step():
                entry = in_flight.pop(output.request_id, None)
                if entry is None:  # aborted, or not ours
                    continue
                state, agent = entry
                state.outstanding.discard(output.request_id)
                state.turn(output, agent)
                if agent is None or state.round_complete():
                    advance(state)
    finally:  # the caller stopped early (or something failed): leave nothing running in the engine
        for rid in in_flight:
            llm.abort_request(rid)

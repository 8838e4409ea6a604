"""Multi-agent debate over the engine: protocols, prompts, the scheduling driver and the summary.

    from arkfast.debate import DebateConfig, run_debates
    for record in run_debates(llm, task, problems, DebateConfig(protocol="debate", agents=5, rounds=2)):
        ...
"""
from .driver import default_active_problems, run_debates
from .prompts import ANSWER_INSTRUCTIONS, PromptBuilder, first_round_text, render_chat
from .protocol import LAYOUTS, PROTOCOLS, DebateConfig, ProblemState, majority_vote, request_seed
from .summary import format_summary, summarize

__all__ = [
    "ANSWER_INSTRUCTIONS", "LAYOUTS", "PROTOCOLS", "DebateConfig", "ProblemState", "PromptBuilder",
    "default_active_problems",
    "first_round_text", "format_summary", "majority_vote", "render_chat", "request_seed", "run_debates",
    "summarize",
]

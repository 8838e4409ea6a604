"""Trajectories: the R-SFT, DA and PAD training sets built from recorded debates.

    python -m arkfast.trajectories --debates runs/x/debates.jsonl --output runs/x/trajectories

    from arkfast.trajectories import read_trajectories, encode_response, chat_prompt_ids
    records = read_trajectories("rsft.jsonl", tokenizer=tok)     # refuses a file made for another tokenizer
    prompt = chat_prompt_ids(tok, records[0]["prompt"])          # the single-agent round-1 prompt ids
    ids, ranges = encode_response(tok, records[0]["response"], records[0]["steps"])  # token range per step

    sets, counts = build_sets(load_debates(["debates.jsonl"])[0], tok, BuildConfig(max_per_problem=4))

The record schema is in :mod:`arkfast.trajectories.schema`, segmentation and the step -> token rule in
:mod:`arkfast.trajectories.steps`, the selection rules in :mod:`arkfast.trajectories.build`; all three
are described in ``docs/trajectories.md``.
"""
from .build import SETS, SKIP_REASONS, BuildConfig, DebateFileError, build_sets, load_debates, normalise
from .schema import (
    REQUIRED_FIELDS,
    TrajectoryFileError,
    chat_prompt_ids,
    read_trajectories,
    tokenizer_fingerprint,
    validate_record,
    write_trajectories,
)
from .steps import (
    DEFAULT_STEP_MODES,
    STEP_MODES,
    check_spans,
    default_step_mode,
    encode_response,
    merge_tokenless_steps,
    segment_steps,
    token_starts,
    validate_step_mode,
)

__all__ = [
    "DEFAULT_STEP_MODES", "REQUIRED_FIELDS", "SETS", "SKIP_REASONS", "STEP_MODES", "BuildConfig",
    "DebateFileError", "TrajectoryFileError", "build_sets", "chat_prompt_ids", "check_spans",
    "default_step_mode", "encode_response", "load_debates", "merge_tokenless_steps", "normalise",
    "read_trajectories", "segment_steps", "token_starts", "tokenizer_fingerprint", "validate_record",
    "validate_step_mode", "write_trajectories",
]

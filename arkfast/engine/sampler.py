"""The sampler: greedy, temperature, top-k and top-p over a batch of logits, with per-request seeds.

Drawing without a host sync: the exponential race. If ``E_v ~ Exp(1)`` independently, then
``argmax_v p_v / E_v`` is distributed as ``Categorical(p)``: ``P(E_v / p_v < t) = 1 - exp(-p_v t)``, so
``E_v / p_v ~ Exp(p_v)``, and the smallest of independent exponentials is the one with rate ``p_v`` with
probability ``p_v / sum_u p_u = p_v``. With ``E = -ln U`` for ``U ~ Uniform[0, 1)``, ``E`` is in
``(0, inf]`` (``U = 0`` gives ``inf`` and a score of 0; a filtered token has ``p = 0`` and scores 0).

Requests with a ``seed`` draw by inversion instead: one uniform ``u`` per row, a hash of ``(seed,
position of the token being drawn)`` computed on the host, and the token is the first ``v`` whose
cumulative probability exceeds ``u * sum_v p_v`` (``searchsorted`` over the row's running sum; a
filtered token adds 0 to the sum, so it is never the first to exceed it). Its draws depend on nothing
else in the batch, a preempted and recomputed request draws the same numbers again, and all seeded
rows of a step cost a few batched ops (not one generator reseed and one random launch per row, which
a debate, whose every request is seeded, would pay on every row of every step). Requests without a
seed share the engine's generator (seeded by ``LLM(seed=...)``).
"""
from __future__ import annotations

import dataclasses

import torch

from .sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def mix_seed(seed: int, position: int) -> int:
    """A 63-bit hash of ``(seed, position)`` (SplitMix64's finaliser over both)."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def seed_uniform(seed: int, position: int) -> float:
    """A uniform number in ``(0, 1)`` from ``(seed, position)``: the top 23 bits of :func:`mix_seed`,
    centred in their interval (``(2k + 1) / 2^24``: exact in float32, never 0 or 1)."""
    return ((mix_seed(seed, position) >> 40) + 0.5) / (1 << 23)


@dataclasses.dataclass
class SamplingBatch:
    """The sampling settings of the N rows of one step's logits, as host lists."""

    params: list[SamplingParams]
    positions: list[int]  # the sequence position each row's token will take (seeds its noise)

    @property
    def all_greedy(self) -> bool:
        return all(p.greedy for p in self.params)


class Sampler:
    """``sampler(logits [N, V], batch) -> token ids [N]`` int64 on the logits' device (no host sync)."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        logits = logits.float()                                                   # [N, V]
        greedy = logits.argmax(dim=-1)                                           # [N]
        if batch.all_greedy:
            return greedy
        N, V = logits.shape
        temperature = torch.tensor([p.temperature or 1.0 for p in batch.params], dtype=torch.float32)
        logits = logits / temperature.to(self.device, non_blocking=True)[:, None]
        top_k = [p.top_k if p.top_k > 0 else V for p in batch.params]
        top_p = [p.top_p for p in batch.params]
        if min(top_k) < V or min(top_p) < 1.0:
            logits = apply_top_k_top_p(logits, torch.tensor(top_k).to(self.device, non_blocking=True),
                                       torch.tensor(top_p).to(self.device, non_blocking=True))
        probs = torch.softmax(logits, dim=-1)                                    # [N, V]
        sampled = greedy
        if any(p.seed is None and not p.greedy for p in batch.params):
            uniform = torch.rand(N, V, generator=self.generator, device=self.device)
            sampled = (probs / -torch.log(uniform)).argmax(dim=-1)               # the exponential race
        seeded = [i for i, p in enumerate(batch.params) if p.seed is not None and not p.greedy]
        if seeded:
            u = torch.tensor([seed_uniform(batch.params[i].seed, batch.positions[i]) for i in seeded],
                             dtype=torch.float32).to(self.device, non_blocking=True)       # [S]
            rows = None if len(seeded) == N else torch.tensor(seeded).to(self.device, non_blocking=True)
            cdf = (probs if rows is None else probs[rows]).cumsum(dim=-1)                   # [S, V]
            drawn = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]   # [S]
            # u * total can round up to total (u is at most 1 - 2^-24): then the last token with
            # probability > 0 is meant; the row's argmax stands in for it in that rare edge case.
            fallback = greedy if rows is None else greedy[rows]
            drawn = torch.where(drawn < V, drawn, fallback)
            sampled = drawn if rows is None else sampled.index_copy(0, rows, drawn)
        is_greedy = torch.tensor([p.greedy for p in batch.params]).to(self.device, non_blocking=True)
        return torch.where(is_greedy, greedy, sampled)


def token_logprobs(logits: torch.Tensor, batch: SamplingBatch, tokens: torch.Tensor, rows: list[int]
                   ) -> list[dict[int, tuple[float, int]]]:
    """The log-probabilities the requests of ``rows`` asked for (``SamplingParams.logprobs``): per row,
    ``{token_id: (logprob, rank)}`` for the sampled token ``tokens[row]`` and the row's ``logprobs``
    most likely tokens, ``rank`` 1 for the most likely.

    The distribution is ``log_softmax(logits / T)`` over the whole vocabulary, in fp32: after the
    temperature, before top-k / top-p (``T = 1`` for a greedy row). A trainer that divides its own
    logits by the same ``T`` computes the same numbers (``arkfast.distill.grpo``). One host copy of
    the asked-for rows only (the step already syncs on the sampled tokens)."""
    params = [batch.params[i] for i in rows]
    index = torch.tensor(rows).to(logits.device, non_blocking=True)
    temperature = torch.tensor([p.temperature or 1.0 for p in params], dtype=torch.float32)
    logp = torch.log_softmax(logits.index_select(0, index).float()
                             / temperature.to(logits.device, non_blocking=True)[:, None], dim=-1)  # [R, V]
    chosen_ids = tokens.index_select(0, index)                                                   # [R]
    chosen = logp.gather(1, chosen_ids[:, None])                                                 # [R, 1]
    rank = (logp > chosen).sum(dim=-1) + 1                                                       # [R]
    k = min(max(p.logprobs for p in params), logits.shape[1])
    top_val, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], chosen_ids[:, None][:, :0])  # [R, k]
    host = [t.tolist() for t in (chosen_ids, chosen[:, 0], rank, top_ids, top_val)]
    out = []
    for r, p in enumerate(params):
        entry = {host[0][r]: (host[1][r], host[2][r])}
        for j in range(min(p.logprobs, k)):
            entry.setdefault(host[3][r][j], (host[4][r][j], j + 1))
        out.append(entry)
    return out


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Set to ``-inf`` every logit outside row i's ``top_k[i]`` largest and outside the smallest set of
    largest ones whose probabilities sum to at least ``top_p[i]`` (the most likely token always stays).

    ``logits [N, V]`` fp32, ``top_k [N]`` int64 in ``[1, V]``, ``top_p [N]`` fp32 in ``(0, 1]``."""
    # A stable sort ranks equal logits by token id, as argmax breaks ties: top_k = 1 is greedy.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)     # [N, V]
    rank = torch.arange(logits.shape[1], device=logits.device)                   # [V]
    sorted_logits = sorted_logits.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop token j if the tokens ranked above it already reach top_p: cumsum_{<j} = cumsum_j - p_j.
    drop = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)

"""Graph-supervised distillation (``--mode graph``): MAGDi's objective (Chen et al., arXiv 2402.01620)
on the interaction graph's nodes, with its gaps closed.

The nodes are the right and wrong answers of each problem (``pad.jsonl``: distinct right and wrong
trajectories of every round and agent). Each node ``j`` is one sequence ``prompt + response`` of the
packed varlen forward; its *pooled state* is the mean of the final hidden states over its response
tokens (the end-of-turn token included)::

    p_j = (1 / |R_j|) sum_{t in R_j} h_t                                   [H]

The loss of an optimiser step over its rows (``N`` labelled positions, ``P`` pairs, ``J`` nodes, all
counted on the host before the step, so micro-batches add up exactly as in :mod:`.loop`)::

    L = sum_{t of right nodes} w_t CE_t / N                                (next-token, right nodes only)
      + beta  * sum_{(i, k) in pairs} max(0, m - (s_i - s_k)) / P           (margin ranking)
      + alpha * sum_j BCE(z_j, c_j) / J                                     (node correctness)

with ``s_j = u . p_j + b_u`` (a score head) and ``z_j = v . p_j + b_v`` (a correctness head, ``c_j`` = 1
for a right node), and ``pairs`` every (right, wrong) pair of the *same problem*. A wrong node's
tokens are context only: it is in the forward for its pooled state, never imitated. ``beta`` =
``--graph-margin-weight`` (default 0.1, MAGDi's weight of the margin term), ``m`` = ``--graph-margin``
(1), ``alpha`` = ``--graph-node-weight`` (0.1; 0 turns the head off).

The gaps closed: MAGDi's public code runs its classifier on frozen embeddings, so that term never
updates the language model. Here ``p_j`` is not detached: the margin and correctness gradients flow
through the pooled states into every decoder weight (``dL/dh_t = (beta * dmargin/ds_j * u + alpha *
dBCE/dz_j * v) / |R_j|`` for t in ``R_j``, added to the token loss's). The pooling reads the hidden
states the token loss already computed: one forward, no second pass, no padding.

Rows: a problem's nodes are packed together (one unit of the best-fit-decreasing packer), so every
pair lies inside one row; a problem longer than a row is cut into row-sized pieces of whole
sequences, and the pairs across two pieces are lost (counted: ``pairs_split``). The heads are trained
with the model, saved in the resumable checkpoints (``trainer_state.pt``), and left out of the
student, which is the language model alone.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from arkfast.kernels.fused_linear_weighted_cross_entropy import fused_linear_weighted_cross_entropy
from arkfast.packing import pack
from arkfast.train import IGNORE_INDEX, Example, PackedRow

from .data import DataStats, end_of_turn_id, read_records, record_example
from .loop import Optimizer, forward_hidden
from .weights import apply_span_weights

__all__ = ["GraphDataStats", "GraphObjective", "GraphOptimizer", "GraphRow", "concat_graph_rows", "graph_rows",
           "load_graph_rows"]


@dataclasses.dataclass(frozen=True)
class GraphRow(PackedRow):
    """A packed row whose sequences are graph nodes. Besides :class:`PackedRow`'s fields:
    ``pool_index [R]`` int64 (the positions of every node's response tokens in the row), ``pool_node [R]``
    int64 (which sequence each belongs to), ``node_correct [B]`` float32 (1 for a right node) and
    ``pairs [P, 2]`` int64 (sequence indices of each (right, wrong) pair of one problem)."""

    pool_index: torch.Tensor = None
    pool_node: torch.Tensor = None
    node_correct: torch.Tensor = None
    pairs: torch.Tensor = None

    @property
    def num_nodes(self) -> int:
        return len(self.lengths)

    @property
    def num_pairs(self) -> int:
        return int(self.pairs.shape[0])


@dataclasses.dataclass
class GraphDataStats(DataStats):
    """:class:`DataStats` plus the graph's ``nodes`` (right ``right_nodes``), the problems, the
    (right, wrong) ``pairs`` kept, and ``pairs_split`` (lost: a problem longer than a row)."""

    nodes: int = 0
    right_nodes: int = 0
    problems: int = 0
    pairs: int = 0
    pairs_split: int = 0


def _node_example(example: Example, correct: bool) -> Example:
    """A right node is learned as it is; a wrong node's completion is context only (no target)."""
    if correct:
        return example
    return Example(example.prompt, example.completion, example.weights, trained=(False,) * len(example.completion))


def graph_rows(groups: Sequence[Sequence[tuple[Example, bool]]], row_tokens: int) -> tuple[list[GraphRow], int]:
    """``(rows, pairs_split)``: each group (one problem's ``(example, right)`` nodes, every example at
    most ``row_tokens`` long) cut into pieces of whole examples that fit a row (in order), the pieces
    packed best-fit-decreasing, the pairs of each piece recorded."""
    pieces, split = [], 0
    for group in groups:
        current, length = [], 0
        for node in group:
            if current and length + len(node[0]) > row_tokens:
                pieces.append(current)
                current, length = [], 0
            current.append(node)
            length += len(node[0])
        if current:
            pieces.append(current)
        right = sum(c for _, c in group)
        split += right * (len(group) - right)  # every pair of the problem; those kept are subtracted below
    rows = []
    for members in pack([sum(len(e) for e, _ in p) for p in pieces], row_tokens):
        parts, lengths, index, node_of, correct, pairs = [], [], [], [], [], []
        offset = 0
        for i in members:
            first = len(lengths)
            for example, right in pieces[i]:
                parts.append(_node_example(example, right).tensors())
                index.append(torch.arange(offset + len(example.prompt), offset + len(example)))
                node_of.append(torch.full((len(example.completion),), len(lengths), dtype=torch.int64))
                correct.append(float(right))
                lengths.append(len(example))
                offset += len(example)
            ids = range(first, len(lengths))
            pairs += [(a, b) for a in ids if correct[a] for b in ids if not correct[b]]
        split -= len(pairs)
        rows.append(GraphRow(input_ids=torch.cat([p[0] for p in parts]), labels=torch.cat([p[1] for p in parts]),
                             weights=torch.cat([p[2] for p in parts]), lengths=tuple(lengths),
                             pool_index=torch.cat(index), pool_node=torch.cat(node_of),
                             node_correct=torch.tensor(correct, dtype=torch.float32),
                             pairs=torch.tensor(pairs, dtype=torch.int64).reshape(-1, 2)))
    return rows, split


def concat_graph_rows(rows: Sequence[GraphRow]) -> GraphRow:
    """Several graph rows as one token stream (:func:`arkfast.distill.data.concat_rows` for nodes):
    positions and sequence indices shifted by the rows before."""
    if len(rows) == 1:
        return rows[0]
    index, node, pairs, tokens, nodes = [], [], [], 0, 0
    for r in rows:
        index.append(r.pool_index + tokens)
        node.append(r.pool_node + nodes)
        pairs.append(r.pairs + nodes)
        tokens, nodes = tokens + r.num_tokens, nodes + r.num_nodes
    return GraphRow(input_ids=torch.cat([r.input_ids for r in rows]), labels=torch.cat([r.labels for r in rows]),
                    weights=torch.cat([r.weights for r in rows]), lengths=tuple(n for r in rows for n in r.lengths),
                    pool_index=torch.cat(index), pool_node=torch.cat(node),
                    node_correct=torch.cat([r.node_correct for r in rows]), pairs=torch.cat(pairs))


def load_graph_rows(paths: Sequence[str], tokenizer: Any, row_tokens: int,
                    span_weights: dict[str, float] | None = None) -> tuple[list[GraphRow], GraphDataStats]:
    """The graph rows of trajectory files holding right and wrong answers (``pad.jsonl``): nodes grouped
    by ``problem_id`` (first-seen order), packed by :func:`graph_rows`."""
    records, base = read_records(paths, tokenizer, "graph")
    stats = GraphDataStats(**vars(base))
    eos = end_of_turn_id(tokenizer)
    groups: dict[str, list[tuple[Example, bool]]] = {}
    for record in records:
        weights = apply_span_weights(None, len(record["steps"]), span_weights)
        example = record_example(tokenizer, record, weights, eos)
        if len(example) > row_tokens:
            stats.skipped_long += 1
            continue
        groups.setdefault(record["problem_id"], []).append((example, record["correct"]))
        stats.nodes += 1
        stats.right_nodes += record["correct"]
        stats.tokens += len(example)
        stats.target_tokens += len(example.completion) if record["correct"] else 0
    stats.examples, stats.problems = stats.nodes, len(groups)
    if not stats.right_nodes:
        raise ValueError(f"{', '.join(map(str, paths))}: --mode graph needs right answers (correct: true); "
                         f"{stats.nodes} nodes, none right")
    rows, stats.pairs_split = graph_rows(list(groups.values()), row_tokens)
    stats.pairs = sum(r.num_pairs for r in rows)
    return rows, stats


class GraphObjective(torch.nn.Module):
    """The decoder and the two heads on its pooled states; :meth:`loss` is one micro-batch's share of
    the step's ``L`` (module docstring). ``decoder`` is the student; the heads are ``score`` (``u``) and
    ``node`` (``v``), each ``Linear(H, 1)`` drawn from a generator seeded with ``seed``."""

    def __init__(self, decoder: torch.nn.Module, *, margin: float, margin_weight: float, node_weight: float,
                 seed: int = 0):
        super().__init__()
        self.decoder = decoder
        hidden = decoder.config.hidden_size
        g = torch.Generator().manual_seed(seed)
        dtype, device = decoder.embed_tokens.dtype, decoder.embed_tokens.device
        self.score = torch.nn.Linear(hidden, 1, dtype=dtype, device=device)
        self.node = torch.nn.Linear(hidden, 1, dtype=dtype, device=device)
        with torch.no_grad():
            for head in (self.score, self.node):
                head.weight.copy_(torch.randn(1, hidden, generator=g) * hidden ** -0.5)
                head.bias.zero_()
        self.margin, self.margin_weight, self.node_weight = margin, margin_weight, node_weight
        self.sums: dict[str, torch.Tensor] = {}

    @staticmethod
    def step_counts(rows: Sequence[GraphRow]) -> tuple[int, int]:
        """``(P, J)``: the pairs and nodes of a step's rows (host ints, no device sync)."""
        return sum(r.num_pairs for r in rows), sum(r.num_nodes for r in rows)

    def terms(self, row: GraphRow, device: torch.device, gradient_checkpointing: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(token_sum, margin_sum, node_sum)`` of one row: ``sum_t w_t CE_t`` over the right nodes'
        targets, ``sum_pairs max(0, m - (s_i - s_k))`` and ``sum_j BCE(z_j, c_j)`` (0-dim tensors)."""
        input_ids, positions, labels, weights, ctx = row.to_device(device)
        hidden = forward_hidden(self.decoder, input_ids, positions, ctx, gradient_checkpointing)  # [T, H]
        if hidden.dtype == torch.float64:
            weights = weights.double()
        tokens = fused_linear_weighted_cross_entropy(hidden, self.decoder.lm_head_weight, labels, weights,
                                                     ignore_index=IGNORE_INDEX, reduction="sum")
        node_of = row.pool_node.to(device)
        count = torch.bincount(node_of, minlength=row.num_nodes).to(hidden.dtype)  # [B] response tokens per node
        pooled = torch.zeros(row.num_nodes, hidden.shape[1], dtype=hidden.dtype, device=device)
        pooled = pooled.index_add(0, node_of, hidden[row.pool_index.to(device)]) / count[:, None]  # [B, H]
        low = (torch.bfloat16, torch.float16)  # the heads' outputs in fp32 under bf16, as the token loss
        s = self.score(pooled).squeeze(-1)  # [B]
        s = s.float() if s.dtype in low else s
        pairs = row.pairs.to(device)
        margin = F.relu(self.margin - (s[pairs[:, 0]] - s[pairs[:, 1]])).sum()
        z = self.node(pooled).squeeze(-1)  # [B]
        z = z.float() if z.dtype in low else z
        node = F.binary_cross_entropy_with_logits(z, row.node_correct.to(device, z.dtype), reduction="sum")
        return tokens, margin, node

    def forward(self, row: GraphRow, device: torch.device, targets: int, pairs: int, nodes: int,
                gradient_checkpointing: bool = False) -> torch.Tensor:
        """:meth:`loss` (the module call DDP wraps)."""
        return self.loss(row, device, targets, pairs, nodes, gradient_checkpointing)

    def loss(self, row: GraphRow, device: torch.device, targets: int, pairs: int, nodes: int,
             gradient_checkpointing: bool = False) -> torch.Tensor:
        """This row's share of ``L``, with the step's counts ``N``, ``P``, ``J``; the unweighted term
        means are accumulated in :attr:`sums` for the step's metrics."""
        tokens, margin, node = self.terms(row, device, gradient_checkpointing)
        parts = {"token_loss": tokens / max(targets, 1), "margin_loss": margin / max(pairs, 1),
                 "node_loss": node / max(nodes, 1)}
        for k, v in parts.items():
            v = v.detach().double().clone()  # its own storage: summed in place over the ranks
            self.sums[k] = v if k not in self.sums else self.sums[k] + v
        loss = parts["token_loss"]
        if self.margin_weight:  # a weight of 0 leaves the head out of the graph (no gradient, no update)
            loss = loss + self.margin_weight * parts["margin_loss"]
        if self.node_weight:
            loss = loss + self.node_weight * parts["node_loss"]
        return loss

    def pop_metrics(self) -> dict[str, float]:
        """The step's term means (read on the host with the step's loss: the same sync)."""
        out = {k: float(v) for k, v in self.sums.items()}
        self.sums = {}
        return out

    def heads_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("decoder.")}


class GraphOptimizer(Optimizer):
    """:class:`~.loop.Optimizer` over a :class:`GraphObjective` (decoder and heads); its state also
    carries the heads' weights, which the Hugging Face checkpoint (the decoder alone) does not."""

    def state_dict(self) -> dict:
        return {**super().state_dict(), "heads": self.model.heads_state()}

    def load_state_dict(self, state: dict) -> None:
        if "heads" not in state:
            raise ValueError("the checkpoint has no graph heads: it was not saved by a --mode graph run")
        self.model.load_state_dict(state["heads"], strict=False)
        super().load_state_dict(state)

"""The process reward model: a decoder backbone and a scalar head read at each step's last token.

``P(step k is right) = sigmoid(w · h_k + b)`` where ``h_k [H]`` is the head's input at step ``k``'s last token
(:func:`arkfast.trajectories.encode_response` gives it the separator after the step, so it has read
the whole step and everything before it). ``PRMConfig.features`` says what that input is:

``hidden``
    the backbone's final-normed hidden state there (the backbone is fine-tuned with the head);
``logprobs``
    the :data:`LOGPROB_FEATURES` of the step: statistics of the frozen backbone's next-token
    log-probabilities of the step's tokens and of the response so far, each standardised with the
    training set's mean and standard deviation (``feature_mean``, ``feature_std``, saved with the
    head). The backbone may be the policy that wrote the trajectories (its own log-probabilities) or
    another model reading them (``prm train`` uses the R-SFT student by default);
``hidden+logprobs``
    both, concatenated (the backbone frozen).

The ``result`` features split a step at its last result-marker token (``PRMConfig.result_marker_ids``,
the tokens holding ``=``): the tokens after it are the step's result, those before its operands (a
step without one is all result). An optional projection head
``z_k = normalize(W2 relu(W1 h_k))`` feeds a supervised contrastive term during training
(:mod:`arkfast.prm.training`); scoring does not use it.

On disk a PRM is one folder::

    config.json, model.safetensors, tokenizer*.json   the backbone, a Hugging Face checkpoint
                                                      (arkfast.train.save_checkpoint)
    prm_head.safetensors                              head.weight [1, H], head.bias [1], and
                                                      projection.{0,2}.{weight,bias} when present
    prm_config.json                                   PRMConfig (what was trained on what)

written atomically (a temp folder swapped in), and read back by :func:`load_prm`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from arkfast.models import DecoderModel, VarlenContext, load_model

__all__ = ["FEATURE_SETS", "HEAD_FILE", "LOGPROB_FEATURES", "PRM_CONFIG_FILE", "PRMConfig", "ProcessRewardModel",
           "load_prm", "result_marker_ids", "save_prm"]

HEAD_FILE = "prm_head.safetensors"
PRM_CONFIG_FILE = "prm_config.json"
FEATURE_SETS = ("hidden", "logprobs", "hidden+logprobs")
# Per step k of a response, from the log-probabilities lp_t the backbone gives each of its tokens
# (``prefix`` ones are summed over steps 0..k of the trajectory):
LOGPROB_FEATURES = (
    "step_logprob",           # sum of lp_t over the step's tokens
    "step_min_logprob",       # min of lp_t over the step
    "prefix_logprob",         # sum of lp_t over the response up to the step's end
    "prefix_min_step_logprob",  # min over steps 0..k of step_logprob
    "step_number",            # k
    "step_mean_logprob",      # step_logprob / tokens in the step
    "step_entropy",           # sum over the step of the entropy of the next-token distribution
    "prefix_tokens",          # tokens of the response up to the step's end
    "result_logprob",         # sum of lp_t over the step's result tokens
    "operand_logprob",        # step_logprob - result_logprob
    "prefix_result_logprob",  # result_logprob summed over steps 0..k
    "prefix_operand_logprob",  # operand_logprob summed over steps 0..k
    "step_surprise",          # sum over the step of lp_t + entropy (0 when lp_t is as expected)
)


def result_marker_ids(tokenizer, marker: str = "=") -> list[int]:
    """The ids of the tokenizer's vocabulary entries whose text holds ``marker`` (sorted)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else tokenizer.vocab
    return sorted(i for i in vocab.values() if marker in tokenizer.decode([i]))


@dataclasses.dataclass
class PRMConfig:
    """What a saved PRM is: ``projection_dim`` (0: no contrastive projection head), the ``tokenizer``
    fingerprint its inputs were encoded with, the ``base_model`` the backbone started from, the
    ``label_source`` it was trained on (``monte-carlo``, ``monte-carlo-hard``, ``outcome``, ...), the
    ``step_mode`` of its training trajectories, the head's input ``features`` (one of
    :data:`FEATURE_SETS`, module docstring), the ``result_marker_ids`` of the log-probability features and the
    training ``targets`` (``soft`` or ``hard``, :mod:`arkfast.prm.training`)."""

    projection_dim: int = 0
    tokenizer: str | None = None
    base_model: str | None = None
    label_source: str | None = None
    step_mode: str | None = None
    features: str = "hidden"
    result_marker_ids: list[int] = dataclasses.field(default_factory=list)
    targets: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.projection_dim, int) or self.projection_dim < 0:
            raise ValueError(f"projection_dim must be an int >= 0 (0: none), got {self.projection_dim!r}")
        if self.features not in FEATURE_SETS:
            raise ValueError(f"features must be one of {', '.join(FEATURE_SETS)}, got {self.features!r}")
        self.result_marker_ids = [int(i) for i in self.result_marker_ids]

    @property
    def uses_hidden(self) -> bool:
        return self.features in ("hidden", "hidden+logprobs")

    @property
    def uses_logprobs(self) -> bool:
        return self.features in ("logprobs", "hidden+logprobs")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> PRMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**data)


class ProcessRewardModel(nn.Module):
    """``backbone`` (a :class:`DecoderModel`) + ``head`` (``Linear(H, 1)``, float32) + optionally
    ``projection`` (``Linear(H, H) → ReLU → Linear(H, P)``, float32). ``seed`` draws the heads'
    initial weights (PyTorch's default ``Linear`` init from a seeded generator)."""

    def __init__(self, backbone: DecoderModel, config: PRMConfig | None = None, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.config = config or PRMConfig()
        hidden = backbone.config.hidden_size
        device = backbone.embed_tokens.device
        n_feat = len(LOGPROB_FEATURES) if self.config.uses_logprobs else 0
        if n_feat:  # the training set's statistics (set by training); not trained
            self.feature_mean = nn.Parameter(torch.zeros(n_feat, device=device), requires_grad=False)
            self.feature_std = nn.Parameter(torch.ones(n_feat, device=device), requires_grad=False)
            self.register_buffer("marker_ids", torch.tensor(self.config.result_marker_ids, dtype=torch.int64,
                                                            device=device), persistent=False)
        fork = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(seed)
            self.head = nn.Linear((hidden if self.config.uses_hidden else 0) + n_feat, 1, device=device)
            p = self.config.projection_dim
            self.projection = (nn.Sequential(nn.Linear(hidden, hidden, device=device), nn.ReLU(),
                                             nn.Linear(hidden, p, device=device)) if p else None)

    def step_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: VarlenContext,
                    step_index: torch.Tensor, tokens=None) -> torch.Tensor:
        """``input_ids``/``positions [T]`` int64 (packed sequences, ``ctx`` their varlen layout) and
        ``step_index [S]`` int64 (the positions of the steps' last tokens) → the head's input
        ``h [S, D]`` in the heads' dtype (float32, or float64 after ``.double()``): the hidden states,
        the standardised log-probability features, or both (``config.features``). Those need
        ``tokens``, :meth:`arkfast.prm.data.StepRow.step_tokens`."""
        hidden = self.backbone(input_ids, positions, ctx)  # [T, H]
        parts = []
        if self.config.uses_logprobs:
            raw = self.logprob_features(hidden, input_ids, step_index, tokens)
            parts.append((raw - self.feature_mean) / self.feature_std)
        if self.config.uses_hidden:
            parts.append(hidden.index_select(0, step_index).to(self.head.weight.dtype))  # [S, H]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def raw_step_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: VarlenContext,
                        step_index: torch.Tensor, tokens=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(raw log-probability features [S, F] or None, hidden states [S, H] or None)``: the head's input
        before the features are standardised (what training computes its statistics from)."""
        hidden = self.backbone(input_ids, positions, ctx)  # [T, H]
        raw = self.logprob_features(hidden, input_ids, step_index, tokens) if self.config.uses_logprobs else None
        h = hidden.index_select(0, step_index).to(self.head.weight.dtype) if self.config.uses_hidden else None
        return raw, h

    def logprob_features(self, hidden: torch.Tensor, input_ids: torch.Tensor, step_index: torch.Tensor,
                        tokens) -> torch.Tensor:
        """The :data:`LOGPROB_FEATURES` ``[S, F]`` (unstandardised, heads' dtype) of the steps whose tokens
        ``tokens = (token_index [N], token_step [N], num_steps)`` lists (``num_steps``: steps per
        sequence, in order), from the backbone's ``hidden [T, H]`` over ``input_ids [T]``."""
        if tokens is None:
            raise ValueError("this PRM reads log-probability features: its inputs need each step's tokens (a StepExample "
                             "with response_start, as encode_trajectory makes)")
        tok_index, tok_step, num_steps = tokens
        n_steps = step_index.shape[0]
        dtype = self.head.weight.dtype
        logits = self.backbone.compute_logits(hidden.index_select(0, tok_index - 1)).to(dtype)  # [N, V]
        logp = torch.log_softmax(logits, dim=-1)  # [N, V]
        tok_lp = logp.gather(1, input_ids.index_select(0, tok_index)[:, None]).squeeze(1)  # [N]
        entropy = -(logp.exp() * logp).sum(1)  # [N]
        zeros = tok_lp.new_zeros(n_steps)

        def per_step(values: torch.Tensor) -> torch.Tensor:
            return zeros.index_add(0, tok_step, values)  # [S]

        step_lp = per_step(tok_lp)
        count = per_step(torch.ones_like(tok_lp))
        step_min = zeros.scatter_reduce(0, tok_step, tok_lp, "amin", include_self=False)
        marker = torch.isin(input_ids.index_select(0, tok_index), self.marker_ids)  # [N]
        last_marker = torch.full((n_steps,), -1, dtype=tok_index.dtype, device=tok_index.device)
        last_marker = last_marker.scatter_reduce(0, tok_step[marker], tok_index[marker], "amax")  # [S]
        is_result = (tok_index > last_marker.index_select(0, tok_step)).to(dtype)  # [N]
        result_lp = per_step(tok_lp * is_result)
        operand_lp = step_lp - result_lp
        sizes = list(num_steps)

        def within(values: torch.Tensor, op) -> torch.Tensor:  # op over each sequence's steps 0..k
            return torch.cat([op(part) for part in torch.split(values, sizes)])

        def cumsum(values):
            return within(values, lambda v: torch.cumsum(v, 0))

        step_number = torch.cat([torch.arange(n, dtype=dtype, device=step_lp.device) for n in sizes])
        feats = [step_lp, step_min, cumsum(step_lp), within(step_lp, lambda v: torch.cummin(v, 0).values),
                 step_number, step_lp / count, per_step(entropy), cumsum(count), result_lp, operand_lp,
                 cumsum(result_lp), cumsum(operand_lp), per_step(tok_lp + entropy)]
        return torch.stack(feats, 1)  # [S, F]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``h [S, H]`` → step logits ``[S]`` float32 (``sigmoid`` of them is P(step is right))."""
        return self.head(h).squeeze(-1)

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        """``h [S, H]`` → unit-norm projections ``[S, P]`` for the contrastive term."""
        if self.projection is None:
            raise ValueError("this PRM has no projection head (projection_dim=0)")
        return F.normalize(self.projection(h), dim=-1)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: VarlenContext,
                step_index: torch.Tensor, tokens=None) -> torch.Tensor:
        """Step logits ``[S]`` (see :meth:`step_hidden` for the inputs)."""
        return self.logits(self.step_hidden(input_ids, positions, ctx, step_index, tokens))

    def head_state(self) -> dict[str, torch.Tensor]:
        """The non-backbone tensors, by name (``head.weight``, ``feature_mean``, ``projection.0.weight``,
        ...)."""
        return {name: p for name, p in self.named_parameters() if not name.startswith("backbone.")}


def save_prm(prm: ProcessRewardModel, path: str | Path, *, tokenizer=None,
             extra_files: dict[str, str] | None = None, write_extra=None) -> Path:
    """Write ``prm`` to the folder ``path`` atomically (see the module docstring); returns ``path``.
    ``extra_files``: more text files for the folder (name → text, e.g. ``metrics.jsonl``);
    ``write_extra(folder)`` may add more files (a trainer state) before the folder is swapped in.

    The folder is built inside a temporary directory beside ``path`` (the backbone by
    :func:`arkfast.train.save_checkpoint`, then the head and the config) and renamed into place; an
    existing ``path`` is moved aside first and removed after, so a reader sees the old PRM or the new
    one, never a mix."""
    from arkfast.train import save_checkpoint  # imported here: arkfast.train pulls in the fused loss

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        config_text = json.dumps(dataclasses.asdict(prm.config), indent=2, sort_keys=True) + "\n"
        stage = save_checkpoint(prm.backbone, root / path.name, tokenizer=tokenizer,
                                extra_files={**(extra_files or {}), PRM_CONFIG_FILE: config_text})
        save_file({k: v.detach().to("cpu").contiguous() for k, v in prm.head_state().items()},
                  str(stage / HEAD_FILE), metadata={"format": "pt"})
        if write_extra is not None:
            write_extra(stage)
        for file in stage.iterdir():  # save_checkpoint's files are closed; make them durable
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(stage, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return path


def load_prm(path: str | Path, *, dtype: torch.dtype | str | None = None,
             device: torch.device | str | None = None) -> ProcessRewardModel:
    """The PRM saved in folder ``path`` by :func:`save_prm` (backbone in ``dtype``, default float32;
    heads float32), in eval mode. ``ValueError`` naming the file for a folder that is not a PRM."""
    path = Path(path)
    for name in (PRM_CONFIG_FILE, HEAD_FILE, "config.json"):
        if not (path / name).is_file():
            raise ValueError(f"{path} is not a PRM folder: no {name} (train one with python -m arkfast.prm train)")
    try:
        data = json.loads((path / PRM_CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / PRM_CONFIG_FILE}: malformed JSON ({e.msg})") from None
    config = PRMConfig.from_dict(data, str(path / PRM_CONFIG_FILE))
    prm = ProcessRewardModel(load_model(path, dtype=dtype, device=device), config)
    state = load_file(str(path / HEAD_FILE))
    expected = prm.head_state()
    if set(state) != set(expected):
        raise ValueError(f"{path / HEAD_FILE} holds {sorted(state)}, expected {sorted(expected)}")
    with torch.no_grad():
        for name, param in expected.items():
            if state[name].shape != param.shape:
                raise ValueError(f"{path / HEAD_FILE}: {name} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(param.shape)}")
            param.copy_(state[name])
    return prm.eval()

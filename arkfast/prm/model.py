"""The process reward model: a decoder backbone and a scalar head read at each step's last token.

``P(step k is right) = sigmoid(w · h_k + b)`` where ``h_k [H]`` is the backbone's final-normed hidden
state at step ``k``'s last token (:func:`arkfast.trajectories.encode_response` gives it the separator
after the step, so it has read the whole step and everything before it). An optional projection head
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

__all__ = ["HEAD_FILE", "PRM_CONFIG_FILE", "PRMConfig", "ProcessRewardModel", "load_prm", "save_prm"]

HEAD_FILE = "prm_head.safetensors"
PRM_CONFIG_FILE = "prm_config.json"


@dataclasses.dataclass
class PRMConfig:
    """What a saved PRM is: ``projection_dim`` (0: no contrastive projection head), the ``tokenizer``
    fingerprint its inputs were encoded with, the ``base_model`` the backbone started from, the
    ``label_source`` it was trained on (``monte-carlo``, ``monte-carlo-hard``, ``outcome``, ...) and
    the ``step_mode`` of its training trajectories."""

    projection_dim: int = 0
    tokenizer: str | None = None
    base_model: str | None = None
    label_source: str | None = None
    step_mode: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.projection_dim, int) or self.projection_dim < 0:
            raise ValueError(f"projection_dim must be an int >= 0 (0: none), got {self.projection_dim!r}")

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
        fork = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(seed)
            self.head = nn.Linear(hidden, 1, device=device)
            p = self.config.projection_dim
            self.projection = (nn.Sequential(nn.Linear(hidden, hidden, device=device), nn.ReLU(),
                                             nn.Linear(hidden, p, device=device)) if p else None)

    def step_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: VarlenContext,
                    step_index: torch.Tensor) -> torch.Tensor:
        """``input_ids``/``positions [T]`` int64 (packed sequences, ``ctx`` their varlen layout) and
        ``step_index [S]`` int64 (the positions of the steps' last tokens) → ``h [S, H]`` in the heads'
        dtype (float32, or float64 after ``.double()``)."""
        hidden = self.backbone(input_ids, positions, ctx)  # [T, H]
        return hidden.index_select(0, step_index).to(self.head.weight.dtype)  # [S, H]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``h [S, H]`` → step logits ``[S]`` float32 (``sigmoid`` of them is P(step is right))."""
        return self.head(h).squeeze(-1)

    def embed(self, h: torch.Tensor) -> torch.Tensor:
        """``h [S, H]`` → unit-norm projections ``[S, P]`` for the contrastive term."""
        if self.projection is None:
            raise ValueError("this PRM has no projection head (projection_dim=0)")
        return F.normalize(self.projection(h), dim=-1)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: VarlenContext,
                step_index: torch.Tensor) -> torch.Tensor:
        """Step logits ``[S]`` (see :meth:`step_hidden` for the inputs)."""
        return self.logits(self.step_hidden(input_ids, positions, ctx, step_index))

    def head_state(self) -> dict[str, torch.Tensor]:
        """The non-backbone tensors, by name (``head.weight``, ``projection.0.weight``, ...)."""
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

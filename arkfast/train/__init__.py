"""A lean training loop for arkfast models: packed (prompt, completion) rows, the fused token-weighted
cross-entropy, AdamW with a cosine schedule, atomic Hugging Face checkpoints.

Example::

    rows = pack_rows([Example(prompt_ids, completion_ids), ...], row_tokens=1024)
    model = new_model(hf_config, seed=0)              # or arkfast.models.load_model(path)
    result = train(model, rows, TrainConfig(steps=500, output_dir="ckpt"), tokenizer=tok)
"""
from .checkpoint import save_checkpoint
from .data import IGNORE_INDEX, Example, PackedRow, pack_rows
from .scratch import init_weights_, new_model
from .trainer import TrainConfig, TrainResult, evaluate, learning_rate, row_loss_sum, train

__all__ = [
    "IGNORE_INDEX", "Example", "PackedRow", "TrainConfig", "TrainResult", "evaluate", "init_weights_",
    "learning_rate", "new_model", "pack_rows", "row_loss_sum", "save_checkpoint", "train",
]

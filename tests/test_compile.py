"""torch.compile(fullgraph=True) over the kernels: a patched transformers model and arkfast's own decoder,
forward and backward, with no graph break.

Backend ``aot_eager``: it runs Dynamo (where a graph break or an untraceable read fails
``fullgraph=True``) and AOTAutograd (the joint forward/backward graph, traced with fake tensors through
each custom op's fake implementation and registered autograd), then executes the graph eagerly.
Inductor would add code generation and a C++ compile of every graph on the CPU, tens of seconds here,
and finds no graph break the two stages before it miss.
"""
from __future__ import annotations

import pytest
import torch

from arkfast.kernels import fused_linear_weighted_cross_entropy, patch_hf_model
from kernel_testing import U32, assert_close
from model_fixtures import build_tiny_checkpoint, randomize_, tiny_hf_config


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # a graph keeps the dispatch mode it was traced under
    yield
    torch._dynamo.reset()


def _hf_model(arch: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_hf_config(arch), dtype=torch.float32, attn_implementation="sdpa")
    randomize_(model, 0)
    return model.train()


def _loss_and_grads(step, model):
    model.zero_grad(set_to_none=True)
    loss = step()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(compiled, eager, name):
    # The compiled graph runs the same ATen ops as eager (aot_eager does not fuse or reorder), so the
    # results agree to a few fp32 roundings of the loss scale; 8 u32 leaves room for a decomposed op.
    (loss_c, grads_c), (loss_e, grads_e) = compiled, eager
    assert_close(loss_c, loss_e, atol=8 * U32 * loss_e.abs().item(), rtol=0.0, name=f"{name} loss")
    assert grads_c.keys() == grads_e.keys()
    for n, g in grads_c.items():
        assert_close(g, grads_e[n], atol=8 * U32 * max(1.0, grads_e[n].abs().max().item()), rtol=0.0,
                     name=f"{name} {n}")


@pytest.mark.parametrize("arch", ["llama"])
def test_patched_hf_model_compiles_fullgraph(arch):
    """References on CPU (the default dispatch): a padded-free batch through sdpa and the fused loss."""
    model = patch_hf_model(_hf_model(arch))
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :2] = -100

    def step(fn):
        return lambda: fn(input_ids=ids, labels=labels).loss

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same(_loss_and_grads(step(compiled), model), _loss_and_grads(step(model), model), arch)


def test_patched_hf_model_compiles_fullgraph_with_kernels(triton_interp):
    """Every op launched as its Triton custom op (the interpreter on CPU), on a packed row whose
    boundaries come with the batch (``cu_seq_lens_q``/``max_length_q``, as from transformers'
    DataCollatorWithFlattening or TRL's padding-free collator): varlen attention in the graph."""
    model = patch_hf_model(_hf_model("qwen3"))
    lengths = (3, 8, 5)
    ids = torch.randint(3, 300, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 3, 11, 16], dtype=torch.int32)
    labels = ids.masked_fill(position_ids == 0, -100)
    batch = {"input_ids": ids, "position_ids": position_ids, "labels": labels, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                 "max_length_q": max(lengths), "max_length_k": max(lengths)}
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same(_loss_and_grads(lambda: compiled(**batch).loss, model),
                 _loss_and_grads(lambda: model(**batch).loss, model), "kernels")


def test_arkfast_decoder_compiles_fullgraph(tmp_path, triton_interp):
    from arkfast.models import VarlenContext, load_model

    model = load_model(build_tiny_checkpoint("qwen2", tmp_path / "ckpt", tokenizer=False))
    ctx, positions = VarlenContext.from_lengths([4, 7, 2])
    ids = torch.randint(3, 300, (13,), generator=torch.Generator().manual_seed(2))
    labels = torch.cat([ids[1:], ids.new_tensor([-100])])
    labels[ctx.cu_seqlens[1:].long() - 1] = -100  # each sequence's last token predicts nothing

    def loss(fn):
        return lambda: fused_linear_weighted_cross_entropy(fn(ids, positions, ctx), model.lm_head_weight, labels)

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same(_loss_and_grads(loss(compiled), model), _loss_and_grads(loss(model), model), "decoder")

"""``arkfast.LLM``: the inference engine's front door (vLLM's interface, a nano-vllm-sized engine).

One request's path: :meth:`LLM.add_request` tokenizes and validates it into a :class:`Sequence` →
each :meth:`LLM.step` asks the :class:`Scheduler` for a batch (continuous batching, chunked prefill,
preemption), the :class:`BlockManager` having placed its tokens in KV blocks (prefix cache,
copy-on-write) → the :class:`ModelRunner` runs the model over the batch and samples → the step appends
the new tokens, checks EOS / stop strings / lengths and returns the requests that finished.
"""
from __future__ import annotations

import itertools
import time
from collections.abc import Container, Mapping
from collections.abc import Sequence as SequenceABC
from pathlib import Path

import torch

from arkfast.models import ModelConfig, load_model, load_tokenizer
from arkfast.models.config import parse_dtype

from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .model_runner import ModelRunner, choose_num_kv_blocks
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Logprob, RequestOutput, Sequence


class LLM:
    """An offline inference engine over a local Hugging Face checkpoint.

    ``model``: a checkpoint directory of a supported architecture (Llama, Qwen2, Qwen3, Mistral).
    ``dtype``: ``torch.dtype`` or its name; ``device``: ``torch.device`` or string; by default CUDA and
    bfloat16 when a GPU is present, else CPU and float32 (``ValueError`` for a device this machine does
    not have). ``seed`` seeds the draws of requests without their own. ``engine_options`` are the
    fields of :class:`EngineConfig` (``block_size``, ``num_kv_blocks``, ``kv_cache_memory``,
    ``gpu_memory_utilization``, ``max_num_seqs``, ``max_num_batched_tokens``, ``enable_prefix_caching``,
    ``cascade``, ``enforce_eager``, ``max_model_len``).

    Example::

        llm = LLM("path/to/Qwen2.5-0.5B-Instruct")
        outs = llm.generate(["2 + 2 =", "The capital of France is"],
                            SamplingParams(temperature=0.0, max_tokens=16))
        print(outs[0].outputs[0].text, llm.stats)

    Incremental use (a debate driver keeps every agent of every problem in flight)::

        rid = llm.add_request(prompt, params)
        while llm.has_unfinished_requests():
            for out in llm.step():     # the requests that finished during this step
                ...                    # e.g. submit that problem's next round
    """

    def __init__(self, model: str | Path, *, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, seed: int = 0, **engine_options):
        self.config = EngineConfig.from_options(**engine_options)
        self.device = device = _resolve_device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # Triton launches kernels on the current device
        self.dtype = parse_dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.model_config = ModelConfig.from_pretrained(model)
        limit = self.model_config.max_context
        if self.config.max_model_len is not None and self.config.max_model_len > limit:
            raise ValueError(f"max_model_len={self.config.max_model_len} exceeds the {limit} tokens the model "
                             f"computes exactly (max_position_embeddings / sliding_window)")
        self.max_model_len = self.config.max_model_len or limit
        self.model = load_model(model, self.dtype, device).eval().requires_grad_(False)
        self.tokenizer = _try_load_tokenizer(model)
        num_blocks = choose_num_kv_blocks(self.config, self.model, self.dtype, device, self.max_model_len)
        self.block_manager = BlockManager(num_blocks, self.config.block_size, self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.config, self.block_manager)
        self.runner = ModelRunner(self.model, self.config, num_blocks, self.max_model_len, device, self.dtype,
                                  seed)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self._requests: dict[str, Sequence] = {}            # unfinished, by request id
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._held: list[RequestOutput] = []                # finished inside generate(), not its own
        self._ids = itertools.count()
        self._counts = {"prompt_tokens": 0, "generated_tokens": 0, "steps": 0}

    def __repr__(self) -> str:
        return (f"LLM({self.model_config.architecture}, {self.dtype}, {self.device}, "
                f"max_model_len={self.max_model_len}, kv_blocks={self.block_manager.num_blocks}x"
                f"{self.config.block_size})")

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def stats(self) -> dict:
        """Cumulative counters: ``prompt_tokens``, ``cached_prompt_tokens`` (served from the prefix cache
        at admission), ``generated_tokens``, ``steps``, ``preemptions``, ``cascade_steps`` (decode steps
        whose plan chose cascade attention) and ``prefix_cache_hit_rate`` (cached / prompt tokens)."""
        prompt, cached = self._counts["prompt_tokens"], self.scheduler.num_cached_prompt_tokens
        return {**self._counts, "cached_prompt_tokens": cached, "preemptions": self.scheduler.num_preemptions,
                "cascade_steps": self.runner.num_cascade_steps,
                "prefix_cache_hit_rate": cached / prompt if prompt else 0.0}

    def update_weights(self, weights: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Copy new weights into the engine's model in place, with no disk round trip: ``weights`` is a
        :class:`~arkfast.models.DecoderModel` of the same architecture (a trainer's in-memory model, any
        device or dtype: values are cast on copy) or a mapping of its parameter names to tensors.

        Every prefix-cache entry is dropped (its K/V came from the old weights), so nothing computed
        before the call is reused after it. The copy is in place, so captured CUDA graphs stay valid.
        ``RuntimeError`` while requests are in flight (their cached K/V would mix two models);
        ``ValueError`` naming a missing, unexpected or mis-shaped tensor."""
        if self.has_unfinished_requests():
            raise RuntimeError(f"update_weights with {len(self._requests)} request(s) in flight; finish or "
                               f"abort them first")
        source = dict(weights.named_parameters()) if isinstance(weights, torch.nn.Module) else dict(weights)
        params = dict(self.model.named_parameters())
        missing, unexpected = sorted(params.keys() - source.keys()), sorted(source.keys() - params.keys())
        if missing or unexpected:
            raise ValueError(f"update_weights: missing {missing or 'none'}, unexpected {unexpected or 'none'} "
                             f"(expected the parameter names of the engine's DecoderModel)")
        for name, param in params.items():
            if tuple(source[name].shape) != tuple(param.shape):
                raise ValueError(f"update_weights: {name} has shape {tuple(source[name].shape)}, expected "
                                 f"{tuple(param.shape)}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(source[name].detach())
        self.block_manager.reset_prefix_cache()

    # ------------------------------------------------------------------------------------------------
    # Requests
    # ------------------------------------------------------------------------------------------------
    def _make_sequence(self, prompt: str | SequenceABC[int], params: SamplingParams | None,
                       request_id: str | None, taken: Container[str] = frozenset()) -> Sequence:
        """Validate and tokenize a request; ``taken``: ids to avoid besides those in flight."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer; the checkpoint has none: pass token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, SequenceABC) and all(isinstance(t, int) and not isinstance(t, bool)
                                                     for t in prompt):
            text, ids = None, list(prompt)
        else:
            raise TypeError(f"a prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) > self.max_model_len:
            raise ValueError(f"the prompt is {len(ids)} tokens long, longer than the context window of "
                             f"{self.max_model_len} tokens (max_model_len)")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the model's vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; the checkpoint has none")
        if request_id is None:
            request_id = next(str(i) for i in self._ids if str(i) not in self._requests and str(i) not in taken)
        elif request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        return Sequence(str(request_id), text, ids, params, time.monotonic())

    def _submit(self, seq: Sequence) -> str:
        self._requests[seq.request_id] = seq
        if seq.params.stop:
            self._detokenizers[seq.request_id] = IncrementalDetokenizer(self.tokenizer, seq.params.stop)
        self._counts["prompt_tokens"] += seq.num_prompt_tokens
        self.scheduler.add(seq)
        return seq.request_id

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request (a string, or token ids); returns its id (``request_id`` or a fresh one).
        ``ValueError`` for an empty prompt, one longer than ``max_model_len``, or an id in flight."""
        return self._submit(self._make_sequence(prompt, params, request_id))

    def abort_request(self, request_id: str) -> None:
        """Drop a queued or running request; it produces no output. Unknown ids are ignored."""
        if self.scheduler.abort(request_id):
            self._requests.pop(request_id, None)
            self._detokenizers.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    # ------------------------------------------------------------------------------------------------
    # Stepping
    # ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the requests that finished during it (and any that finished
        while :meth:`generate` ran but were not its own)."""
        outputs, self._held = self._held, []
        if not self.scheduler.has_unfinished():
            return outputs
        batch = self.scheduler.schedule()
        if batch.is_empty:
            raise RuntimeError(f"no request could be scheduled ({len(self.scheduler.waiting)} waiting, "
                               f"{len(self.scheduler.running)} running, {self.block_manager.num_free_blocks} "
                               f"free KV blocks): the KV cache is too small")
        try:
            sampled, tokens, logprobs = self.runner.run(batch)
        except BaseException:  # e.g. Ctrl-C mid-step: the engine stays usable and its cache correct
            self.scheduler.rollback(batch)
            raise
        self.scheduler.finish_step(batch)
        self._counts["steps"] += 1
        self._counts["generated_tokens"] += len(tokens)
        now = time.monotonic()
        for i, (seq, token) in enumerate(zip(sampled, tokens)):
            seq.token_ids.append(token)
            if logprobs is not None and logprobs[i] is not None:
                seq.output_logprobs.append({t: Logprob(lp, rank) for t, (lp, rank) in logprobs[i].items()})
            if seq.metrics.first_token_time is None:
                seq.metrics.first_token_time = now
            reason = self._finish_reason(seq, token)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                seq.metrics.finished_time = now
                detok = self._detokenizers.pop(seq.request_id, None)
                if detok is not None and detok.stopped:
                    seq.text = detok.text
                elif self.tokenizer is not None:
                    seq.text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
                del self._requests[seq.request_id]
                outputs.append(seq.to_output())
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if token in self.eos_token_ids and not params.ignore_eos:
            return "stop"
        detok = self._detokenizers.get(seq.request_id)
        if detok is not None and detok.update(seq.output_token_ids) is not None:
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def generate(self, prompts: str | SequenceABC[str] | SequenceABC[SequenceABC[int]],
                 sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None, *,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for every prompt (strings or token-id lists); ``sampling_params`` is one
        :class:`SamplingParams` for all or one per prompt (default: ``SamplingParams()``). Returns one
        :class:`RequestOutput` per prompt, in order. Requests added with :meth:`add_request` keep
        running alongside; those that finish meanwhile are returned by the next :meth:`step`."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        elif not isinstance(sampling_params, SequenceABC):
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them (one per prompt), "
                            f"got {type(sampling_params).__name__}")
        sampling_params = list(sampling_params)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts")
        seqs: list[Sequence] = []  # validate every prompt before queueing any
        taken: set[str] = set()
        for prompt, params in zip(prompts, sampling_params):
            seqs.append(self._make_sequence(prompt, params, None, taken))
            taken.add(seqs[-1].request_id)
        for seq in seqs:
            self._submit(seq)
        order = {seq.request_id: i for i, seq in enumerate(seqs)}
        results: list[RequestOutput | None] = [None] * len(seqs)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(seqs), desc="generate", unit="req")
        remaining = len(seqs)
        try:
            while remaining:
                for out in self.step():
                    if out.request_id in order and results[order[out.request_id]] is None:
                        results[order[out.request_id]] = out
                        remaining -= 1
                        if bar is not None:
                            bar.update(1)
                    else:
                        self._held.append(out)
        except BaseException:  # e.g. Ctrl-C: leave none of this call's requests running in the engine
            for seq in seqs:
                if results[order[seq.request_id]] is None:
                    self.abort_request(seq.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        return results


def _resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device`` with an index on CUDA; ``ValueError`` for a malformed name or a
    CUDA device this machine does not have (rather than an error deep inside the weight loading)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch.device or a name like 'cpu', 'cuda', 'cuda:1'; got "
                         f"{device!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but CUDA is not available here "
                             f"(torch {torch.__version__}); use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} was asked for, but only {torch.cuda.device_count()} "
                             f"CUDA device(s) are visible")
    elif device.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return device


def _try_load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, or None when it ships none (token-id prompts still work)."""
    try:
        return load_tokenizer(path)
    except (OSError, ValueError, TypeError, KeyError):
        return None

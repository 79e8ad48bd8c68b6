"""Teacher-cache settings (alm_pipeline.pipeline.teacher_cache) without Ray: the top-k approximation is part of
the cache identity; the GPU-ready defaults, --concurrency MIN,MAX and --vllm-executor."""

from __future__ import annotations

import json
import re

import pytest

from alm_pipeline.pipeline.corpus import CorpusConfig
from alm_pipeline.pipeline.ray_utils import RayConfig
from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig, TeacherCacheError, build_teacher_cache


def test_topk_cache_is_not_mixed_with_an_exact_one(tmp_path, gpt2_bl_model):
    """The approximation is part of the cache identity: an exact cache refuses a topk run and vice versa."""
    data = tmp_path / "c.jsonl"
    data.write_text(json.dumps({"id": "a", "text": "some text"}) + "\n")
    out = tmp_path / "cache"
    out.mkdir()
    base = {
        "teacher": str(gpt2_bl_model),
        "corpus": CorpusConfig(path=str(data), id_field="id"),
        "output": str(out),
        "engine": "vllm",
        "ray": RayConfig(num_cpus=2),
        "dtype": "float32",  # explicit: nothing is left to resolve on a cluster, so Ray is not started
        "num_gpus_per_actor": 0.0,
    }
    exact = TeacherCacheConfig(**base)
    topk = TeacherCacheConfig(**base, boundary_mode="topk", boundary_topk=8)
    assert topk.identity_settings()["boundary_mode"] == "topk:8"
    assert "boundary_mode" not in exact.identity_settings()
    # an existing exact manifest with the same corpus/teacher: the topk run is refused before scoring
    manifest = {
        "kind": "alm-teacher-cache",
        "format_version": 1,
        "state": "in_progress",
        "identity": {"settings": exact.identity_settings()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        TeacherCacheError, match=r"settings\.boundary_mode: cache has None, this run has 'topk:8'"
    ):
        build_teacher_cache(topk)


def test_auto_dtype_and_gpus_per_actor_resolve_from_the_cluster():
    """--dtype auto and the default --num-gpus-per-actor: bfloat16 and one GPU per replica on a cluster with GPUs,
    float32 and none without; explicit values are kept; the identity holds the resolved dtype, so a default run on
    CPU has the identity a cache written with --dtype float32 had."""
    config = TeacherCacheConfig()
    assert (config.dtype, config.num_gpus_per_actor) == ("auto", None)
    with pytest.raises(ValueError, match="--dtype auto is resolved on the cluster first"):
        config.identity_settings()
    cpu, gpu = config.resolved(0), config.resolved(8)
    assert (cpu.dtype, cpu.num_gpus_per_actor) == ("float32", 0.0)
    assert (gpu.dtype, gpu.num_gpus_per_actor) == ("bfloat16", 1.0)
    assert cpu.identity_settings() == TeacherCacheConfig(dtype="float32").identity_settings()
    assert gpu.identity_settings()["dtype"] == "bfloat16"
    explicit = TeacherCacheConfig(dtype="float16", num_gpus_per_actor=0.5).resolved(8)
    assert (explicit.dtype, explicit.num_gpus_per_actor) == ("float16", 0.5)
    assert TeacherCacheConfig(dtype="float32", num_gpus_per_actor=0).resolved(8).num_gpus_per_actor == 0
    # tensor parallelism decides without the cluster: mp replicas own their GPUs, ray ones reserve none
    assert TeacherCacheConfig(engine="vllm", tensor_parallel_size=4).resolved(8).num_gpus_per_actor == 4
    ray_tp = TeacherCacheConfig(engine="vllm", tensor_parallel_size=4, vllm_executor="ray")
    assert ray_tp.num_gpus_per_actor == ray_tp.resolved(8).num_gpus_per_actor == 0
    assert TeacherCacheConfig(engine="vllm", vllm_executor="ray").resolved(8).num_gpus_per_actor == 0
    assert gpu.runtime_settings() == {
        "concurrency": "1",
        "num_gpus_per_actor": 1.0,
        "num_cpus_per_actor": 1.0,
    }


@pytest.mark.parametrize(
    ("value", "low", "high", "text"),
    [(1, 1, 1, "1"), ("8", 8, 8, "8"), ("2,6", 2, 6, "2,6"), (" 3 , 3 ", 3, 3, "3"), (4, 4, 4, "4")],
)
def test_concurrency_is_n_or_min_max(value, low, high, text):
    config = TeacherCacheConfig(concurrency=value)
    assert (config.min_concurrency, config.max_concurrency, config.concurrency) == (low, high, text)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "--concurrency must be an integer >= 1 or MIN,MAX (integers >= 1), got '0'"),
        ("x", "--concurrency must be an integer >= 1 or MIN,MAX (integers >= 1), got 'x'"),
        ("1,2,3", "--concurrency must be an integer >= 1 or MIN,MAX"),
        ("0,4", "--concurrency must be an integer >= 1 or MIN,MAX"),
        ("4,2", "--concurrency MIN,MAX needs MIN <= MAX, got '4,2'"),
        (True, "--concurrency must be an integer >= 1 or MIN,MAX"),
        (2.5, "--concurrency must be an integer >= 1 or MIN,MAX"),
    ],
)
def test_bad_concurrency_is_refused_naming_the_option(value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TeacherCacheConfig(concurrency=value)


def test_the_actor_pool_follows_concurrency_with_two_shards_in_flight():
    """(MIN, MAX) = (N, N) is a fixed pool, else an autoscaling one; each actor gets two shards in flight."""
    from alm_pipeline.pipeline.teacher_cache import _actor_pool

    fixed, scaling = _actor_pool(3, 3), _actor_pool(1, 4)
    assert (fixed.min_size, fixed.max_size, fixed.max_tasks_in_flight_per_actor) == (3, 3, 2)
    assert (scaling.min_size, scaling.max_size, scaling.initial_size) == (1, 4, 1)


def test_vllm_executor_ray_reserves_no_gpu_in_the_actor(tmp_path, gpt2_bl_model):
    """--vllm-executor ray: the engine gets distributed_executor_backend="ray" (vLLM's placement group holds the
    TP GPUs), and a scoring actor asked to reserve GPUs itself is refused naming the options. (Configuration
    only: this path has not run on GPUs.)"""
    from alm_pipeline.pipeline.engine_vllm import llm_kwargs
    from alm_pipeline.pipeline.teacher_cache import _engine_config

    settings = {"seed": 0, "max_model_len": 64, "max_num_batched_tokens": 256, "max_num_seqs": 8}
    settings.update(enforce_eager=True, gpu_memory_utilization=0.85)
    # topk and a cluster address: neither vLLM's import nor its presence here is needed to build the arguments
    ray = RayConfig(address="auto")
    base = {"engine": "vllm", "dtype": "bfloat16", "max_length": 64, "tensor_parallel_size": 4, "ray": ray}
    base.update(boundary_mode="topk", boundary_topk=4)
    ray_tp = TeacherCacheConfig(**base, vllm_executor="ray").resolved(8)
    engine = _engine_config(ray_tp, str(gpt2_bl_model))
    assert (engine.executor, engine.tensor_parallel_size, engine.dtype) == ("ray", 4, "bfloat16")
    kwargs = llm_kwargs(engine, settings)
    assert kwargs["distributed_executor_backend"] == "ray" and kwargs["tensor_parallel_size"] == 4
    mp = _engine_config(TeacherCacheConfig(**base).resolved(8), str(gpt2_bl_model))
    assert llm_kwargs(mp, settings)["distributed_executor_backend"] == "mp"
    one = _engine_config(
        TeacherCacheConfig(engine="vllm", boundary_mode="topk", ray=ray).resolved(0), str(gpt2_bl_model)
    )
    assert "distributed_executor_backend" not in llm_kwargs(one, settings)
    with pytest.raises(
        TeacherCacheError, match="--vllm-executor ray: .* leave --num-gpus-per-actor unset or 0"
    ):
        _engine_config(
            TeacherCacheConfig(**base, vllm_executor="ray", num_gpus_per_actor=4), str(gpt2_bl_model)
        )
    with pytest.raises(TeacherCacheError, match="pass --num-gpus-per-actor 4"):
        _engine_config(TeacherCacheConfig(**base, num_gpus_per_actor=1), str(gpt2_bl_model))
    with pytest.raises(ValueError, match="unknown --vllm-executor 'slurm'"):
        TeacherCacheConfig(vllm_executor="slurm")

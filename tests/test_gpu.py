"""GPU tier (`pytest -m gpu`, run on a lent GPU machine): the CUDA paths agree with the CPU.

Skipped where CUDA is absent. The results of the last run on a GPU machine are recorded
in benchmarks/results/ (see README)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import tiny_with_kv_heads
from mp.jobs import job_env, launch, mpiexec, run_job, scenario_env

HERE = Path(__file__).parent
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _tp_tokens(device: str) -> dict:
    sys.path.insert(0, str(HERE))
    from engine_scenarios import tp_tokens

    from kvdist.comm import init_distributed

    topo = init_distributed(device=device)
    return tp_tokens(topo)


def test_cuda_tp1_tokens_match_cpu() -> None:
    """float32 on CUDA gives the CPU's greedy and sampled tokens (TP 1)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = _tp_tokens("cpu")
    cuda = _tp_tokens("cuda")
    assert cuda["greedy"]["tokens"] == cpu["greedy"]["tokens"]
    assert cuda["sampled"]["tokens"] == cpu["sampled"]["tokens"]
    assert cuda["greedy"]["graph_steps"] > 0 and cpu["greedy"]["graph_steps"] == 0


def test_cuda_decode_graphs_match_eager() -> None:
    """Decode steps replayed from CUDA graphs give the eager engine's tokens, over batch
    sizes and context lengths that cross several buckets (requests finish at different
    steps, contexts grow past 8 and 16 blocks)."""
    from kvdist.engine.llm import LLM
    from kvdist.engine.sampling import SamplingParams

    torch.backends.cuda.matmul.allow_tf32 = False
    prompts = [list(range(5 + i, 5 + i + 20 + 13 * i)) for i in range(12)]
    params = [SamplingParams(max_tokens=40 + 20 * (i % 4)) for i in range(12)]
    runs = {}
    for graphs in (True, False):
        llm = LLM("tiny", dtype="float32", device="cuda", num_blocks=256, cuda_graphs=graphs)
        outs = llm.generate(prompts, params)
        runs[graphs] = ([o.output_token_ids for o in outs], llm.stats)
        llm.shutdown()
    assert runs[True][0] == runs[False][0]
    st = runs[True][1]
    assert st["cuda_graph_steps"] > 50 and st["cuda_graphs_captured"] >= 4, st
    assert runs[False][1]["cuda_graph_steps"] == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_tp2_nccl_tokens_match_cpu(tmp_path) -> None:
    """TP 2 over NCCL on two GPUs gives the CPU's tokens, and every scenario passes."""
    cpu = _tp_tokens("cpu")
    out = tmp_path / "gpu2.json"
    job = run_job(
        mpiexec(2, str(HERE / "mp" / "engine_worker.py"), "all", str(out), "cuda"),
        scenario_env(),
        timeout_s=600,
    )
    assert job.returncode == 0, job.output[-5000:]
    results = json.loads(out.read_text())
    for r in results["tp_tokens"]:
        assert r["greedy"]["tokens"] == cpu["greedy"]["tokens"]
        assert r["sampled"]["tokens"] == cpu["sampled"]["tokens"]
        assert r["greedy"]["graph_steps"] > 0  # decode steps replayed CUDA graphs, NCCL in them
    for r in results["async_lifecycle"]:
        assert r["second"]["tokens"] == r["base"]["tokens"]
    for r in results["load_failure"]:
        assert r["sync"]["tokens"] == r["base"]["tokens"]
        assert r["async"]["tokens"] == r["base"]["tokens"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_tp2_builtin_connectors_end_to_end(tmp_path) -> None:
    """disk (written and read back), cpu and tiered through the engine on two GPUs: the
    side-stream transfers give the tokens of a run that loaded nothing."""
    out = tmp_path / "conn.json"
    env = scenario_env(KVDIST_TEST_CACHE_DIR=str(tmp_path / "cache"))
    results = {}
    for name in ("disk_write", "disk_read", "cpu_roundtrip", "tiered_roundtrip"):
        worker = str(HERE / "mp" / "engine_worker.py")
        job = run_job(mpiexec(2, worker, f"connectors:{name}", str(out), "cuda"), env, 300)
        assert job.returncode == 0, job.output[-5000:]
        results[name] = json.loads(out.read_text())[name]
    base = results["disk_write"][0]["tokens"]
    assert [r["tokens"] for r in results["disk_read"]] == [base, base]
    assert results["disk_read"][0]["external"][:4] == [32] * 4
    for r in results["cpu_roundtrip"]:
        assert r["second"] == r["base"] and r["external"][:4] == [32] * 4
    for r in results["tiered_roundtrip"]:
        assert r["second"]["tokens"] == r["first"]["tokens"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_tp2_replicated_kv_head_disk_round_trip(tmp_path) -> None:
    """One KV head over two GPUs (replicated on both): only rank 0 writes records, and a
    second engine loads them on both ranks and gives the tokens of a run without
    connector. A failure means the replicas' KV differ over NCCL, or a replica loads
    what it should not."""
    model = str(tiny_with_kv_heads(tmp_path / "model", 1))
    env = scenario_env(KVDIST_TEST_CACHE_DIR=str(tmp_path / "cache"), KVDIST_TEST_MODEL=model)
    out = tmp_path / "replicated.json"
    results = {}
    for name in ("no_connector", "disk_write", "disk_read"):
        worker = str(HERE / "mp" / "engine_worker.py")
        job = run_job(mpiexec(2, worker, f"connectors:{name}", str(out), "cuda"), env, 300)
        assert job.returncode == 0, job.output[-5000:]
        results[name] = json.loads(out.read_text())[name]
    base = results["no_connector"][0]["tokens"]
    assert [r["io"]["blocks_saved"] > 0 for r in results["disk_write"]] == [True, False]
    for r in results["disk_write"] + results["disk_read"]:
        assert r["tokens"] == base
    assert all(r["external"][:4] == [32] * 4 for r in results["disk_read"])


@pytest.mark.parametrize(
    "ranks",
    [
        1,
        pytest.param(
            2, marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
        ),
    ],
)
def test_engine_integration_example_on_cuda(ranks: int) -> None:
    """The engine-integration example with its KV cache on each rank's GPU and the hooks on
    the compute stream: the second engine loads the saved blocks, and every rank's KV is
    what computing it writes."""
    example = str(HERE.parent / "examples" / "engine_integration.py")
    job = run_job(launch(ranks, example), job_env(), timeout_s=300)
    assert job.returncode == 0, job.output[-4000:]
    assert "new engine, same cache: 7 tokens computed, 92 loaded" in job.output, job.output
    assert f"ranks: {ranks} (cuda); KV loaded on every rank matches" in job.output, job.output

"""The GPU check's smoke mode: the same code as the GPU run, tiny models and data on the CPU.

Timing is the benchmark's business; these tests check what can be wrong on any machine: every
section reports its figures, the precisions of the training loop see the same weights and
batches (on the CPU autocast is off, so their losses must be identical), the full-size
evaluation equals the dense references, the run did the steps it planned, the projection is its
formula, and a failing or late section becomes a row instead of stopping the check.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F

from benchmarks import eval_scale, gpu_check
from utils.metrics import eval_func


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu.md"
    results = gpu_check.main(["--smoke", "--out", str(out)])
    raw = json.loads(out.with_suffix(".json").read_text())
    return results, out.read_text(), raw


def test_every_section_reports_without_failures(smoke):
    results, md, raw = smoke
    assert raw["failures"] == [] and "### Failures" not in md
    assert raw["order"] == list(gpu_check.SECTIONS)
    assert set(raw["sections"]) == set(gpu_check.SECTIONS)
    assert set(raw) == {"header", "order", "sections", "failures", "seconds", "wall_s"}
    assert raw["header"]["device"] == "CPU" and raw["header"]["smoke"] is True
    assert md.startswith("## GPU check: CPU (smoke run")
    for section in gpu_check.SECTIONS.values():
        assert f"\n### {section.title}\n" in md
    assert all(s > 0 for s in raw["seconds"].values())
    assert results["sections"].keys() == raw["sections"].keys()


def test_gpu_tests_counted(smoke):
    tests = smoke[2]["sections"]["tests"]
    files = gpu_check.gpu_test_files(os.path.join(gpu_check.ROOT, "tests"))
    assert {"tests/test_metrics.py", "tests/test_reranking.py"} <= set(files)
    assert tests["command"] == "python -m pytest -q -m gpu " + " ".join(files)
    assert tests["failed"] == tests["errors"] == 0 and tests["failing"] == []
    assert tests["passed"] + tests["skipped"] >= 2  # at least the metrics and re-ranking ones
    if not torch.cuda.is_available():
        assert tests["passed"] == 0


def test_train_step_rows(smoke):
    rows = smoke[2]["sections"]["train_step"]["rows"]
    assert [(r["arch"], r["dtype"]) for r in rows] == [
        ("ViT-T-16-test", "fp32"),
        ("RN-T-test", "fp32"),
    ]
    for r in rows:
        assert r["images_per_s"] > 0 and r["step_flops"] > r["forward_flops"] > 0
        assert f"| {r['arch']} | fp32 | 8 | {r['images_per_s']:.1f} |" in smoke[1]


def test_options_rows_against_the_plain_path(smoke):
    sections = smoke[2]["sections"]
    base = {r["arch"]: r for r in sections["train_step"]["rows"]}
    rows = sections["options"]["rows"]
    assert [(r["arch"], r["option"]) for r in rows] == list(gpu_check.SMOKE.option_rows)
    for r in rows:
        others = {"grad_checkpointing", "channels_last", "compile"} - {r["option"]}
        assert r[r["option"]] is True and not any(r[k] for k in others)
        assert "plain_images_per_s" not in r  # ours only
        assert r["baseline_images_per_s"] == base[r["arch"]]["images_per_s"]
        assert f"| {r['arch']} | fp32 | {r['option']} | {r['images_per_s']:.1f} |" in smoke[1]
    cl, ckpt = rows
    # Channels-last changes the layout, not the work; checkpointing recomputes the checkpointed
    # blocks' forward in the backward: more step FLOPs, at most one more forward.
    assert cl["step_flops"] == base["RN-T-test"]["step_flops"]
    vit = base["ViT-T-16-test"]
    assert vit["step_flops"] < ckpt["step_flops"] <= vit["step_flops"] + vit["forward_flops"]


def test_amp_precisions_share_weights_and_batches(smoke):
    rows = smoke[2]["sections"]["amp"]["rows"]
    assert [(r["arch"], r["dtype"]) for r in rows] == [
        (a, d) for a in ("ViT-T-16-test", "RN-T-test") for d in ("fp32", "bf16", "fp16")
    ]
    for r in rows:
        assert r["ok"] and r["steps"] == 2 and r["img_per_s"] > 0
        assert not r["scaler"] and r["scaler_skips"] == 0  # no fp16 scaler off CUDA
        # CPU: autocast is off, so every precision repeats fp32's epoch exactly.
        assert r["loss_rel_diff"] == 0.0 and math.isfinite(r["loss"])
    assert rows[0]["loss"] != rows[3]["loss"]  # the two backbones differ


def test_loader_against_step_rates(smoke):
    loader = smoke[2]["sections"]["loader"]
    steps = smoke[2]["sections"]["train_step"]["rows"]
    assert [r["workers"] for r in loader["rows"]] == [0, 2]
    assert all(r["img_per_s"] > 0 and r["batches"] >= 3 for r in loader["rows"])
    assert loader["demand_dtype"] == "fp32"  # train_step ran fp32 only
    assert loader["demand"] == {r["arch"]: r["images_per_s"] for r in steps}
    top = max(loader["demand"].values())
    keeping_up = [r["workers"] for r in loader["rows"] if r["img_per_s"] >= top]
    assert loader["workers_needed"] == (min(keeping_up) if keeping_up else None)
    assert loader["starved"] is None  # the recipe's 8 workers were not measured


def test_eval_equals_dense_references(smoke):
    ev = smoke[2]["sections"]["eval"]
    assert [a["kind"] for a in ev["agreement"]] == ["plain", "rerank"]
    for a in ev["agreement"]:  # CPU against CPU: exactly equal
        assert a["ok"] and a["same_topk"] == 1.0
        assert a["d_mAP"] == a["d_mINP"] == a["d_cmc"] == a["d_topk_dist"] == 0.0
    nq, ng = gpu_check.SMOKE.eval_limit
    assert (ev["queries"], ev["gallery"]) == (nq, ng)
    qf, gf, qp, gp, qc, gc = eval_scale.make_features("small", gpu_check.SMOKE.eval_dim)
    qf, gf = F.normalize(qf[:nq], dim=1), F.normalize(gf[:ng], dim=1)
    ids = (qp[:nq], gp[:ng], qc[:nq], gc[:ng])
    cmc, m_ap = eval_func(torch.cdist(qf, gf).square().numpy(), *ids)
    assert ev["plain"]["mAP"] == pytest.approx(m_ap, abs=1e-6)
    assert ev["plain"]["rank1"] == pytest.approx(cmc[0], abs=1e-6)
    rr = ev["rerank"]
    dense = eval_scale.dense_rerank_reference(
        qf.numpy(), gf.numpy(), rr["k1"], rr["k2"], rr["lambda"]
    )
    # The official-style reference keeps V in float16: about 1e-4 apart.
    assert ev["reranked"]["mAP"] == pytest.approx(eval_func(dense, *ids)[1], abs=1e-3)
    assert ev["reranked"]["time_s"] > 0 and ev["plain"]["peak_mem_gb"] > 0


def test_two_stage_run_and_projection(smoke):
    run, md = smoke[2]["sections"]["two_stage"], smoke[1]
    s1, s2 = run["stage1"], run["stage2"]
    assert not run["interrupted"]
    assert (s1["epochs_done"], s2["epochs_done"]) == (s1["epochs"], s2["epochs"])
    assert run["steps_done"] == run["steps_planned"]
    assert (
        run["steps_done"]
        == s1["epochs"] * s1["steps_per_epoch"] + s2["epochs"] * s2["steps_per_epoch"]
    )
    # 8 train IDs x 4 images, batch 16: 2 steps per epoch in both stages; 10 steps planned.
    assert (s1["steps_per_epoch"], s2["steps_per_epoch"], run["steps_planned"]) == (2, 2, 10)
    assert len(s1["epoch_times_s"]) == s1["epochs"] - 1
    assert s1["step_s"] == pytest.approx(s1["epoch_s"] / 2)
    assert s1["cache_s"] > 0 and s1["cache_img_per_s"] == pytest.approx(32 / s1["cache_s"])
    assert len(s2["img_per_s_epochs"]) == s2["epochs"] and s2["img_per_s"] > 0
    assert 0 <= run["final"]["mAP"] <= 1
    p = run["projection"]
    n = 32_621  # MSMT17 train images
    hand = n / p["r_cache"] + 120 * 510 * p["t1"] + 60 * 509 * 64 / p["r2"]
    assert (p["r_cache"], p["t1"], p["r2"]) == (
        s1["cache_img_per_s"],
        s1["step_s"],
        s2["img_per_s"],
    )
    assert p["total_h"] == pytest.approx(hand / 3600)
    assert f"**{p['total_h']:.2f} h**" in md


def test_failures_and_time_limit_become_rows(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("no | device")

    def slow(ctx):
        time.sleep(ctx.remaining() + 0.05)  # its deadline is the check's time limit
        return {"figure": 1}

    sections = gpu_check.SECTIONS
    monkeypatch.setitem(sections, "tests", dataclasses.replace(sections["tests"], run=broken))
    amp = gpu_check.Section("amp stub", slow, lambda r: f"figure {r['figure']}")
    monkeypatch.setitem(sections, "amp", amp)
    out = tmp_path / "part.md"
    args = ["--smoke", "--sections", "eval", "tests", "amp", "--time-limit", "2"]
    results = gpu_check.main([*args, "--out", str(out)])
    assert results["order"] == ["tests", "amp", "eval"]  # the check's own order
    failures = {f["section"]: f["error"] for f in results["failures"]}
    # tests failed and amp still ran; amp ran past the time limit, so eval was skipped.
    assert failures["tests"] == "RuntimeError: no | device"
    assert results["sections"] == {"amp": {"figure": 1}}
    assert failures["eval"].startswith("SectionSkipped: the check's 2 s time limit")
    md = out.read_text()
    assert "| tests | RuntimeError: no / device |" in md
    assert "figure 1" in md and md.count("Not available: ") == 2
    assert json.loads(out.with_suffix(".json").read_text())["sections"] == {"amp": {"figure": 1}}


def test_interrupt_after_raises_at_the_deadline():
    # Python's own SIGINT handler for the test (whatever an earlier test left installed).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        start = time.perf_counter()
        with pytest.raises(KeyboardInterrupt), gpu_check.interrupt_after(0.05):
            time.sleep(5)  # a blocking call: the signal must interrupt it
        assert time.perf_counter() - start < 2
        with gpu_check.interrupt_after(0.05):
            pass
        time.sleep(0.1)  # cancelled: no signal arrives after the block
    finally:
        signal.signal(signal.SIGINT, previous)


def test_run_script_checks_imports_then_runs_the_check(tmp_path):
    # benchmarks/gpu_run.sh as on the GPU machine (no wheels to install here): the versions and
    # the import check come first, then the check writes its files into OUT_DIR.
    import subprocess
    import sys

    script = os.path.join(gpu_check.ROOT, "benchmarks", "gpu_run.sh")
    env = {**os.environ, "PYTHON": sys.executable, "CLIPREID_WHEELS": str(tmp_path / "none")}
    out = tmp_path / "out"
    argv = ["bash", script, "run", str(out), "--smoke", "--sections", "eval"]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    log = (out / "gpu.log").read_text()
    assert f"torch {torch.__version__.split('+')[0]}" in log and "imports: ok" in log
    assert log.index("imports: ok") < log.index("gpu_check: eval")
    raw = json.loads((out / "gpu.json").read_text())
    assert raw["order"] == ["eval"] and raw["failures"] == []
    assert (out / "gpu.md").read_text().startswith("## GPU check: CPU (smoke run")
    usage = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "bash benchmarks/gpu_run.sh wheels" in usage.stdout

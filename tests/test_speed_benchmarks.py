"""The speed benchmarks run (tiny models) and report consistent figures.

Timing itself is the benchmarks' business; these tests check what can be wrong regardless of the
machine: both stage-1 variants compute the same loss, the train-step benchmark returns every
figure, and its FLOP count of the ViT forward equals the hand formula.
"""

from __future__ import annotations

import pytest

from benchmarks import stage1_speed, train_step

ROW_KEYS = {
    "images_per_s",
    "step_s",
    "peak_mem_gb",
    "forward_flops",
    "step_flops",
    "achieved_tflops",
    "mfu",
}


def test_stage1_variants_agree_and_report_both_times(capsys):
    out = stage1_speed.main(
        ["--model", "ViT-T-16-test", "--num-ids", "40", "--num-images", "300", "--iters", "1"]
    )
    assert out["max_loss_diff"] < 1e-5
    assert (out["context"], out["prompt_length"], out["epoch_iters"]) == (77, 12, 5)
    assert 1 <= out["mean_unique_ids"] <= 64
    for variant in ("ours", "official"):
        assert out[f"{variant}_s"] > 0
        assert out[f"{variant}_epoch_s"] == pytest.approx(5 * out[f"{variant}_s"])
    assert out["speedup"] == pytest.approx(out["official_s"] / out["ours_s"])
    printed = capsys.readouterr().out
    assert "official" in printed and "speed-up" in printed


@pytest.fixture(scope="module")
def smoke_rows():
    return train_step.main(["--smoke", "--device", "cpu"])


def test_train_step_smoke_reports_every_figure(smoke_rows):
    assert [(r["arch"], r["dtype"]) for r in smoke_rows] == [
        ("ViT-T-16-test", "fp32"),
        ("RN-T-test", "fp32"),
    ]
    for row in smoke_rows:
        for key in ROW_KEYS:
            assert row[key] > 0, key
            assert row[f"plain_{key}"] > 0, key
        assert row["overhead"] == pytest.approx(row["plain_images_per_s"] / row["images_per_s"])
        assert row["mfu"] == pytest.approx(row["achieved_tflops"] / row["peak_tflops"])
        # Backward costs about twice the forward: a step counts 2x to 3x its forward.
        assert 2.0 < row["step_flops"] / row["forward_flops"] < 3.2
    assert "measured" in smoke_rows[0]["peak_source"]


def test_train_step_vit_forward_flops_match_hand_formula(smoke_rows):
    """Tiny ViT (width 64, 2 blocks, patch 16, 256x128 -> 128 patches + CLS), batch 8."""
    row = smoke_rows[0]
    b, n, d, layers, patch, e, c = 8, 129, 64, 2, 16, 32, 751
    patch_embed = 2 * b * (n - 1) * d * 3 * patch * patch
    # Per block: QKV, output projection and the 4x MLP (24 N D^2), QK^T and AV (4 N^2 D).
    blocks = layers * (24 * b * n * d * d + 4 * b * n * n * d)
    heads = 2 * b * d * e + 2 * b * d * c + 2 * b * e * c  # proj, both classifiers
    hand = patch_embed + blocks + heads
    assert row["forward_flops"] == pytest.approx(hand, rel=0.05)
    # The plain tower has no classifiers: the same formula without them.
    assert row["plain_forward_flops"] == pytest.approx(hand - 2 * b * (d + e) * c, rel=0.05)


def test_peak_table_and_cpu_attention_counted():
    import torch

    assert train_step.peak_tflops(torch.device("cpu"), "fp32")[1] == "measured fp32 matmul"
    # Variants by name, the more specific first (the NVL and PCIe cards are slower).
    peak = train_step.published_peak
    assert peak("NVIDIA H200", "bf16") == peak("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert peak("NVIDIA H200 NVL", "bf16") == peak("NVIDIA H100 NVL", "bf16") == 835.5
    assert peak("NVIDIA H100 PCIe", "tf32") == 378.0
    assert peak("NVIDIA GeForce RTX 4090", "bf16") is None
    q = torch.randn(2, 3, 10, 8, requires_grad=True)
    flops = train_step.count_flops(
        lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()
    )
    product = 2 * 2 * 3 * 10 * 10 * 8  # one [10 x 8] @ [8 x 10] per batch entry and head
    # Forward: QK^T and AV; backward: the scores again, then four gradient products.
    assert flops == 2 * product + 5 * product

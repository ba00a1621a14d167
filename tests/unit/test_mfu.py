"""MFU arithmetic: PaLM's FLOPs per token and the peak table."""

import pytest

from torchloom.mfu import mfu, peak_flops, transformer_flops_per_token


def test_flops_per_token_is_6n_plus_attention():
    # GPT-3 175B's figures in PaLM's Appendix B: 6N dominates, attention adds 12·L·H·Q·T
    f = transformer_flops_per_token(
        non_embedding_params=175_000_000_000, layers=96, heads=96, head_dim=128, context=2048
    )
    assert f == 6 * 175e9 + 12 * 96 * 96 * 128 * 2048


def test_peaks_by_device_name_longest_match_first():
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("AMD Instinct MI300X") == 1307e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops(None) is None and peak_flops("Intel Xeon") is None


def test_mfu_needs_a_peak():
    assert mfu(tokens_per_s=1000.0, flops_per_token=1e9, peak=1e12) == pytest.approx(1.0)
    assert mfu(tokens_per_s=1000.0, flops_per_token=1e9, peak=None) is None

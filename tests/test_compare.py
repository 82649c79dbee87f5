"""lords compare's driver on a tiny model: one row per (method, codebook), the LoRDS rows quantized with the codebook
their name says."""

import pytest
import torch

from lords.eval import compare


def test_lords_methods_run_once_per_codebook(tiny_llama, monkeypatch):
    used = []
    quantize = compare.quantize

    def recording_quantize(model, config, **kwargs):
        used.append(config.codebook)
        return quantize(model, config, **kwargs)

    monkeypatch.setattr(compare, "quantize", recording_quantize)
    rows = compare.run_comparison(tiny_llama, lambda model: 1.0, None, bits_list=(4,), steps=2,
                                  methods=("nf-rtn", "lords"), codebooks=("nf", "int"), device="cpu",
                                  log=lambda _: None)
    assert [row.method for row in rows] == ["fp32", "nf-rtn", "lords", "lords-int"]
    assert used == ["nf", "int"]
    # the two codebooks quantize differently: nonzero, unequal weight errors
    assert rows[2].weight_error > 0 and rows[3].weight_error > 0 and rows[2].weight_error != pytest.approx(
        rows[3].weight_error, rel=1e-6)
    # the codebook changes the levels, not the storage: same codes and scales per weight
    assert rows[2].bits_per_weight == rows[3].bits_per_weight > 4


def test_gptq_rows_store_what_they_say_and_need_calibration(tiny_llama):
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    rows = compare.run_comparison(tiny_llama, lambda model: 1.0, ids, bits_list=(3,), block_size=32, steps=2,
                                  methods=("lords-aware", "lords-gptq", "gptq-g64"), device="cpu", log=lambda _: None)
    assert [row.method for row in rows] == ["fp32", "lords-aware", "lords-gptq", "gptq-g64"]
    assert rows[2].bits_per_weight == rows[1].bits_per_weight  # the same B, A storage, other codes
    assert rows[3].bits_per_weight == 3 + 16 / 64  # an fp16 absmax per group of 64
    assert all(row.weight_error > 0 for row in rows[1:])
    with pytest.raises(ValueError, match="method gptq-g128 needs calibration data"):
        compare.run_comparison(tiny_llama, lambda model: 1.0, None, bits_list=(3,), methods=("gptq-g128",),
                               device="cpu", log=lambda _: None)

"""lords compare's driver on a tiny model: one row per (method, codebook), the LoRDS rows quantized with the codebook
their name says."""

import pytest

from lords.eval import compare


def test_lords_methods_run_once_per_codebook(tiny_llama, monkeypatch):
    used = []
    quantize = compare.quantize

    def recording_quantize(model, config, **kwargs):
        used.append(config.codebook)
        return quantize(model, config, **kwargs)

    monkeypatch.setattr(compare, "quantize", recording_quantize)
    rows = compare.run_comparison(tiny_llama, lambda model: 1.0, None, bits_list=(4,), steps=2,
                                  methods=("nf-rtn", "lords"), codebooks=("nf", "int"), device="cpu", log=lambda _: None)
    assert [row.method for row in rows] == ["fp32", "nf-rtn", "lords", "lords-int"]
    assert used == ["nf", "int"]
    # the two codebooks quantize differently: nonzero, unequal weight errors
    assert rows[2].weight_error > 0 and rows[3].weight_error > 0 and rows[2].weight_error != pytest.approx(
        rows[3].weight_error, rel=1e-6)
    # the codebook changes the levels, not the storage: same codes and scales per weight
    assert rows[2].bits_per_weight == rows[3].bits_per_weight > 4

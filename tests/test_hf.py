"""expert_parallel.hf: transformers MoE families made expert-parallel equal the unmodified model."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import expert_parallel as ep
from tests.hf_models import FAMILIES, tiny_model
from tests.procs import ROOT, torchrun

pytest.importorskip("transformers")


@pytest.mark.parametrize("family", FAMILIES)
def test_one_process_logits_and_aux_loss_equal_the_unmodified_model(family: str) -> None:
    ref = tiny_model(family)
    model = ep.hf.expert_parallelize(copy.deepcopy(ref))
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, want = model(idx, output_router_logits=True), ref(idx, output_router_logits=True)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-6)
    if getattr(want, "aux_loss", None) is not None:  # families and versions without one: DeepSeek
        torch.testing.assert_close(out.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-7)
    blocks = [m for m in model.modules() if isinstance(m, ep.hf.ExpertParallelBlock)]
    if getattr(want, "router_logits", None) is not None:  # recording still sees every router, alike
        assert len(out.router_logits) == len(want.router_logits) == len(blocks) > 0
        for got, expected in zip(out.router_logits, want.router_logits, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("world", "ep_size"), [(2, 2), (4, 4), (4, 2)], ids=["ep2", "ep4", "ep2xdp2"])
def test_expert_parallel_equals_the_unmodified_model(world: int, ep_size: int, tmp_path: Path) -> None:
    """Logits, aux loss, a training step, DeepSeek's bias update and save_pretrained -> plain
    from_pretrained, on real process groups."""
    out = torchrun(world, "hf_equivalence.py", "--ep-size", str(ep_size), "--save", str(tmp_path),
                   timeout=600)
    assert f"ALL OK {len(FAMILIES)} families with {world} ranks, ep_size {ep_size}" in out, out[-3000:]


def test_fully_shard_trains_every_family_like_the_unmodified_model() -> None:
    """ep.hf.expert_parallelize then ep.fully_shard at EP 2 x DP 2: one SGD step on the global batch
    equals the unmodified model's (every parameter; experts as this rank's slice)."""
    out = torchrun(4, "hf_equivalence.py", "--ep-size", "2", "--fully-shard", timeout=600)
    assert f"ALL OK {len(FAMILIES)} families with 4 ranks, ep_size 2" in out, out[-3000:]


def test_generate_gives_the_unmodified_tokens_when_ranks_stop_at_different_steps(tmp_path: Path) -> None:
    """Different max_new_tokens, prompt lengths under one max_length, an EOS one rank reaches first:
    no argument from the user, the unmodified model's tokens on every rank (Mixtral, Qwen3-MoE,
    DeepSeek-V3, and a model read by ep.hf.from_pretrained)."""
    out = torchrun(2, "hf_generate.py", str(tmp_path / "saved"), timeout=300)
    assert out.count("ALL OK") == 2, out[-3000:]


def test_a_model_without_moe_blocks_is_refused() -> None:
    import transformers as tf
    model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4))
    families = r".*".join(sorted(FAMILIES))  # every supported family is named
    with pytest.raises(ValueError, match=rf"model_type 'llama' has no MoE block.*{families}"):
        ep.hf.expert_parallelize(model)


def test_without_transformers_the_import_names_the_extra() -> None:
    code = ("import sys; sys.modules['transformers'] = None\n"
            "try:\n    import expert_parallel.hf\nexcept ImportError as err:\n    print('refused:', err)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert 'pip install "expert-parallel[hf]"' in out, out


PLAIN_LOAD = """
import sys
sys.modules["expert_parallel"] = None  # plain transformers only
import torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
bias = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
logits = model(torch.arange(16)[None]).logits
print("loaded", model.config.model_type, bool(torch.isfinite(logits).all()),
      "bias trained", bool(bias) and all(bool(b.abs().sum() > 0) for b in bias))
"""


def test_finetune_example_under_torchrun_saves_for_plain_transformers(tmp_path: Path) -> None:
    out = tmp_path / "ft"
    log = torchrun(2, ROOT / "examples" / "finetune_hf.py", "--family", "deepseek_v3", "--steps", "16",
                   "--eval-every", "8", "--log-every", "4", "--out", str(out), timeout=300)
    assert "2 rank(s) launched by torchrun, ep_size 2" in log, log[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 17)) and "val_loss" in records[7]
    assert sum(r["loss"] for r in records[-4:]) / 4 < records[0]["loss"] - 0.5  # it learns
    assert len(records[0]["max_violation"]) == 1 and (out / "max_violation.png").exists()
    loaded = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(out / "model")], capture_output=True,
                            text=True, timeout=120, check=True).stdout
    assert "loaded deepseek_v3 True bias trained True" in loaded, loaded


def test_finetune_example_runs_as_one_process(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune_hf.py"), "--steps", "3",
                          "--eval-every", "3", "--no-plots", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    assert "qwen3_moe: 2 MoE blocks, 1 rank(s) launched by none" in out
    assert (tmp_path / "model" / "config.json").exists()
    # summary.json: the routing and the active parameters, counted on the unmodified model (K of E
    # experts of every expert tensor, everything else whole)
    import transformers

    from expert_parallel.apps.finetune_hf import tiny_config

    summary = json.loads((tmp_path / "summary.json").read_text())
    config = tiny_config("qwen3_moe")
    E, K = config.num_experts, config.num_experts_per_tok
    plain = transformers.AutoModelForCausalLM.from_config(config)
    active = sum(p.numel() * K // E if ".mlp.experts." in name else p.numel()
                 for name, p in plain.named_parameters())
    assert (summary["top_k"], summary["num_experts"], summary["router"]) == (2, 8, "topk")
    assert summary["active_parameters"] == active < sum(p.numel() for p in plain.parameters())


def test_checkpoints_of_these_models_reshard_across_ep_sizes(tmp_path: Path) -> None:
    """ep.save_checkpoint at EP 2 -> ep.load_checkpoint at EP 4 and in one process: the weights (the
    trained DeepSeek bias included) bitwise, and a further AdamW step equal (moments resharded)."""
    saved = torchrun(2, "hf_checkpoint.py", "save", str(tmp_path), "--ep-size", "2")
    assert "ALL OK save with 2 ranks" in saved
    loaded = torchrun(4, "hf_checkpoint.py", "load", str(tmp_path), "--ep-size", "4")
    assert "ALL OK load with 4 ranks" in loaded
    one = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "hf_checkpoint.py"), "load",
                          str(tmp_path), "--ep-size", "1"], capture_output=True, text=True, timeout=300)
    assert "ALL OK load with 1 ranks" in one.stdout, one.stdout[-2000:] + one.stderr[-2000:]


def test_finetune_example_under_the_deepspeed_launcher_matches_torchrun(tmp_path: Path) -> None:
    """The same fine-tuning run under DeepSpeed's launcher gives torchrun's losses."""
    from tests.procs import run
    from tests.test_launchers import free_port, require
    args = ["--family", "qwen3_moe", "--steps", "4", "--eval-every", "4", "--no-plots"]
    script = str(ROOT / "examples" / "finetune_hf.py")
    torchrun(2, ROOT / "examples" / "finetune_hf.py", *args, "--out", str(tmp_path / "torchrun"))
    log = run([require("deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), script, *args,
               "--out", str(tmp_path / "deepspeed")], timeout=300, env={"DS_ACCELERATOR": "cpu"})
    assert "launched by deepspeed" in log, log[-2000:]
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").open()]
              for name in ("torchrun", "deepspeed")}
    assert len(losses["torchrun"]) == 4
    for a, b in zip(losses["torchrun"], losses["deepspeed"], strict=True):
        assert abs(a - b) < 1e-5, losses


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_deepseek_bias_stays_float32_and_shared_when_the_model_is_cast(family: str) -> None:
    model = ep.hf.expert_parallelize(tiny_model(family)).train().to(torch.bfloat16)
    (block,) = [b for b in model.modules() if isinstance(b, ep.hf.ExpertParallelBlock)]
    assert block.gate.e_score_correction_bias.dtype == torch.float32
    assert block.moe.router.expert_bias is block.gate.e_score_correction_bias
    assert block.moe.router.weight is block.gate.weight
    idx = torch.arange(16)[None] % 64
    model(idx, labels=idx).loss.backward()
    before = block.gate.e_score_correction_bias.clone()
    ep.update_expert_bias(model)  # a bf16 bias would swallow these 1e-3 steps
    step = (block.gate.e_score_correction_bias - before).abs()
    assert (((step - 1e-3).abs() < 1e-6) | (step == 0)).all() and (step > 0).sum() >= 4, step


def test_from_pretrained_with_tied_embeddings(tmp_path: Path) -> None:
    import transformers as tf

    from tests.hf_models import tiny_config
    config = tiny_config("qwen3_moe")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    plain = tf.AutoModelForCausalLM.from_config(config).eval()
    plain.save_pretrained(tmp_path)
    loaded = ep.hf.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    idx = torch.arange(16)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, plain(idx).logits, rtol=1e-5, atol=1e-6)


def test_gpt_oss_block_returns_the_router_scores_and_shares_the_router() -> None:
    """gpt-oss's MLP returns (y, router top-k scores); the router's weight and bias stay ours through a
    cast, and train: one step moves the model's own router bias."""
    ref = tiny_model("gpt_oss")
    model = ep.hf.expert_parallelize(copy.deepcopy(ref))
    block, want = model.model.layers[0].mlp, ref.model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        (y, scores), (y_ref, scores_ref) = block(x), want(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(scores, scores_ref) and scores.shape == (10, 2)
    model.to(torch.float64)
    assert block.moe.router.weight is block.router.weight and block.moe.router.bias is block.router.bias
    assert block.router.bias.dtype == torch.float64
    before = block.router.bias.detach().clone()
    idx = torch.arange(16)[None] % 64
    model.train()(idx, labels=idx).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not torch.equal(block.router.bias, before)


def test_quantized_gpt_oss_experts_are_refused_by_from_pretrained(tmp_path: Path) -> None:
    """gpt-oss's released checkpoints hold MXFP4 experts (*_blocks, *_scales): a clear ValueError."""
    from safetensors.torch import load_file, save_file
    tiny_model("gpt_oss").save_pretrained(tmp_path)
    (file,) = tmp_path.glob("*.safetensors")
    tensors = load_file(file)
    for key in [k for k in tensors if k.endswith("experts.gate_up_proj")]:
        tensors[key + "_blocks"] = tensors.pop(key).to(torch.uint8)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"quantised .*gate_up_proj_blocks.*Mxfp4Config\(dequantize=True\)"):
        ep.hf.from_pretrained(tmp_path)


def test_finetune_flags_give_the_plain_runs_losses_and_a_loadable_model(tmp_path: Path) -> None:
    """finetune-hf at EP 2 x DP 2 with --fsdp / --ddp, transformers' gradient checkpointing and
    --grad-accum 2: the losses of the plain run (sync_gradients, one batch); the sharded run's
    save_pretrained loads in plain transformers."""
    args = ["--family", "deepseek_v3", "--steps", "3", "--eval-every", "3", "--no-plots", "--ep-size", "2"]
    forms = {"plain": [], "fsdp": ["--fsdp", "--activation-checkpointing", "--grad-accum", "2"],
             "ddp": ["--ddp", "--grad-accum", "2"]}
    losses = {}
    for name, extra in forms.items():
        torchrun(4, ROOT / "examples" / "finetune_hf.py", *args, *extra, "--out", str(tmp_path / name),
                 timeout=300)
        losses[name] = [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").open()]
    for name in ("fsdp", "ddp"):
        for a, b in zip(losses[name], losses["plain"], strict=True):
            assert abs(a - b) < 1e-4 * b, (name, losses)
    loaded = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "fsdp" / "model")],
                            capture_output=True, text=True, timeout=120, check=True).stdout
    assert "loaded deepseek_v3 True bias trained True" in loaded, loaded


MTP_KEYS = {"deepseek_v3": ["model.layers.61.embed_tokens.weight", "model.layers.61.eh_proj.weight",
                            "model.layers.61.mlp.experts.0.gate_proj.weight"],
            "glm4_moe": ["model.layers.46.eh_proj.weight", "model.layers.46.enorm.weight",
                         "model.layers.46.mlp.experts.0.up_proj.weight"],
            "qwen3_next": ["mtp.fc.weight", "mtp.norm.weight", "mtp.layers.0.mlp.experts.0.down_proj.weight"]}


@pytest.mark.parametrize("family", list(MTP_KEYS))
def test_from_pretrained_skips_what_transformers_skips(family: str, tmp_path: Path) -> None:
    """Released DeepSeek-V3, GLM-4.5 and Qwen3-Next files carry multi-token-prediction layers that
    the model class tells transformers to ignore: both loaders skip them and agree on every weight."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    (file,) = tmp_path.glob("*.safetensors")
    tensors = load_file(file)
    for key in MTP_KEYS[family]:
        tensors[key] = torch.randn(4, 4)
    save_file(tensors, file, metadata={"format": "pt"})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    ours = ep.hf.from_pretrained(tmp_path)
    mine = ep.hf.hf_state_dict(ours)
    for name, value in plain.state_dict().items():
        assert torch.equal(mine[name], value), name


@pytest.mark.parametrize("how", ["fp8 block scale", "quantization_config"])
def test_quantized_checkpoints_are_refused_with_the_recipe(how: str, tmp_path: Path) -> None:
    """An FP8 block scale among the tensors, or a quantization_config in config.json: one message
    naming the format and the dequantise-first recipe (before: the scale was loaded without a word)."""
    import json

    from safetensors.torch import load_file, save_file
    tiny_model("deepseek_v3").save_pretrained(tmp_path)
    if how == "fp8 block scale":
        (file,) = tmp_path.glob("*.safetensors")
        tensors = load_file(file)
        tensors["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"] = torch.ones(1, 1)
        save_file(tensors, file, metadata={"format": "pt"})
        match = r"quantised \(FP8 \(block scales\): .*_scale_inv\).*FineGrainedFP8Config\(dequantize=True\)"
    else:
        config = json.loads((tmp_path / "config.json").read_text())
        config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        (tmp_path / "config.json").write_text(json.dumps(config))
        match = r"quantised \(its config has a quantization_config \(quant_method 'fp8'\)\).*dequantize"
    with pytest.raises(ValueError, match=match):
        ep.hf.from_pretrained(tmp_path)


def test_ignore_patterns_skip_only_tensors_the_model_does_not_have(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """GLM-4.5's pattern for its MTP layer 92 also names its real layer 46: a pattern that matches a
    real layer (here layer 1 of the tiny model) must not drop that layer's tensors."""
    import transformers as tf
    from transformers import AutoModelForCausalLM
    tiny_model("glm4_moe").save_pretrained(tmp_path)
    monkeypatch.setattr(tf.Glm4MoeForCausalLM, "_keys_to_ignore_on_load_unexpected", [r"model\.layers\.1.*"])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    mine = ep.hf.hf_state_dict(ep.hf.from_pretrained(tmp_path))
    layer1 = [name for name in plain.state_dict() if name.startswith("model.layers.1.")]
    assert layer1
    for name, value in plain.state_dict().items():
        assert torch.equal(mine[name], value), name


def test_streamed_save_keeps_each_rank_near_its_own_experts(tmp_path: Path) -> None:
    """save_pretrained of a 64-expert × 8-layer Qwen3-MoE at EP 2 (examples/export_memory.py): the
    peak host memory a save adds is at most 4 layers' experts on rank 0 (it gathers one block at a
    time) and 1.5 on rank 1 (it sends its own rows: one layer's slice converted), where gathering
    the whole model adds 14 layers per rank; plain transformers loads the directory, every tensor
    equal to the model's (checked by the program)."""
    out = torchrun(2, ROOT / "examples" / "export_memory.py", "--method", "stream",
                   "--json", str(tmp_path / "memory.json"), timeout=300)
    rows = {r["rank"]: r for r in json.loads((tmp_path / "memory.json").read_text())}
    assert sorted(rows) == [0, 1], out[-3000:]
    layers = {rank: r["extra_bytes"] / r["layer_bytes"] for rank, r in rows.items()}
    assert layers[0] <= 4.0 and layers[1] <= 1.5, layers


def test_streamed_save_writes_a_shard_per_block_that_safetensors_reads(tmp_path: Path) -> None:
    """One process: replicated tensors and each block's experts in shards of their own, an index
    naming every tensor once, each file read by safetensors' own reader equal to transformers'
    save of the unmodified model; a save with fewer shards than the last leaves no stale one."""
    from safetensors import safe_open

    ref = tiny_model("qwen3_moe")
    model = ep.hf.expert_parallelize(copy.deepcopy(ref))
    ref.save_pretrained(tmp_path / "plain")
    ep.hf.save_pretrained(model, tmp_path / "ours")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    blocks = sum(isinstance(m, ep.hf.ExpertParallelBlock) for m in model.modules())
    assert len(files) == 1 + blocks and files[0].endswith(f"-of-{len(files):05d}.safetensors")

    def read(directory: Path) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name in sorted(p.name for p in directory.glob("*.safetensors")):
            with safe_open(str(directory / name), "pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        return tensors

    ours, plain = read(tmp_path / "ours"), read(tmp_path / "plain")
    assert sorted(ours) == sorted(plain) == sorted(index["weight_map"])
    for key, value in plain.items():
        assert torch.equal(ours[key], value), key
    ep.hf.save_pretrained(model, tmp_path / "ours", max_shard_size=1)  # a file per tensor
    assert len(list((tmp_path / "ours").glob("*.safetensors"))) == len(plain)
    ep.hf.save_pretrained(model, tmp_path / "ours")  # back to a file per block: no stale shard left
    again = sorted(p.name for p in (tmp_path / "ours").glob("*.safetensors"))
    assert again == files and sorted(read(tmp_path / "ours")) == sorted(plain)
    with pytest.raises(ValueError, match="max_shard_size"):
        ep.hf.save_pretrained(model, tmp_path / "bad", max_shard_size=0)


def test_each_block_takes_its_logits_from_the_family_router(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router's logits are not computed a second time (after the first call's bitwise check);
    a router that returns probabilities instead (transformers 5.5) is detected and the logits are
    computed again: both give the unmodified model's output."""
    ref = tiny_model("qwen3_moe")
    model = ep.hf.expert_parallelize(copy.deepcopy(ref))
    blocks = [m for m in model.modules() if isinstance(m, ep.hf.ExpertParallelBlock)]
    calls = []
    original = ep.hf.ExpertParallelBlock._logits
    def counted(self: ep.hf.ExpertParallelBlock, x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return original(self, x)

    monkeypatch.setattr(ep.hf.ExpertParallelBlock, "_logits", counted)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(idx).logits
        for _ in range(3):
            torch.testing.assert_close(model(idx).logits, want, rtol=1e-5, atol=1e-6)
    assert len(calls) == len(blocks) and all(b.router_gives_logits for b in blocks)

    probs_model = ep.hf.expert_parallelize(copy.deepcopy(ref))
    for block in (m for m in probs_model.modules() if isinstance(m, ep.hf.ExpertParallelBlock)):
        router = block.family_router()
        forward = router.forward
        router.forward = lambda x, forward=forward: (forward(x)[0].float().softmax(-1), *forward(x)[1:])
    calls.clear()
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(probs_model(idx).logits, want, rtol=1e-5, atol=1e-6)
    assert len(calls) == 3 * len(blocks)  # the first call's check, then once per call

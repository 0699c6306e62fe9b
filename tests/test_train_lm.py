"""The main job: the LM trained expert-parallel under torchrun writes metrics and plots, its loss
falls, and its loss curve equals the single-process run's on the same global batches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import expert_parallel as ep
from tests.procs import ROOT, run, torchrun

ARGS = ["--steps", "16", "--eval-every", "8", "--eval-batches", "2", "--batch-size", "8",
        "--seq-len", "64", "--d-model", "64", "--n-layers", "2", "--log-every", "4"]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_train_write_metrics_and_plots_and_match_one_process(tmp_path: Path) -> None:
    ep_out, single_out = tmp_path / "ep2", tmp_path / "single"
    log = torchrun(2, ROOT / "examples" / "train_lm.py", *ARGS, "--ep-size", "2", "--out", str(ep_out))
    assert "2 rank(s) launched by torchrun, ep_size 2" in log
    for name in ("metrics.jsonl", "summary.json", "loss.png", "expert_load.png", "dropped.png",
                 "max_violation.png", "traffic.png"):
        path = ep_out / name
        assert path.stat().st_size > 0, name
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    ep_recs = records(ep_out)
    assert [r["step"] for r in ep_recs] == list(range(1, 17))
    assert sum(r["loss"] for r in ep_recs[-4:]) / 4 < ep_recs[0]["loss"] - 0.5  # the loss falls
    assert all(len(r["expert_counts"]) == 2 and len(r["expert_counts"][0]) == 8 for r in ep_recs)
    summary = json.loads((ep_out / "summary.json").read_text())
    assert summary["final_loss"] < summary["initial_loss"]
    # The same global batches in one process: the same loss curve (float tolerance).
    run([sys.executable, str(ROOT / "examples" / "train_lm.py"), *ARGS, "--out", str(single_out),
         "--no-plots"], timeout=300)
    single = records(single_out)
    for a, b in zip(ep_recs, single, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4 * max(1.0, b["loss"]), (a["step"], a["loss"], b["loss"])
        assert a["expert_counts"] == b["expert_counts"], a["step"]
        if "val_loss" in b:
            assert abs(a["val_loss"] - b["val_loss"]) < 1e-4 * b["val_loss"]


def test_same_seed_same_results_run_to_run(tmp_path: Path) -> None:
    """Determinism on CPU with gloo: two runs with the same seed give bitwise identical metrics."""
    args = ["--steps", "6", *ARGS[2:], "--ep-size", "2", "--no-plots", "--capacity-factor", "none"]
    for name in ("a", "b"):
        torchrun(2, ROOT / "examples" / "train_lm.py", *args, "--out", str(tmp_path / name))
    drop = ("tokens_per_s",)
    a = [{k: v for k, v in r.items() if k not in drop} for r in records(tmp_path / "a")]
    b = [{k: v for k, v in r.items() if k not in drop} for r in records(tmp_path / "b")]
    assert a == b


def test_modern_routing_options_train_at_equal_active_parameters(tmp_path: Path) -> None:
    """The routing suite's recipes (tests the flags end to end in one process): the DeepSeek-V3 recipe
    (sigmoid, bias, a shared expert, top-3 of 2 of 4 groups, sequence loss) has the active parameters
    of softmax top-4; a step moves the expert bias and logs MaxVio per layer."""
    import argparse

    import torch.distributed as dist

    from expert_parallel.apps import compare, train

    def args_for(variant: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        train.add_arguments(parser)
        overrides = compare.ROUTING_VARIANTS[variant]
        args = parser.parse_args(["--batch-size", "2", "--seq-len", "16", "--d-model", "32",
                                  "--n-layers", "2", "--steps", "2", "--eval-every", "100",
                                  "--out", str(tmp_path / variant)])
        return argparse.Namespace(**{**vars(args), **overrides})

    active = {}
    for variant in ("softmax_aux", "deepseek_v3"):
        run = train.setup(args_for(variant))
        try:
            active[variant] = run.model.active_parameters_per_token()
            records = [train.train_step(run, step) for step in (1, 2)]
            moes = [m for m in run.model.modules() if isinstance(m, ep.MoE)]
            assert len(records[-1]["max_violation"]) == len(moes) == 2
            if variant == "deepseek_v3":
                cfg = moes[0].cfg
                recipe = (cfg.score_func, cfg.top_k, cfg.num_shared_experts, cfg.num_limited_groups)
                assert recipe == ("sigmoid", 3, 1, 2)
                assert all(m.router.expert_bias.abs().sum() > 0 for m in moes)  # the bias trained
                assert cfg.load_balance_coef == 0 and cfg.seq_aux_loss_coef == 1e-4
        finally:
            dist.destroy_process_group()
    assert active["softmax_aux"] == active["deepseek_v3"], active


def test_traffic_split_by_link_class() -> None:
    """The traffic plot's totals: the diagonal is a rank's copy to itself, same-node pairs are
    intra-node, the rest inter-node (2 nodes of 2 ranks)."""
    from expert_parallel.apps.plots import traffic_by_class
    matrix = [[float(10 * i + j) for j in range(4)] for i in range(4)]
    split = traffic_by_class(matrix, per_node=2)
    assert split["self"] == sum(matrix[i][i] for i in range(4))
    assert split["intra"] == matrix[0][1] + matrix[1][0] + matrix[2][3] + matrix[3][2]
    assert split["inter"] == sum(map(sum, matrix)) - split["self"] - split["intra"]
    assert traffic_by_class(matrix, per_node=4)["inter"] == 0.0


def test_composition_flags_give_the_plain_runs_numbers(tmp_path: Path) -> None:
    """--fsdp / --ddp with --activation-checkpointing and --grad-accum 2 at EP 2 x DP 2 compute the
    loss curve of the plain run (sync_gradients, no checkpointing, one batch); --meta-init trains
    (another initialisation: torch's layers draw nothing on the meta device)."""
    args = ["--steps", "6", *ARGS[2:], "--ep-size", "2", "--no-plots", "--balance", "bias",
            "--eval-every", "6"]
    forms = {"plain": [], "fsdp": ["--fsdp", "--activation-checkpointing", "--grad-accum", "2"],
             "ddp": ["--ddp", "--activation-checkpointing", "--grad-accum", "2"],
             "meta": ["--fsdp", "--meta-init"]}
    for name, extra in forms.items():
        torchrun(4, ROOT / "examples" / "train_lm.py", *args, *extra, "--out", str(tmp_path / name))
    plain = records(tmp_path / "plain")
    for name in ("fsdp", "ddp"):
        for a, b in zip(records(tmp_path / name), plain, strict=True):
            assert abs(a["loss"] - b["loss"]) < 1e-4 * b["loss"], (name, a["step"], a["loss"], b["loss"])
            assert a["expert_counts"] == b["expert_counts"], (name, a["step"])
        assert abs(records(tmp_path / name)[-1]["val_loss"] - plain[-1]["val_loss"]) < 1e-4
    meta = records(tmp_path / "meta")
    assert meta[0]["loss"] != plain[0]["loss"] and meta[-1]["loss"] < meta[0]["loss"]

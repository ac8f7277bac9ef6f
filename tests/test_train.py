"""Training: schedule and optimizer groups by hand, resume bit-identity, SIGKILL safety,
DDP parity with one process, the AR twin, and bad input through the CLI."""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import POEM_LINES as CORPUS_LINES

from remask.app.cli import main as cli_main
from remask.app.demo import DEMO_TRAINING
from remask.checkpoint import load_model
from remask.model import build_model
from remask.train.checkpointing import latest_checkpoint, read_trainer_state, step_dirs
from remask.train.config import PretrainConfig, config_replace, load_recipe
from remask.train.optim import param_groups, shared_steps, wsd_lr
from remask.train.pretrain import pretrain

REPO = Path(__file__).resolve().parents[1]
# Every PretrainConfig field by its bare name (the tests' shorthand) -> its dotted path.
PATHS = {g.name: f"{f.name}.{g.name}" for f in dataclasses.fields(PretrainConfig)
         if dataclasses.is_dataclass(f.default_factory) for g in dataclasses.fields(f.default_factory)}
PATHS |= {"data": "data.source", "preset": "model.preset", "objective": "objective", "mask_eps": "mask_eps",
          "t_sampling": "t_sampling"}


def tiny_cfg(corpus: Path | str, out: Path, **kw) -> PretrainConfig:
    base = dict(data=str(corpus), out=out, preset="tiny", d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64,
                seq_len=32, batch_size=4, max_steps=8, lr=3e-3, warmup_steps=2, log_every=1, val_every=4,
                val_batches=1, save_every=4, progress=False, device="cpu", val_fraction=0.2)
    return config_replace(PretrainConfig(), **{PATHS[k]: v for k, v in (base | kw).items()})


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_model(directory).state_dict()


# ----------------------------------------------------------------------------------- pieces


def test_wsd_schedule_by_hand():
    kw = dict(max_steps=10, peak=1.0, warmup_steps=2, decay_fraction=0.4, min_ratio=0.1)
    got = [wsd_lr(s, **kw) for s in range(10)]
    # warmup 0.5, 1; stable until step 6; then 4 decay steps to 0.1 linearly.
    expected = [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1 - 0.9 * 0.25, 1 - 0.9 * 0.5, 1 - 0.9 * 0.75, 0.1]
    assert got == pytest.approx(expected)


def test_two_schedules_share_the_steps_before_the_earlier_decay():
    from remask.train.config import OptimConfig

    a = OptimConfig(max_steps=8, warmup_steps=2, decay_fraction=0.5)  # decays from step 4
    b = a.replace(max_steps=12)  # from step 6
    assert shared_steps(a, b) == shared_steps(b, a) == 4
    assert shared_steps(a, a) == 8
    assert shared_steps(a, a.replace(decay_fraction=0.0, max_steps=12)) == 0  # another setting: nothing shared
    assert shared_steps(a.replace(decay_fraction=0.0), a.replace(decay_fraction=0.0, max_steps=100)) == 8


def test_weight_decay_only_on_matrices():
    from remask.config import ModelConfig

    model = build_model(ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, mlp_hidden_size=16))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {
        "wte.weight", "blocks.0.attn_norm.weight", "blocks.0.ff_norm.weight", "ln_f.weight"}
    assert "ff_out.weight" in {names[id(p)] for p in decay["params"]} and decay["weight_decay"] == 0.1


# ----------------------------------------------------------------------------------- runs


def test_pretrain_writes_run_layout_and_learns(tmp_path):
    run = tmp_path / "run"
    final = pretrain(tiny_cfg("builtin:tang300", run, max_steps=30, val_every=10, save_every=10, val_fraction=0.05,
                              batch_size=8, val_batches=4))
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("step", "loss", "lr", "tokens", "tokens_per_s"):
        assert all(key in r for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [10, 20, 30]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0]  # it learns
    assert (final / "config.json").exists() and (final / "tokenizer.json").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-20", "step-30"]  # keep = 2
    assert (run / "checkpoints" / "step-30" / "trainer_state" / "optimizer.pt").exists()
    assert not load_model(final).config.causal


def test_resume_is_bit_identical(corpus, tmp_path):
    full = tmp_path / "full"
    pretrain(tiny_cfg(corpus, full))
    cut = tmp_path / "cut"
    pretrain(tiny_cfg(corpus, cut, max_steps=8, save_every=4))
    # Throw away everything after step 4 as if the run had died there.
    import shutil

    shutil.rmtree(cut / "checkpoints" / "step-8")
    shutil.rmtree(cut / "final")
    pretrain(tiny_cfg(corpus, cut, resume=True))
    assert [r["loss"] for r in metrics(cut)] == [r["loss"] for r in metrics(full)]
    a, b = weights(full / "final"), weights(cut / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mode", ["uniform", "stratified"])
def test_t_sampling_reaches_training_and_validation(corpus, tmp_path, monkeypatch, mode):
    import remask.diffusion.masking as masking

    drawn = []
    real = masking.stratified_t
    monkeypatch.setattr(masking, "stratified_t", lambda batch, **kw: drawn.append(batch) or real(batch, **kw))
    run = tmp_path / mode
    pretrain(tiny_cfg(corpus, run, max_steps=4, val_every=4, t_sampling=mode))
    assert (len(drawn) >= 4 and set(drawn) <= {4, 1}) if mode == "stratified" else drawn == []
    assert f"t_sampling: {mode}" in (run / "config.yaml").read_text()
    assert math.isfinite(metrics(run)[-1]["val_loss"])


def test_refuses_to_overwrite_or_resume_a_different_model(corpus, tmp_path):
    run = tmp_path / "run"
    pretrain(tiny_cfg(corpus, run, max_steps=4))
    from remask.errors import RemaskError

    with pytest.raises(RemaskError, match="already holds a run"):
        pretrain(tiny_cfg(corpus, run, max_steps=4))
    with pytest.raises(RemaskError, match="different model"):
        pretrain(tiny_cfg(corpus, run, max_steps=8, d_model=64, resume=True))


def test_ar_twin_same_data_causal_model(corpus, tmp_path):
    mdm = pretrain(tiny_cfg(corpus, tmp_path / "mdm", max_steps=4))
    ar = pretrain(tiny_cfg(corpus, tmp_path / "ar", max_steps=4, objective="ar"))
    assert load_model(ar).config.causal and not load_model(mdm).config.causal
    # Same tokens per step: the same data stream.
    assert [r["tokens"] for r in metrics(tmp_path / "ar")] == [r["tokens"] for r in metrics(tmp_path / "mdm")]


@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_every_batch_short_stays_finite(corpus, tmp_path, objective):
    # short_batch_prob=1: every batch gets a random length in 1..seq_len, one token included.
    run = tmp_path / objective
    pretrain(tiny_cfg(corpus, run, max_steps=40, save_every=40, short_batch_prob=1.0, objective=objective, seq_len=4))
    rows = metrics(run)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert len({r["tokens"] - p["tokens"] for r, p in zip(rows[1:], rows)}) > 1  # lengths did vary


def test_gradient_accumulation_matches_full_batch(corpus, tmp_path):
    pretrain(tiny_cfg(corpus, tmp_path / "full", max_steps=3, save_every=3))
    pretrain(tiny_cfg(corpus, tmp_path / "accum", max_steps=3, save_every=3, micro_batch_size=1))
    a, b = weights(tmp_path / "full" / "final"), weights(tmp_path / "accum" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)


def test_full_disk_while_saving_leaves_nothing_half_written(corpus, tmp_path, monkeypatch, capsys):
    import remask.checkpoint.storage as ckpt

    real = ckpt.save_file
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] >= 2:  # the first checkpoint succeeds, the second hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kw)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    run = tmp_path / "run"
    code = cli_main(["pretrain", "--data", str(corpus), "--out", str(run), "--preset", "tiny", "--model.d-model", "32",
                     "--model.n-layers", "2", "--model.n-heads", "2", "--model.mlp-hidden-size", "64", "--seq-len", "32",
                     "--batch-size", "4", "--max-steps", "8", "--run.save-every", "4", "--no-progress",
                     "--run.val-batches", "1", "--data.val-fraction", "0.2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error:") and "space" in err[-1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4"]  # no staging dir left
    assert load_model(run / "checkpoints" / "step-4") is not None and not (run / "final").exists()


SIGKILL_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[3])
from test_train import tiny_cfg
from remask.train.pretrain import pretrain
pretrain(tiny_cfg(sys.argv[1], sys.argv[2], max_steps=400, save_every=1, keep_checkpoints=3, val_every=1000,
                  resume=True))
"""


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    env = os.environ | {"PYTHONPATH": str(REPO / "src")}
    for delay in (0.0, 0.04, 0.11, 0.23, 0.37):  # kills at different moments of the save cycle
        before = latest_checkpoint(run)
        proc = subprocess.Popen([sys.executable, "-c", SIGKILL_SCRIPT, str(corpus), str(run), str(REPO / "tests")], env=env)
        deadline = time.monotonic() + 120
        while latest_checkpoint(run) == before and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)  # wait until this process is saving every step
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        step, ckpt = latest_checkpoint(run)
        assert before is None or step >= before[0]
        for s, directory in step_dirs(run):  # every visible checkpoint is complete
            load_model(directory)
            assert read_trainer_state(directory)[0]["step"] == s


DDP_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[4])
from test_train import tiny_cfg
from remask.train.pretrain import pretrain
pretrain(tiny_cfg(sys.argv[1], sys.argv[2], max_steps=4, save_every=4, val_every=1000, fsdp=sys.argv[3] == "fsdp"))
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_train_the_same_model_as_one(corpus, tmp_path, mode):
    env = os.environ | {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-c", DDP_SCRIPT, str(corpus), str(single), "ddp", str(REPO / "tests")], env=env,
                   check=True)
    multi = tmp_path / "multi"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "--no-python", sys.executable, "-c", DDP_SCRIPT, str(corpus), str(multi), mode, str(REPO / "tests")],
                   env=env, check=True, timeout=300)
    a, b = weights(single / "final"), weights(multi / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert [r["tokens"] for r in metrics(single)] == [r["tokens"] for r in metrics(multi)]
    for x, y in zip(metrics(single), metrics(multi)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("content, fragment", [
    (None, "does not exist"),
    (b"", "empty"),
    (b"  \n\n", "empty"),
    (b"abc\x00\x01\x02" * 100, "binary"),
    (b"\xff\xfe bad utf-8", "not valid UTF-8"),
])
def test_bad_corpus_is_one_line_exit_2(tmp_path, capsys, content, fragment):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    code = cli_main(["pretrain", "--data", str(path), "--out", str(tmp_path / "run"), "--max-steps", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and fragment in err and "\n" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_seq_len_above_model_maximum(corpus, tmp_path, capsys):
    code = cli_main(["pretrain", "--data", str(corpus), "--out", str(tmp_path / "run"), "--preset", "tiny",
                     "--seq-len", "100000", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "max_sequence_length" in err


def test_unknown_recipe_key(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: tiny\nlearning_rate_typo: 1\n")
    code = cli_main(["pretrain", "--config", str(recipe)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: unknown recipe {recipe} key(s): learning_rate_typo"
    recipe.write_text("optim:\n  lr: 0.1\n  lr_typo: 1\n")
    assert cli_main(["pretrain", "--config", str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == f"error: unknown recipe {recipe}.optim key(s): lr_typo"


def test_old_flat_recipe_names_the_new_key(tmp_path, capsys):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("preset: tiny\nlr: 0.002\n")
    assert cli_main(["pretrain", "--config", str(recipe)]) == 2
    assert "key 'preset' is now 'model.preset'" in capsys.readouterr().err
    recipe.write_text("data: builtin:tang300\n")
    assert cli_main(["pretrain", "--config", str(recipe)]) == 2
    assert "data.source" in capsys.readouterr().err
    recipe.write_text("init_from: runs/demo/final\n")
    assert cli_main(["sft", "--config", str(recipe)]) == 2
    assert "key 'init_from' is now 'model'" in capsys.readouterr().err


def test_recipes_load_and_name_their_launch_command():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        launch = [ln for ln in path.read_text().splitlines() if ln.startswith("# Launch:")]
        assert launch, path
        if "benchmarks/" in launch[0]:
            continue  # a benchmark's recipe, loaded by its own script (tests/test_reversal.py loads it)
        assert "remask" in launch[0], path
        load_recipe(path)


def test_demo_recipe_equals_demo_config():
    assert load_recipe(REPO / "recipes" / "demo.yaml") == DEMO_TRAINING
    ar = load_recipe(REPO / "recipes" / "demo-ar.yaml")
    # the twin: the same recipe with a causal mask; as the demo's judge it keeps its best-validation step
    assert ar == config_replace(DEMO_TRAINING, **{"objective": "ar", "run.out": Path("runs/demo-ar"),
                                                  "run.final": "best"})


def test_cli_overrides_recipe(tmp_path):
    from remask.app.cli import parse
    from remask.app.commands import COMMANDS

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"preset": "tiny"}, "optim": {"lr": 0.01, "max_steps": 7}}))
    got = parse(COMMANDS["pretrain"], ["--config", str(recipe), "--max-steps", "9", "--model.d-model", "64"], "p")
    cfg = got.train
    assert (cfg.optim.lr, cfg.optim.max_steps, cfg.model.preset, cfg.model.d_model) == (0.01, 9, "tiny", 64)
    got = parse(COMMANDS["pretrain"], ["--optim.lr", "0.5", "--config", str(recipe)], "p")  # order does not matter
    assert (got.train.optim.lr, got.train.optim.max_steps) == (0.5, 7)


# ----------------------------------------------------------------------------------- SFT


def test_sft_inputs_never_mask_the_prompt_and_count_padding_as_answer():
    from remask.train.objectives import OBJECTIVES, DialogueBatch, Noise

    ids = torch.arange(1, 9).repeat(64, 1)  # (64, 8)
    prompt_lengths = torch.tensor([3, 5] * 32)
    pad_mask = torch.zeros(64, 8, dtype=torch.bool)
    pad_mask[1::2, 6:] = True  # odd rows end in two EOS pads
    mask_id = 0
    batch = DialogueBatch(ids, prompt_lengths, pad_mask)
    inputs = OBJECTIVES[("sft", "mdm")].make_inputs(batch, Noise(mask_id), torch.Generator().manual_seed(0))
    prompt = torch.arange(8)[None, :] < prompt_lengths[:, None]
    assert not inputs.masked[prompt].any() and torch.equal(inputs.noisy[prompt], ids[prompt])
    assert inputs.masked[pad_mask].any()  # the EOS padding is masked and trained like the answer
    assert inputs.answer_lengths.tolist() == [5, 3] * 32  # padding counted in the answer length
    ar = OBJECTIVES[("sft", "ar")].make_inputs(batch, Noise(mask_id), None)
    assert torch.equal(ar.loss_mask, ~prompt & ~pad_mask)
    assert torch.equal(inputs.rows(slice(2, 4)).masked, inputs.masked[2:4])  # records slice by rows


@pytest.mark.parametrize("objective", ["mdm", "ar"])
def test_sft_end_to_end(corpus, tmp_path, objective):
    base = pretrain(tiny_cfg(corpus, tmp_path / "base", max_steps=2, objective=objective))
    data = tmp_path / "sft.jsonl"
    rows = [{"prompt": line[:5], "response": line[6:]} for line in CORPUS_LINES] * 3
    rows.append({"messages": [{"role": "user", "content": "床前"}, {"role": "assistant", "content": "明月光"},
                              {"role": "user", "content": "白日"}, {"role": "assistant", "content": "依山尽"}]})
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    out = tmp_path / "sft"
    code = cli_main(["sft", "--model", str(base), "--data", str(data), "--out", str(out), "--objective", objective,
                     "--seq-len", "48", "--batch-size", "4", "--max-steps", "4", "--run.val-every", "2", "--no-progress",
                     "--run.val-batches", "1"])
    assert code == 0
    rows = metrics(out)
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert load_model(out / "final").config.causal == (objective == "ar")
    # val_fraction 0: every dialogue trained on (the reversal benchmark's fit asks them all), no validation
    whole = tmp_path / "sft-all"
    assert cli_main(["sft", "--model", str(base), "--data", str(data), "--out", str(whole), "--objective", objective,
                     "--seq-len", "48", "--batch-size", "4", "--max-steps", "2", "--no-progress",
                     "--data.val-fraction", "0"]) == 0
    assert not any("val_loss" in r for r in metrics(whole))
    from remask.train.sft import split_examples

    assert split_examples(list(range(40)), 0.0, 0) == (list(range(40)), [])
    assert len(split_examples(list(range(40)), 0.05, 0)[1]) == 2


def test_sft_bad_input(tmp_path, capsys):
    code = cli_main(["sft", "--data", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --model is required") and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_torch_compile_trains_like_eager(corpus, tmp_path):
    eager = tmp_path / "eager"
    pretrain(tiny_cfg(corpus, eager, max_steps=2, val_every=100, save_every=2, short_batch_prob=0.0))
    compiled = tmp_path / "compiled"
    pretrain(tiny_cfg(corpus, compiled, max_steps=2, val_every=100, save_every=2, short_batch_prob=0.0, compile=True))
    for a, b in zip(metrics(eager), metrics(compiled)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)


def test_final_can_hold_the_best_validation_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    final = pretrain(tiny_cfg(corpus, run, max_steps=12, val_every=3, save_every=3, final="best", lr=3e-2))
    vals = [(r["step"], r["val_loss"]) for r in metrics(run) if "val_loss" in r]
    best_step, best_val = min(vals, key=lambda sv: sv[1])
    assert best_step < 12, vals  # the setting overfits, so best and last differ
    note = json.loads((final / "remask_training.json").read_text())
    assert (note["step"], note["val_loss"], note["kept"]) == (best_step, best_val, "best")
    from remask.app.demo import kept_message

    assert f"step {best_step} of 12: the lowest validation bound, {best_val:.3f}" in kept_message(final)
    (tmp_path / "note").mkdir()
    (tmp_path / "note" / "remask_training.json").write_text('{"step": 5, "val_loss": 1.25, "max_steps": 5}')
    assert "the last step, 5: it has the lowest validation bound, 1.250" in kept_message(tmp_path / "note")
    # final/ holds exactly the weights that gave the best validation loss: re-validate them.
    from remask.train.loop import validation_fn
    from remask.train.pretrain import setup

    job = setup(tiny_cfg(corpus, tmp_path / "other", max_steps=12, val_every=3))
    job.model.load_state_dict(load_model(final).state_dict())
    assert validation_fn(job)(job.model)["val_loss"] == pytest.approx(best_val, rel=1e-6)
    # final: last keeps step 12 and notes its validation bound (step 12 was validated).
    last = pretrain(tiny_cfg(corpus, tmp_path / "last", max_steps=12, val_every=3, save_every=3, lr=3e-2,
                             final="last"))
    note = json.loads((last / "remask_training.json").read_text())
    assert (note["step"], note["kept"], note["seq_len"]) == (12, "last", 32)
    assert note["val_loss"] == [r["val_loss"] for r in metrics(tmp_path / "last") if r.get("step") == 12][-1]
    assert f"step 12 (the last step, validation bound {note['val_loss']:.3f}" in kept_message(last)

"""The reversal benchmark's training (benchmarks/reversal.py): each twin pretrained on the corpus
(the block twin converted from the diffusion twin) and fine-tuned on the SFT dialogues, a run
reused when its recipe and inputs are unchanged and resumed when it stopped part way."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from _common import metrics_seconds
from reversal_eval import OBJECTIVES, objective_of, twins

from remask.atomic import write_text
from remask.errors import RemaskError
from remask.train.config import PretrainConfig, SFTConfig, config_replace

if TYPE_CHECKING:
    from reversal import ReversalRecipe


def twin_steps(recipe: ReversalRecipe, objective: str) -> int:
    """The twin's pretraining length: pretrain.optim.max_steps times benchmark.mdm_steps_factor /
    ar_steps_factor (a twin still improving runs on; a smoke run's short max_steps stays short)."""
    return max(1, round(recipe.pretrain.optim.max_steps * getattr(recipe.benchmark, f"{objective}_steps_factor")))


def pretrain_config(recipe: ReversalRecipe, objective: str, corpus: Path) -> PretrainConfig:
    if objective.startswith("bd"):
        return block_config(recipe, objective, corpus)
    return config_replace(recipe.pretrain, **{"objective": objective, "data.source": str(corpus),
                                              "run.out": recipe.benchmark.out / objective,
                                              "optim.max_steps": twin_steps(recipe, objective)})


def block_config(recipe: ReversalRecipe, twin: str, corpus: Path) -> PretrainConfig:
    """The block twin: the diffusion twin's final model converted (BD3-LM's objective on the same
    corpus, sequence length, packing, batch size and seed) for benchmark.block_steps steps at a
    fine-tuning learning rate; docs/block.md explains why a conversion needs no prediction shift."""
    from remask.train.config import CorpusData, ModelSection, OptimConfig, RunConfig

    out, steps, pre = recipe.benchmark.out, recipe.benchmark.block_steps, recipe.pretrain
    return PretrainConfig(
        objective="bd", block_length=objective_of(twin)[1], t_sampling="stratified",
        model=ModelSection(init_from=out / "mdm" / "final"),
        data=CorpusData(source=str(corpus), seq_len=pre.data.seq_len, short_batch_prob=0.0, packing=pre.data.packing),
        optim=OptimConfig(batch_size=pre.optim.batch_size, max_steps=steps, lr=1e-3, warmup_steps=min(50, steps // 10),
                          decay_fraction=0.3, weight_decay=0.0),
        run=RunConfig(out=out / twin, seed=pre.run.seed, val_every=10**9, save_every=max(1, steps // 4),
                      keep_checkpoints=100, log_every=50, resume=True, progress=False))


def sft_config(recipe: ReversalRecipe, objective: str, base: Path, data: Path) -> SFTConfig:
    name, block = objective_of(objective)
    return config_replace(recipe.sft, **{"objective": name, "block_length": block, "model": base, "data.source": data,
                                         "run.out": recipe.benchmark.out / f"{objective}-sft"})


def file_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_once(run: Path, config, workflow, inputs: list[Path]) -> tuple[Path, float]:
    """Train unless run/final exists from the same recipe (compared as config.yaml) and the same
    `inputs` files (data, base weights: compared by SHA-256, kept in run/benchmark.json); (final model, training
    seconds), those of a reused model being what it took when trained, so that the benchmark's
    timing is its cost from scratch. A run stopped part way from the same recipe and inputs resumes
    from its last checkpoint (its seconds: those of every session it took, as the record keeps them),
    and one under another `optim.max_steps` from the last checkpoint both schedules share (`rewind`);
    one from another recipe or inputs is moved to run.previous (replacing the one there) and
    trained anew."""
    import hashlib

    wanted = config.to_dict()
    digest = hashlib.sha256(b"".join(bytes.fromhex(file_sha256(f)) for f in inputs)).hexdigest()
    saved, record = run / "config.yaml", run / "benchmark.json"
    same_inputs = saved.is_file() and record.is_file() and json.loads(record.read_text()).get("inputs_sha256") == digest
    same = same_inputs and (saved_recipe(run, config) == plain(wanted) or rewind(run, config))
    kept = json.loads(record.read_text()) if same else {}
    if same and (run / "final").is_dir() and "train_s" in kept:
        print(f"reusing {run / 'final'}", file=sys.stderr)
        return run / "final", kept["train_s"]
    earlier, history = kept.get("sessions_s", []), {k: v for k, v in kept.items() if k == "rewound"}
    if run.exists() and not same:  # kept aside, not deleted: hours of training are one mistaken change away
        import os

        from remask.atomic import remove_dir

        aside = run.with_name(run.name + ".previous")
        remove_dir(aside)
        os.rename(run, aside)
        print(f"{run}: {'another recipe' if same_inputs else 'other inputs'}: training it anew (the old run is "
              f"kept in {aside} until the next such change)", file=sys.stderr)
    if same:
        print(f"resuming {run}", file=sys.stderr)
    run.mkdir(parents=True, exist_ok=True)
    sessions = [*earlier, 0.0]
    t0 = time.perf_counter()

    def note(done: bool = False) -> None:  # each session's seconds, kept as it goes: a stopped run's count survives
        sessions[-1] = time.perf_counter() - t0
        write_text(record, json.dumps({"inputs_sha256": digest, "sessions_s": sessions} | history
                                      | ({"train_s": sum(sessions)} if done else {})) + "\n")

    note()
    try:
        final = workflow(config)
    finally:
        note()
    note(done=True)
    return final, sum(sessions)


def plain(config: dict) -> dict:
    """A config's dict as its YAML file reads back (paths as strings, tuples as lists), less what
    only changes the display (run.progress: a run fine-tuned in a worker has no progress bar)."""
    out = json.loads(json.dumps(config))
    if isinstance(out.get("run"), dict):
        out["run"].pop("progress", None)
    return out


def saved_recipe(run: Path, config) -> dict | None:
    """run/config.yaml as `config`'s class reads it: a setting added to the class since the run was
    written counts at its default, so that a new setting no project recipe uses leaves every saved
    run the same recipe (they were removed and retrained from step 0); the file as read where it
    is not such a config."""
    before = yaml.safe_load((run / "config.yaml").read_text())
    from_dict = getattr(type(config), "from_dict", None)
    if not isinstance(before, dict):
        return before
    try:
        return plain(before if from_dict is None else from_dict(before).to_dict())
    except (RemaskError, TypeError, ValueError):
        return plain(before)


def rewind(run: Path, config) -> bool:
    """Make a run under another `optim.max_steps` (the rest of its recipe the same) a run under
    `config`: its checkpoints up to the steps both schedules take alike (the learning rate's decay
    starts later, or earlier) are checkpoints of a run under `config`, so the later ones and the final
    model are removed and training resumes from the last kept one. True when done (config.yaml and
    benchmark.json then name `config`, the record keeping every session's seconds and the change);
    False where anything else differs or no checkpoint is shared."""
    from remask.atomic import remove_dir
    from remask.train.checkpointing import step_dirs
    from remask.train.optim import shared_steps

    before, wanted = saved_recipe(run, config), plain(config.to_dict())
    if not isinstance(before, dict) or "optim" not in wanted or not isinstance(before.get("optim"), dict):
        return False
    steps = before["optim"].get("max_steps")
    if not isinstance(steps, int) or before != wanted | {"optim": wanted["optim"] | {"max_steps": steps}}:
        return False
    shared = shared_steps(config.optim.replace(max_steps=steps), config.optim)
    kept = [step for step, _ in step_dirs(run) if step <= shared]
    if not kept:
        return False
    for step, path in step_dirs(run):
        if step > kept[-1]:
            remove_dir(path)
    if (run / "final").exists():
        remove_dir(run / "final")
    record = json.loads((run / "benchmark.json").read_text())
    record.pop("train_s", None)
    change = {"max_steps": [steps, config.optim.max_steps], "resumed_from_step": kept[-1]}
    record["rewound"] = [*record.get("rewound", []), change]
    write_text(run / "benchmark.json", json.dumps(record) + "\n")
    write_text(run / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True))
    print(f"{run}: max_steps {steps} -> {config.optim.max_steps}, resuming from step {kept[-1]}", file=sys.stderr)
    return True


def check_sft_fits(config: SFTConfig) -> None:
    """ConfigError unless every SFT dialogue fits sft.data.seq_len whole in the base model's tokens:
    SFT would cut a longer answer (its end-of-turn lost), and the model learn to stop nowhere."""
    from remask.data.sft import build_sft_examples
    from remask.errors import ConfigError
    from remask.tokenizer import Tokenizer

    examples = build_sft_examples(config.data.source, Tokenizer.from_dir(config.model), max_len=1 << 30)
    longest = max(len(e.ids) for e in examples)
    if longest > config.data.seq_len:
        cut = sum(len(e.ids) > config.data.seq_len for e in examples)
        raise ConfigError(f"sft.data.seq_len {config.data.seq_len} would cut {cut} of the {len(examples)} SFT "
                          f"answers; the longest dialogue is {longest} tokens")


def fine_tune(config: SFTConfig) -> Path:
    """The recipe's SFT of one twin, once its dialogues are known to fit whole."""
    from remask.train.sft import sft

    check_sft_fits(config)
    return sft(config)


def worker_recipe(recipe: ReversalRecipe) -> ReversalRecipe:
    """The recipe as one of `jobs` side-by-side workers runs it: its share of the cores, no progress bars."""
    import os

    import torch

    if recipe.benchmark.jobs == 1:
        return recipe
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // recipe.benchmark.jobs))
    return config_replace(recipe, **{"pretrain.run.progress": False, "sft.run.progress": False})


def train_objective(recipe: ReversalRecipe, objective: str, corpus: Path,
                    sft_data: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """Pretrain, then fine-tune, one of the twins (with a share of the cores when run beside the other)."""
    import signal

    from remask.train.pretrain import pretrain

    before = signal.getsignal(signal.SIGTERM)
    if recipe.benchmark.jobs > 1:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated worker still records its seconds
    recipe = worker_recipe(recipe)
    try:
        config = pretrain_config(recipe, objective, corpus)
        inputs = [corpus] + ([config.model.init_from / "model.safetensors"] if config.model.init_from else [])
        base, pretrain_s = train_once(config.run.out, config, pretrain, inputs)
        # the kept trajectory's own seconds, however many sessions it took (the record may have begun
        # after the first of them; a lengthened run's replaced decay is not part of its cost)
        pretrain_s = metrics_seconds(config.run.out) or pretrain_s
        config = sft_config(recipe, objective, base, sft_data)
        tuned, sft_s = train_once(config.run.out, config, fine_tune, [sft_data, base / "model.safetensors"])
    finally:  # the pool terminates its idle workers when it closes: nothing to record then
        signal.signal(signal.SIGTERM, before)
    return ({objective: base, f"{objective}-sft": tuned},
            {f"{objective}_pretrain_s": pretrain_s, f"{objective}_sft_s": sft_s})


def train_twins(recipe: ReversalRecipe, corpus: Path, sft_data: Path) -> tuple[dict[str, Path], dict[str, float]]:
    """Every twin's models, and their timings: training counts as long as it took when done (reused
    models keep their seconds), `training_s` side by side or one after the other; the block twin
    (benchmark.block_twin) after the other two, as it starts from the diffusion twin's final model."""
    jobs = [(recipe, objective, corpus, sft_data) for objective in OBJECTIVES]
    started = time.perf_counter()
    if recipe.benchmark.jobs > 1:  # one process per model, the cores shared out (more tokens/s in all than one at a time)
        import multiprocessing
        import signal

        # a terminated benchmark takes its workers with it (leaving the pool terminates them)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        with multiprocessing.get_context("spawn").Pool(recipe.benchmark.jobs) as pool:
            done = pool.starmap(train_objective, jobs)
    else:
        done = [train_objective(*job) for job in jobs]
    per_twin = [sum(times.values()) for _, times in done]
    # the block twin starts from the diffusion twin's final model: trained after both, on every core
    done += [train_objective(config_replace(recipe, **{"benchmark.jobs": 1}), twin, corpus, sft_data)
             for twin in twins(recipe)[len(OBJECTIVES):]]
    models, timings = {}, {}
    for found, times in done:
        models |= found
        timings |= times
    timings["training_s"] = (max(per_twin) if recipe.benchmark.jobs > 1 else sum(per_twin)) + sum(
        sum(times.values()) for _, times in done[len(OBJECTIVES):])
    timings["training_wall_s"] = time.perf_counter() - started
    return models, timings

"""Bad input and faults, one test per class: every bad input is one `error:` line with exit code 2
and nothing left on disk; every kill leaves loadable checkpoints and a resume that reproduces the
uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import POEM_LINES

from remask.app.cli import main
from remask.checkpoint import load_model
from remask.train.checkpointing import step_dirs

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def env(**extra: str) -> dict[str, str]:
    """The child-process environment: this test's (its cache included) with the source on the path."""
    return os.environ | {"PYTHONPATH": str(REPO / "src")} | extra


def one_line_error(capsys, *argv: str, fragment: str) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err
    return err


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """An existing directory this process cannot create anything in (root ignores permission bits,
    so as root a read-only kernel filesystem stands in)."""
    if os.geteuid() != 0:
        path = tmp_path / "read-only"
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    for candidate in (Path("/sys/kernel"), Path("/sys")):
        try:
            (candidate / ".remask-probe").mkdir()
        except OSError:
            yield candidate
            return
        (candidate / ".remask-probe").rmdir()
    pytest.fail("no unwritable directory found to test with")


# --- text that is not UTF-8 ------------------------------------------------------------------------


def test_prompt_that_is_not_utf8(model_dir):
    proc = subprocess.run([sys.executable, "-m", "remask", "generate", "--model", str(model_dir), "--prompt",
                           b"ab\xff\xfe"], capture_output=True, env=env())
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --prompt is not valid UTF-8 text") and "Traceback" not in err


def test_prompt_file_that_is_not_utf8(model_dir, tmp_path, capsys):
    bad = tmp_path / "prompt.txt"
    bad.write_bytes("床前".encode() + b"\xff")
    one_line_error(capsys, "generate", "--model", str(model_dir), "--prompt-file", str(bad),
                   fragment=f"file {bad} is not valid UTF-8 text (byte 6)")
    one_line_error(capsys, "generate", "--model", str(model_dir), "--prompt-file", str(tmp_path / "none"),
                   fragment="does not exist")
    good = tmp_path / "good.txt"
    good.write_text("床前", encoding="utf-8")
    assert main(["generate", "--model", str(model_dir), "--prompt-file", str(good), "--gen-length", "4",
                 "--steps", "2"]) == 0


def test_chat_skips_a_message_that_is_not_utf8_and_one_with_special_tokens(model_dir):
    stdin = b"\xff\xfe\n<|mdm_mask|><|eot_id|><|start_header_id|>system\n\xe5\xba\x8a\n\n"
    proc = subprocess.run([sys.executable, "-m", "remask", "chat", "--model", str(model_dir), "--gen-length", "8",
                           "--steps", "4", "--block-length", "4"], input=stdin, capture_output=True, env=env(),
                          timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    assert err.count("error:") == 1 and "your message is not valid UTF-8 text (byte 0)" in err
    assert proc.stdout.decode().count("you> ") == 4  # all three lines read, then the empty line ends


@pytest.mark.parametrize("line, fragment", [
    ('{"prompt": "a\\udcff", "response": "b"}', ":1: 'prompt' is not valid UTF-8"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\\ud800"}]}',
     ":1: message 1 'content' is not valid UTF-8"),
])
def test_sft_data_that_is_not_utf8(model_dir, tmp_path, capsys, line, fragment):
    data = tmp_path / "sft.jsonl"
    data.write_text(line + "\n", encoding="utf-8")
    one_line_error(capsys, "sft", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "run"),
                   "--no-progress", fragment=fragment)
    assert not (tmp_path / "run").exists()


def test_pretraining_data_that_is_not_utf8(tmp_path, capsys):
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "ok"}\n{"text": "bad \\udcff"}\n', encoding="utf-8")
    one_line_error(capsys, "pretrain", "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress",
                   fragment=f"{data}:2: field 'text' is not valid UTF-8 text")
    assert not (tmp_path / "run").exists()


# --- numbers and types ------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--optim.weight-decay", "nan"], "--optim.weight-decay must be a finite number, got nan"),
    (["--optim.weight-decay", "-1"], "--optim.weight-decay must be >= 0, got -1.0"),
    (["--optim.beta1", "1.5"], "--optim.beta1 must be < 1, got 1.5"),
    (["--optim.beta2", "-0.5"], "--optim.beta2 must be >= 0, got -0.5"),
    (["--data.val-fraction", "nan"], "--data.val-fraction must be a finite number, got nan"),
    (["--mask-eps", "0"], "--mask-eps must be > 0, got 0.0"),
    (["--optim.grad-clip", "-1"], "--optim.grad-clip must be >= 0, got -1.0"),
    (["--seed", "-3"], "--seed must be >= 0, got -3"),
    (["--seed", str(2**64)], f"--seed must be < {2**63}, got {2**64}"),
    (["--model.d-model", "30"], "--model.d-model (30) must be divisible by n_heads (4)"),
    (["--preset", "huge"], "--preset must be one of tiny, demo, small, 100m, llada-8b, got 'huge'"),
    (["--batch-size", "6", "--optim.micro-batch-size", "4"], "must be divisible by micro_batch_size"),
])
def test_training_numbers_are_checked_before_anything_is_written(corpus, tmp_path, capsys, argv, message):
    err = one_line_error(capsys, "pretrain", "--data", str(corpus), "--out", str(tmp_path / "run"),
                         "--no-progress", *argv, fragment=message)
    assert err.strip() == f"error: {message}" or "micro_batch_size" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value, fragment", [
    ("causal", "no", "causal must be true or false, got 'no'"),
    ("attention", "diagonal", "attention must be one of 'full', 'causal', 'block', got 'diagonal'"),
    ("block_length", 4, "block_length (4) goes with attention block only"),
    ("mask_token_id", 1.5, "mask_token_id must be an integer or null, got 1.5"),
    ("rope_theta", float("inf"), "rope_theta must be a finite number, got inf"),
    ("weight_tying", 0, "weight_tying must be true or false, got 0"),
    ("n_layers", 2.0, "n_layers must be an integer, got 2.0"),
])
def test_config_json_types_are_strict(model_dir, tmp_path, capsys, key, value, fragment):
    copy = tmp_path / "model"
    copy.mkdir()
    for f in model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((copy / "config.json").read_text())
    text = json.dumps(config | {key: value}).replace("Infinity", "1e400")  # how an overflowing float is written
    (copy / "config.json").write_text(text)
    one_line_error(capsys, "info", str(copy), "--json", fragment=fragment)


def test_model_and_tokenizer_must_agree(model_dir, tmp_path, capsys, poem_tokenizer):
    from remask.tokenizer import Tokenizer

    bigger = tmp_path / "bigger"
    bigger.mkdir()
    for f in model_dir.iterdir():
        (bigger / f.name).write_bytes(f.read_bytes())
    Tokenizer.train([*POEM_LINES, "一二三四五六七八九十"], kind="char").save(bigger)
    for command in (["info", str(bigger)], ["generate", "--model", str(bigger), "--prompt", "床"]):
        one_line_error(capsys, *command, fragment="the tokenizer has")
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    for f in model_dir.iterdir():
        (swapped / f.name).write_bytes(f.read_bytes())
    config = json.loads((swapped / "tokenizer_config.json").read_text())
    config["remask_special_tokens"]["mask"] = config["remask_special_tokens"]["eos"]
    (swapped / "tokenizer_config.json").write_text(json.dumps(config))
    one_line_error(capsys, "generate", "--model", str(swapped), "--prompt", "床",
                   fragment=f"config.json says mask_token_id={poem_tokenizer.mask_id}")


# --- output paths ---------------------------------------------------------------------------------------


def test_run_directory_problems(corpus, tmp_path, capsys, unwritable):
    base = ["pretrain", "--data", str(corpus), "--no-progress", "--max-steps", "2"]
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    one_line_error(capsys, *base, "--out", str(a_file), fragment="exists and is not a directory")
    one_line_error(capsys, *base, "--out", str(unwritable), fragment="is not writable")
    one_line_error(capsys, *base, "--out", str(unwritable / "sub" / "run"), fragment="is not writable")
    for part in ("checkpoints", "final"):
        run = tmp_path / f"run-{part}"
        run.mkdir()
        (run / part).write_text("x")
        one_line_error(capsys, *base, "--out", str(run), fragment=f"{part} exists and is not a directory")
        assert sorted(p.name for p in run.iterdir()) == [part]  # nothing written, no training ran


def test_cache_problems(corpus, tmp_path, capsys, monkeypatch, unwritable):
    base = ["pretrain", "--data", str(corpus), "--no-progress", "--max-steps", "2", "--out", str(tmp_path / "run")]
    a_file = tmp_path / "cache-file"
    a_file.write_text("x")
    monkeypatch.setenv("REMASK_CACHE", str(a_file))
    one_line_error(capsys, *base, fragment="the cache directory (REMASK_CACHE)")
    monkeypatch.setenv("REMASK_CACHE", str(unwritable / "cache"))
    one_line_error(capsys, *base, fragment="is not writable")
    assert not (tmp_path / "run").exists()


def test_plot_into_an_unwritable_directory(corpus, tmp_path, capsys, unwritable):
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(corpus), "--out", str(run), "--no-progress", "--max-steps", "2",
                 "--preset", "tiny", "--model.d-model", "32", "--model.n-heads", "2", "--seq-len", "32"]) == 0
    capsys.readouterr()
    one_line_error(capsys, "plot", str(run), "--out", str(unwritable / "loss.png"), fragment="cannot write")
    one_line_error(capsys, "plot", str(run), "--out", str(tmp_path / "no" / "loss.png"), fragment="does not exist")


# --- data that is not a file, or not the run's -------------------------------------------------------


@pytest.mark.parametrize("command", ["pretrain", "eval ppl"])
def test_a_fifo_as_data_is_refused_without_opening_it(model_dir, tmp_path, command):
    """Nobody writes to the FIFO, so opening it would block for ever: the child gets a deadline."""
    fifo = tmp_path / "corpus.txt"
    os.mkfifo(fifo)
    argv = (["pretrain", "--out", str(tmp_path / "run"), "--max-steps", "2", "--no-progress"] if command == "pretrain"
            else ["eval", "ppl", "--model", str(model_dir), "--split", "all", "--no-progress"])
    try:
        proc = subprocess.run([sys.executable, "-m", "remask", *argv, "--data", str(fifo)], env=env(),
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"remask {command} hung reading the FIFO")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr == f"error: cannot read {fifo}: it is a FIFO, not a regular file\n"
    assert not (tmp_path / "run").exists()


TINY_RUN = ["--preset", "tiny", "--model.d-model", "32", "--model.n-heads", "2", "--seq-len", "32", "--no-progress"]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_pretrain_resume_on_other_data_is_refused(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--data", str(corpus), "--out", str(run), "--max-steps", "2", *TINY_RUN]) == 0
    other = tmp_path / "other.txt"  # the same characters (the run's tokenizer could read it), other poems
    other.write_text("\n%\n".join(POEM_LINES[:2] * 9) + "\n", encoding="utf-8")
    before = snapshot(run)
    capsys.readouterr()
    one_line_error(capsys, "pretrain", "--data", str(other), "--out", str(run), "--max-steps", "4", "--resume",
                   *TINY_RUN, fragment=f"the run trained on {corpus}")
    assert snapshot(run) == before  # no step trained, no final/ rewritten, not even config.yaml
    assert main(["pretrain", "--data", str(corpus), "--out", str(run), "--max-steps", "4", "--resume", *TINY_RUN]) == 0
    assert (run / "checkpoints" / "step-4").is_dir()  # its own data resumes as before


def test_sft_resume_on_other_data_is_refused(model_dir, tmp_path, capsys):
    rows = [{"prompt": line[:5], "response": line[6:]} for line in POEM_LINES] * 3
    data, other = tmp_path / "sft.jsonl", tmp_path / "other.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    other.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[::-1]) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    base = ["sft", "--model", str(model_dir), "--out", str(run), "--seq-len", "48", "--batch-size", "4",
            "--no-progress", "--run.val-batches", "1"]
    assert main([*base, "--data", str(data), "--max-steps", "2"]) == 0
    before = snapshot(run)
    capsys.readouterr()
    one_line_error(capsys, *base, "--data", str(other), "--max-steps", "4", "--resume",
                   fragment=f"the run trained on {data}")
    assert snapshot(run) == before


def test_weights_that_are_not_finite(model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    for bad in (float("nan"), float("inf")):
        broken = tmp_path / f"broken-{bad}"
        broken.mkdir()
        for f in model_dir.iterdir():
            (broken / f.name).write_bytes(f.read_bytes())
        tensors = load_file(broken / "model.safetensors")
        name = sorted(tensors)[1]
        tensors[name][0] = bad  # one row of one tensor
        save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
        for command in (["generate", "--model", str(broken), "--prompt", "床"], ["info", str(broken)]):
            err = one_line_error(capsys, *command, fragment=f"tensor {name} holds NaN or infinite values")
            assert err.startswith(f"error: {broken / 'model.safetensors'}: ")


# --- interrupts -----------------------------------------------------------------------------------------


def torch_is_loading(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def test_an_import_broken_by_ctrl_c_exits_130_with_one_line(monkeypatch, capsys):
    """A Ctrl-C inside a C extension's import leaves it half-loaded; the import that is retried then
    raises ImportError ("cannot load module more than once per process": numpy under torch, seen
    under load as exit 1 and a traceback). After a Ctrl-C that is the interrupt: 130, one line.
    Without one, an ImportError stays an internal failure."""
    from remask.app import cli

    def broken_import(argv):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            raise ImportError("cannot load module more than once per process") from None

    monkeypatch.setattr(cli, "run", broken_import)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"

    def plain_failure(argv):
        raise ImportError("no module named nowhere")

    monkeypatch.setattr(cli, "run", plain_failure)
    with pytest.raises(ImportError, match="nowhere"):
        cli.main(["info"])


@pytest.mark.slow
@pytest.mark.parametrize("offset", [0.0, 0.2, 0.5, 1.0])
def test_ctrl_c_during_start_up_imports(model_dir, offset):
    """SIGINT while torch is being imported (the slow part of start-up), at several offsets: exit 130
    with one line, no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "remask", "info", str(model_dir)], env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not torch_is_loading(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(offset)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # it finished before the signal came: nothing to check
        return
    assert proc.returncode == 130, (proc.returncode, err.decode())
    assert err.decode() == "error: interrupted\n"


# --- kills at each kind of write ---------------------------------------------------------------------

# Runs one training (or plot) job in a child process, with `module.attr` replaced by a version that,
# on its n-th call, optionally does part of the work, then touches a marker file and waits forever.
KILL_SCRIPT = """
import importlib, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
module, attr, nth, partial, marker = sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], Path(sys.argv[6])
target = importlib.import_module(module)
owner, _, name = attr.rpartition(".")
holder = getattr(target, owner) if owner else target
real, calls = getattr(holder, name), [0]

def hang(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        if partial == "half-file":  # write half of what the real call would, then stop
            path = Path(args[1] if len(args) > 1 else args[0])
            real(*args, **kwargs)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        elif partial == "half-tree":  # delete half of a directory's files
            files = sorted(p for p in Path(args[0]).rglob("*") if p.is_file())
            for p in files[: len(files) // 2]:
                p.unlink()
        elif partial == "half-line":
            with args[0].path.open("a") as f:
                f.write('{"step": 1, "lo')
        marker.touch()
        time.sleep(600)
    return real(*args, **kwargs)

setattr(holder, name, hang)
from test_reliability import run_job
run_job(sys.argv[7:])
"""


def training_config(corpus: str, out: str, max_steps: int = 6):
    from test_train import tiny_cfg

    return tiny_cfg(corpus, Path(out), max_steps=max_steps, save_every=1, keep_checkpoints=2, val_every=3,
                    resume=True)


def run_job(argv: list[str]) -> None:
    """The job a killed child runs: `train CORPUS OUT` or `plot RUN PNG`."""
    if argv[0] == "train":
        from remask.train.pretrain import pretrain

        pretrain(training_config(argv[1], argv[2]))
    else:
        from remask.app.plot import plot_runs

        plot_runs([Path(argv[1])], Path(argv[2]))


def kill_during(module: str, attr: str, job: list[str], *, nth: int = 1, partial: str = "none",
                tmp_path: Path) -> None:
    marker = tmp_path / f"marker-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(TESTS), module, attr, str(nth), partial,
                             str(marker), *job], env=env())
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert proc.poll() is None, f"the job ended (code {proc.returncode}) before reaching {module}.{attr}"
        assert time.monotonic() < deadline, "the job never reached the kill point"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference run, never killed."""
    root = tmp_path_factory.mktemp("reference")
    corpus = root / "poems.txt"
    corpus.write_text("\n%\n".join(POEM_LINES * 6) + "\n", encoding="utf-8")
    from remask.train.pretrain import pretrain

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REMASK_CACHE", str(root / "cache"))
        pretrain(training_config(str(corpus), str(root / "run")))
    return root


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_resumes_bit_identically(run: Path, corpus: Path, reference: Path) -> None:
    assert step_dirs(run)
    for _, directory in step_dirs(run):  # every visible checkpoint is complete
        load_model(directory)
    from remask.train.pretrain import pretrain

    final = pretrain(training_config(str(corpus), str(run)))
    hidden = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert hidden == [], hidden  # what the kill left behind is cleared
    assert losses(run) == losses(reference / "run")
    a, b = load_model(final).state_dict(), load_model(reference / "run" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("module, attr, nth, partial", [
    ("remask.checkpoint.storage", "save_file", 3, "half-file"),  # during the weights of a step checkpoint
    ("remask.train.checkpointing", "torch.save", 3, "half-file"),  # during the optimizer state of a step checkpoint
    ("remask.atomic", "_rmtree", 2, "half-tree"),  # during the deletion of an old checkpoint
    ("remask.train.loop", "write_final", 1, "none"),  # after the last checkpoint, before final/
    ("remask.train.loop", "MetricsLog.write", 4, "half-line"),  # in the middle of a metrics line
])
def test_kill_during_each_kind_of_training_write(uninterrupted, corpus, tmp_path, module, attr, nth, partial):
    run = tmp_path / "run"
    kill_during(module, attr, ["train", str(corpus), str(run)], nth=nth, partial=partial, tmp_path=tmp_path)
    assert_resumes_bit_identically(run, corpus, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("module, attr, cache_kind", [("remask.data.tokenize", "write_array", "tokens"),
                                                     ("remask.tokenizer", "Tokenizer.save", "tokenizers")])
def test_kill_while_filling_the_caches(uninterrupted, corpus, tmp_path, monkeypatch, module, attr, cache_kind):
    cache = tmp_path / "cache"
    monkeypatch.setenv("REMASK_CACHE", str(cache))
    kill_during(module, attr, ["train", str(corpus), str(tmp_path / "run")], tmp_path=tmp_path)
    entries = sorted(p.name for p in (cache / cache_kind).iterdir())
    assert len(entries) == 1 and entries[0].startswith(".tmp-")  # the entry being written is not visible
    assert not (tmp_path / "run" / "checkpoints").exists()  # killed before training started
    from remask.train.pretrain import pretrain

    final = pretrain(training_config(str(corpus), str(tmp_path / "run")))
    assert losses(tmp_path / "run") == losses(uninterrupted / "run")
    a, b = load_model(final).state_dict(), load_model(uninterrupted / "run" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_while_writing_a_plot(uninterrupted, tmp_path):
    png = tmp_path / "loss.png"
    run_job(["plot", str(uninterrupted / "run"), str(png)])
    before = png.read_bytes()
    kill_during("matplotlib.figure", "Figure.savefig", ["plot", str(uninterrupted / "run"), str(png)],
                tmp_path=tmp_path)
    assert png.read_bytes() == before  # the old plot is intact; the new one never appeared half-written

"""The `remask` command line: info, generate, and bad input as one `error:` line with exit code 2."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

from remask.app.cli import main
from remask.app.display import DenoisingView, render
from remask.model import build_model
from remask.pipeline import Pipeline
from remask.sampling import SamplerConfig
from remask.tokenizer import Tokenizer


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_json(model_dir, capsys):
    code, out, _ = run(capsys, "info", str(model_dir), "--json")
    info = json.loads(out)
    assert code == 0 and info["config"]["n_layers"] == 2 and info["kind"].startswith("masked diffusion")
    tok = Tokenizer.from_dir(model_dir)
    assert info["tokenizer"]["special_tokens"]["mask"][0] == tok.mask_id
    assert info["parameters"] == sum(p.numel() for p in build_model(Pipeline.load(model_dir).model.config).parameters())


def test_generate_json_matches_library_and_reveal_steps(model_dir, capsys):
    code, out, _ = run(capsys, "generate", "--model", str(model_dir), "--prompt", "床前", "--gen-length", "12",
                       "--steps", "6", "--block-length", "4", "--eos", "forbid", "--json")
    result = json.loads(out)
    assert code == 0 and set(result) == {"text", "ids", "reveal_step", "ended"} and not result["ended"]
    assert len(result["ids"]) == len(result["reveal_step"]) == 12
    # 6 steps over 3 blocks of 4: two steps per block, two tokens each.
    assert sorted(result["reveal_step"]) == [s for s in range(6) for _ in range(2)]
    for block in range(3):
        assert {result["reveal_step"][i] for i in range(4 * block, 4 * block + 4)} == {2 * block, 2 * block + 1}
    pipe = Pipeline.load(model_dir)
    lib = pipe.generate("床前", SamplerConfig(gen_length=12, steps=6, block_length=4, eos="forbid"))
    assert lib.ids == result["ids"] and lib.text == result["text"]
    assert lib.text == pipe.tokenizer.decode(result["ids"])


def test_demo_sampler_flags_give_the_demo_sampler(model_dir, capsys):
    from remask.app.demo import DEMO_SAMPLING, sampler_flags

    sampler = DEMO_SAMPLING.replace(gen_length=16, steps=16)  # the tiny model's context is short
    code, out, _ = run(capsys, "generate", "--model", str(model_dir), "--prompt", "床前", "--seed", "3", "--json",
                       *sampler_flags(sampler))
    lib = Pipeline.load(model_dir).generate("床前", sampler, seed=3)
    assert code == 0 and json.loads(out)["ids"] == lib.ids
    assert "--anchor-eos" in sampler_flags(sampler) and "--cache" not in sampler_flags(sampler)


def test_generate_reproducible_with_seed(model_dir, capsys):
    args = ["generate", "--model", str(model_dir), "--prompt", "白日", "--gen-length", "8", "--steps", "8",
            "--temperature", "1.0", "--remasking", "random", "--json"]
    a = json.loads(run(capsys, *args, "--seed", "1")[1])
    b = json.loads(run(capsys, *args, "--seed", "1")[1])
    c = json.loads(run(capsys, *args, "--seed", "2")[1])
    assert a == b and a != c


@pytest.mark.parametrize("argv, fragment", [
    (["--gen-length", "10", "--block-length", "4"], "divisible by block_length"),
    (["--gen-length", "8", "--steps", "5", "--block-length", "4"], "divisible by the number of blocks"),
    (["--gen-length", "8", "--steps", "9"], "must be <= gen_length"),
    (["--gen-length", "95", "--steps", "95"], "exceeds the model's context"),
    (["--steps", "abc"], "--steps"),
    (["--remasking", "nope"], "invalid choice 'nope' for --remasking; choose from low_confidence, random"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number, got nan"),
    (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
    (["--seed", "1e23"], "--seed"),
    (["--seed", str(2**70)], "seed must be an integer in [0, 2**63)"),
    (["--bogus", "1"], "unrecognized argument(s): --bogus 1"),
    (["--device", "meta"], "device 'meta' cannot run remask"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "cuda"),
])
def test_generate_bad_options(model_dir, capsys, argv, fragment):
    code, out, err = run(capsys, "generate", "--model", str(model_dir), "--prompt", "床前", *argv)
    assert code == 2 and out == ""
    assert err.startswith("error:") and err.count("\n") == 1 and fragment in err, err


def test_missing_required_option(capsys):
    code, out, err = run(capsys, "generate", "--prompt", "x")
    assert code == 2 and err == "error: missing required option(s): --model\n"


def command_options(capsys, command: str) -> str:
    assert main([command, "--help"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_every_sampler_field_is_an_option_of_each_sampling_command(capsys, command):
    helptext = command_options(capsys, command)
    for field in dataclasses.fields(SamplerConfig):
        assert re.search(rf"(?<![\w-])--{field.name.replace('_', '-')}(?![\w-])", helptext), field.name


def test_missing_and_corrupt_model_directory(model_dir, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "x")
    assert code == 2 and err.startswith("error:") and "does not exist" in err
    (tmp_path / "a-file").write_text("x")
    code, _, err = run(capsys, "generate", "--model", str(tmp_path / "a-file"), "--prompt", "x")
    assert code == 2 and "is not a directory" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    code, _, err = run(capsys, "info", str(broken))
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1


def test_mismatched_shapes(model_dir, tmp_path, capsys):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for f in model_dir.iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["d_model"] = 64
    (wrong / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(capsys, "generate", "--model", str(wrong), "--prompt", "x")
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1


def test_console_script_exit_codes(model_dir):
    """The installed entry point: no traceback, exit 2, one line."""
    proc = subprocess.run([sys.executable, "-m", "remask", "generate", "--model", str(model_dir),
                           "--prompt", "x", "--gen-length", "10", "--block-length", "3"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "remask", "nonsense"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown command")


def test_denoising_view_colours_by_reveal_step(model_dir):
    import io

    pipe = Pipeline.load(model_dir)
    sampler = SamplerConfig(gen_length=8, steps=4, block_length=4)
    stream = io.StringIO()
    view = DenoisingView(pipe.tokenizer, pipe.stop_ids(), sampler, stream=stream, colour=True)
    result = pipe.generate("床前", sampler, on_step=view)
    # Not a terminal: only the final frame is printed, one escape per revealed token before the end.
    frame = stream.getvalue()
    assert frame.count("\x1b[38;5;") == sum(1 for t in result.ids if t not in pipe.stop_ids())
    assert frame.count("\n") == 1
    plain = render(["a", None, "b"], [0, -1, 3], 4, colour=False)
    assert plain == "a░b"
    tok, eos = pipe.tokenizer, pipe.tokenizer.eos_id
    a, b = tok.encode("床前")
    # Masked positions are None; the end-of-text and everything after it (revealed or not) show nothing.
    assert view.pieces([a, tok.mask_id, b, eos, tok.mask_id, a], [0, -1, 1, 2, -1, 3]) == ["床", None, "前", "", "", ""]
    # An anchored end-of-text (given, never revealed: step -1) is not shown as a masked position.
    assert view.pieces([a, tok.mask_id, eos], [0, -1, -1]) == ["床", None, ""]


def test_pipeline_prompt_is_bos_then_text(model_dir):
    pipe = Pipeline.load(model_dir)
    tok = pipe.tokenizer
    assert pipe.encode_prompt("床前") == [tok.bos_id, *tok.encode("床前")]
    chat = pipe.encode_prompt("床前", chat=True)
    assert chat == tok.render_chat([{"role": "user", "content": "床前"}], add_generation_prompt=True)
    assert torch.tensor(chat).ne(tok.mask_id).all()


def test_chat_reads_turns_from_stdin(model_dir):
    proc = subprocess.run([sys.executable, "-m", "remask", "chat", "--model", str(model_dir), "--gen-length", "8",
                           "--steps", "4", "--block-length", "4"], input="床前\n白日\n白日依山尽\n\n", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("you> ") == 4  # three answered turns (old ones forgotten), then the empty line ends it
    assert "error" not in proc.stderr


def test_chat_session_without_a_terminal(model_dir):
    import io

    from remask.app.chat import ChatSession, terminal_chat
    from remask.errors import RemaskError

    pipe = Pipeline.load(model_dir)
    sampler = SamplerConfig(gen_length=8, steps=4, block_length=4)
    session = ChatSession(pipe, sampler, seed=1)
    first = session.ask("床前")
    assert [m["role"] for m in session.history] == ["user", "assistant"] and session.history[1]["content"] == first.text
    # The same turn through the pipeline directly: the session adds nothing but the dialogue.
    alone = pipe.generate([{"role": "user", "content": "床前"}], sampler, seed=1)
    assert alone.ids == first.ids
    with pytest.raises(RemaskError, match="does not fit"):
        session.ask("床" * 200)
    assert len(session.history) == 2  # a refused message leaves the dialogue as it was
    # Long dialogues forget their oldest exchanges to fit the context.
    for _ in range(6):
        session.ask("白日依山尽黄河入海流" * 2)
    limit = pipe.model.config.max_sequence_length - sampler.gen_length
    assert len(pipe.encode_prompt(session.history[:-1])) <= limit and session.history[0]["role"] == "user"
    out, err = io.StringIO(), io.StringIO()
    terminal_chat(ChatSession(pipe, sampler), stdin=io.BytesIO("床前\n/reset\n".encode() + b"\xff\n" + "白日\n\n".encode()),
                  stdout=out, stderr=err)
    assert out.getvalue().count("you> ") == 5 and err.getvalue().count("error:") == 1


def test_chat_commands_change_settings_and_ctrl_c_stops_only_the_answer(model_dir):
    import io

    from remask.app.chat import ChatSession, terminal_chat
    from remask.sampling.requests import sampler_from_words

    pipe = Pipeline.load(model_dir)
    session = ChatSession(pipe, SamplerConfig(gen_length=8, steps=8, block_length=4))
    out, err = io.StringIO(), io.StringIO()
    lines = "/set temperature=0.5 steps=4 cache=dual block_length=none\n/set steps=x\n/set colour=red\n/settings\n床前\n\n"
    terminal_chat(session, stdin=io.BytesIO(lines.encode()), stdout=out, stderr=err)
    assert session.sampler == SamplerConfig(gen_length=8, steps=4, block_length=None, temperature=0.5, cache="dual")
    assert "steps takes an integer, got 'x'" in err.getvalue() and "unknown sampler setting 'colour'" in err.getvalue()
    assert len(session.history) == 2
    with pytest.raises(Exception, match="must be one of"):
        sampler_from_words(session.sampler, ["remasking=greedy"])
    # Ctrl-C while an answer is denoised: the answer is dropped, the chat goes on to the next message.
    real_ask = session.ask
    calls = []

    def interrupted_once(message, on_step=None):
        calls.append(message)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_ask(message, on_step=on_step)

    session.ask = interrupted_once
    history = list(session.history)
    terminal_chat(session, stdin=io.BytesIO("白日\n春眠\n\n".encode()), stdout=out, stderr=err)
    assert calls == ["白日", "春眠"] and "(stopped" in err.getvalue()
    assert session.history[:2] == history and session.history[2]["content"] == "春眠"


def test_generate_many_equals_one_at_a_time(model_dir):
    pipe = Pipeline.load(model_dir)
    sampler = SamplerConfig(gen_length=12, steps=12, block_length=4, temperature=1.0, remasking="random")
    prompts, seeds = ["白日", "床前明月", "白日"], [3, 4, 5]
    together = pipe.generate_many(prompts, sampler, seeds)
    alone = [pipe.generate(p, sampler, seed=s) for p, s in zip(prompts, seeds)]
    assert [(g.ids, g.text, g.ended) for g in together] == [(g.ids, g.text, g.ended) for g in alone]
    assert together[0].ids != together[2].ids  # same prompt, own seed

"""Evaluation against independent oracles: a table model whose probabilities are known by hand,
exact enumeration of the likelihood bound, the AR twin's token log-probabilities summed by hand,
and the lm-evaluation-harness run offline over the shipped tasks."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config
from torch import nn

from remask.app.cli import main
from remask.checkpoint import load_model_dir
from remask.diffusion import exact_log_likelihood_bound
from remask.eval.choice import ChoiceItem, evaluate_choice, load_task
from remask.eval.perplexity import perplexity, rolling_windows
from remask.eval.scoring import Scorer, ScoringConfig, wilson_interval

V = 12
MASK = V - 1


class TableModel(nn.Module):
    """Logits that ignore the input: position i always gets row i of `table`."""

    def __init__(self, table: torch.Tensor, *, causal: bool) -> None:
        super().__init__()
        self.table = table
        self.config = SimpleNamespace(causal=causal, attention="causal" if causal else "full", block_length=None,
                                      max_sequence_length=table.shape[0], vocab_size=table.shape[1])
        self.anchor = nn.Parameter(torch.zeros(1))  # a device for the scorer to read

    def forward(self, ids, attention_mask=None):
        B, T = ids.shape
        return self.table[:T].expand(B, T, -1).clone()


@pytest.fixture(scope="module")
def table() -> torch.Tensor:
    return torch.randn(24, V, generator=torch.Generator().manual_seed(0)) * 2


def logp(table, position, token) -> float:
    return torch.log_softmax(table[position].double(), -1)[token].item()


@pytest.mark.parametrize("causal", [False, True])
def test_scores_on_a_table_model_by_hand(table, causal):
    scorer = Scorer(TableModel(table, causal=causal), mask_id=MASK, bos_id=0, scoring=ScoringConfig(mc_num=64))
    context, continuation = [3, 4, 5], [6, 7, 1, 2, 9, 8, 3, 4]  # 8 tokens: sampled, not enumerated (255 > 64)
    [score] = scorer.score([(context, continuation)])
    # Position j of the sequence: the diffusion model predicts it from row j; the AR twin from row j - 1.
    shift = 1 if causal else 0
    hand = sum(logp(table, len(context) + k - shift, t) for k, t in enumerate(continuation))
    if causal:
        assert score.exact and score.log_likelihood == pytest.approx(hand, abs=1e-4)
    else:  # a context-free model makes the bound tight: its expectation is the hand value
        assert not score.exact and score.num_samples == 64 and abs(score.log_likelihood - hand) < 3 * score.stderr
        [short] = scorer.score([(context, continuation[:5])])  # 31 subsets <= 64 samples: enumerated exactly
        assert short.exact and short.log_likelihood == pytest.approx(sum(
            logp(table, len(context) + k, t) for k, t in enumerate(continuation[:5])), abs=1e-4)


def test_single_token_diffusion_score_is_exact_and_by_hand(table):
    scorer = Scorer(TableModel(table, causal=False), mask_id=MASK, bos_id=0)
    [one] = scorer.score([([1, 2], [7])])
    assert one.exact and one.num_samples == 0 and one.log_likelihood == pytest.approx(logp(table, 2, 7), abs=1e-6)


def test_choice_ranks_options_by_known_probabilities(table):
    scorer = Scorer(TableModel(table, causal=False), mask_id=MASK, bos_id=None)

    class CharTokenizer:  # each character is its id: "3" -> 3
        bos_id = None

        def encode(self, text, where=""):
            return [int(c) for c in text]

    items = [ChoiceItem("12", ["3", "4", "5", "67"], answer=a) for a in range(4)]
    result = evaluate_choice(scorer, CharTokenizer(), items, normalize="tokens")
    scores = [logp(table, 2, 3), logp(table, 2, 4), logp(table, 2, 5), logp(table, 2, 6) + logp(table, 3, 7)]
    best = scores.index(max(scores))
    per_token = [scores[0], scores[1], scores[2], scores[3] / 2]
    assert [r["prediction"] for r in result.items] == [best] * 4
    assert [r["prediction_norm"] for r in result.items] == [per_token.index(max(per_token))] * 4
    assert result.items[0]["log_likelihoods"] == pytest.approx(scores, abs=1e-5)
    assert result.correct == 1 and result.report()["accuracy"] == 0.25


def test_wilson_interval_by_hand():
    lo, hi = wilson_interval(8, 10)
    # Hand: p = .8, z = 1.96: centre (.8 + .19208) / 1.38416, half 1.96 sqrt(.016 + .0096040) / 1.38416
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def test_rolling_windows_cover_every_token_once():
    ids = list(range(10, 27))
    windows = rolling_windows(ids, [0], max_len=8, stride=3)
    assert [t for _, cont in windows for t in cont] == ids
    for context, cont in windows:
        assert len(context) + len(cont) <= 8
    assert windows[0] == ([0], [10, 11, 12]) and windows[1] == ([0, 10, 11, 12], [13, 14, 15])
    assert windows[3] == ([14, 15, 16, 17, 18], [19, 20, 21])  # 8 - 3 = 5 tokens of context once there are enough


@pytest.fixture(scope="module")
def random_model():
    from remask.model import build_model

    return build_model(tiny_config(V, max_sequence_length=12, init_std=0.5), seed=4)


def test_rolling_bound_agrees_with_exact_enumeration(random_model):
    class Ids:
        bos_id = 0

        def encode(self, text, where=""):
            return [int(c) + 1 for c in text]

    text = "1234567890123456"  # 16 tokens in two windows of 8: 255 subsets each > 128 samples, so sampled
    scorer = Scorer(random_model, mask_id=MASK, bos_id=0, scoring=ScoringConfig(mc_num=128, batch_size=64))
    result = perplexity(scorer, Ids(), [text], stride=8)
    exact = sum(exact_log_likelihood_bound(scorer.model_fn, torch.tensor(c), torch.tensor(x), mask_id=MASK)
                for c, x in rolling_windows(Ids().encode(text), [0], 12, 8))
    assert result.tokens == 16 and result.windows == 2 and result.stderr > 0 and result.mc_samples == 128
    assert abs(-result.nll - exact) < 3 * result.stderr


def test_ar_twin_is_its_summed_token_log_probs(ar_model_dir):
    model, tok = load_model_dir(ar_model_dir)
    scorer = Scorer(model, mask_id=tok.mask_id, bos_id=tok.bos_id, scoring=ScoringConfig(batch_size=2))
    requests = [([tok.bos_id], tok.encode("床前明月光")), (tok.encode("白日"), tok.encode("依山尽")),
                ([], tok.encode("春眠"))]
    scores = scorer.score(requests)
    for (context, continuation), score in zip(requests, scores):
        context = context or [tok.bos_id]
        hand = 0.0
        for k, token in enumerate(continuation):  # one forward pass per prefix, no batching, no padding
            prefix = torch.tensor([context + continuation[:k]])
            with torch.no_grad():
                hand += torch.log_softmax(model(prefix)[0, -1].double(), -1)[token].item()
        assert score.exact and score.log_likelihood == pytest.approx(hand, abs=1e-4)


# --- the commands ----------------------------------------------------------------------------------


def write_task(path, items):
    path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    return path


def test_eval_choice_command_matches_the_library(model_dir, tmp_path, capsys):
    task = write_task(tmp_path / "task.jsonl", [
        {"context": "床前", "choices": ["明月光", "白日", "春"], "answer": 0},
        {"question": "白日", "choices": ["依山尽", "明月"], "answer": "依山尽"},
    ])
    assert main(["eval", "choice", "--model", str(model_dir), "--task", str(task), "--json", "--mc-num", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    scorer_cfg = ScoringConfig(mc_num=16)
    model, tok = load_model_dir(model_dir)
    lib = evaluate_choice(Scorer(model, mask_id=tok.mask_id, bos_id=tok.bos_id, scoring=scorer_cfg), tok,
                          load_task(task)).report()
    assert {k: report[k] for k in lib} == lib and report["n"] == 2


@pytest.mark.parametrize("line, fragment", [
    ("{not json", ":1: invalid JSON"),
    ('{"context": "a", "choices": ["b", "c"]}', ":1: the item has no gold 'answer'"),
    ('{"context": "a", "choices": ["b", "c"], "answer": "d"}', ":1: the gold answer 'd' is not among the choices"),
    ('{"context": "a", "choices": ["b", "c"], "answer": 2}', ":1: field 'answer' must be an index"),
    ('{"context": 3, "choices": ["b", "c"], "answer": 0}', ":1: field 'context'"),
    ('{"context": "a", "choices": "bc", "answer": 0}', ":1: field 'choices'"),
])
def test_eval_choice_bad_task_lines(model_dir, tmp_path, capsys, line, fragment):
    task = tmp_path / "task.jsonl"
    task.write_text(line + "\n", encoding="utf-8")
    assert main(["eval", "choice", "--model", str(model_dir), "--task", str(task)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err


def test_eval_bad_input(model_dir, tmp_path, capsys):
    assert main(["eval", "choice", "--model", str(model_dir), "--task", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["eval", "ppl", "--model", str(model_dir), "--data", str(empty), "--split", "all"]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["eval", "nope"]) == 2 and "unknown eval command 'nope'; choose from ppl, choice" in capsys.readouterr().err
    assert main(["eval"]) == 2 and "eval needs a command" in capsys.readouterr().err
    assert main(["eval", "--help"]) == 0 and "eval reversal" in capsys.readouterr().out


def test_eval_ppl_command(model_dir, ar_model_dir, capsys):
    reports = {}
    for name, directory in (("mdm", model_dir), ("ar", ar_model_dir)):
        assert main(["eval", "ppl", "--model", str(directory), "--data", "builtin:tang300", "--mc-num", "32",
                     "--json", "--no-progress"]) == 0
        reports[name] = json.loads(capsys.readouterr().out)
    assert reports["mdm"]["measure"].startswith("upper bound") and reports["ar"]["measure"] == "exact NLL (autoregressive)"
    assert reports["mdm"]["tokens"] == reports["ar"]["tokens"] and reports["mdm"]["bytes"] == reports["ar"]["bytes"]
    assert reports["ar"]["nats_per_token_stderr"] == 0 and reports["mdm"]["nats_per_token_stderr"] > 0
    for r in reports.values():
        assert r["bits_per_byte"] == pytest.approx(r["nats_per_token"] * r["tokens"] / (math.log(2) * r["bytes"]))


# --- lm-evaluation-harness ------------------------------------------------------------------------------

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is part of the dev install (the `eval` extra)")


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def instances(request_type, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type, {}, args, idx=i) for i, args in enumerate(args_list)]


def test_harness_answers_each_request_type(model_dir, ar_model_dir, offline):
    from remask.eval.harness import RemaskLM

    lm = RemaskLM(pretrained=str(model_dir), batch_size=4, mc_num=16)
    ll = lm.loglikelihood(instances("loglikelihood", [("床前", "明月光"), ("白日", "依")]))
    assert len(ll) == 2 and all(isinstance(v, float) and isinstance(g, bool) for v, g in ll)
    rolling = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [("床前明月光，疑是地上霜。",), ("",)]))
    assert len(rolling) == 2 and rolling[0] < 0 and rolling[1] == 0.0
    out = lm.generate_until(instances("generate_until", [("床前", {"until": ["。"], "max_gen_toks": 5}),
                                                        ("白日依山尽", {"until": ["\n"], "max_gen_toks": 12})]))
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert len(out[0]) <= 5 and "。" not in out[0]
    ar = RemaskLM(pretrained=str(ar_model_dir), batch_size=4)
    [(value, greedy)] = ar.loglikelihood(instances("loglikelihood", [("床前", "明月光")]))
    model, tok = load_model_dir(ar_model_dir)
    [score] = Scorer(model, mask_id=tok.mask_id, bos_id=tok.bos_id).score([([tok.bos_id, *tok.encode("床前")],
                                                                             tok.encode("明月光"))])
    assert value == pytest.approx(score.log_likelihood)


def test_harness_loglikelihoods_equal_remask_eval(model_dir, ar_model_dir, tmp_path, offline, capsys):
    """The harness model's numbers are remask's: its rolling log-likelihood of a text is minus
    `remask eval ppl`'s total NLL of the same text (windows of 3 tokens: every one exact, for the
    diffusion model too), and its log-likelihood of a continuation is the exact bound enumerated
    over every mask subset (diffusion) or the sum of the AR twin's next-token log-probabilities."""
    from remask.eval.harness import RemaskLM

    text = "床前明月光，疑是地上霜。"
    doc = tmp_path / "doc.txt"
    doc.write_text(text, encoding="utf-8")
    for directory in (model_dir, ar_model_dir):
        lm = RemaskLM(pretrained=str(directory), batch_size=4, mc_num=16, rolling_stride=3, greedy_check=False)
        [rolling] = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
        assert main(["eval", "ppl", "--model", str(directory), "--data", str(doc), "--split", "all", "--stride", "3",
                     "--mc-num", "16", "--json", "--no-progress"]) == 0
        report = json.loads(capsys.readouterr().out)
        model, tok = load_model_dir(directory)
        assert report["mc_samples_per_window"] == 0 and report["tokens"] == len(tok.encode(text)) == 12
        assert rolling < 0 and rolling == pytest.approx(-report["nats_per_token"] * report["tokens"], rel=1e-9)
        [(value, _)] = lm.loglikelihood(instances("loglikelihood", [("床前", "明月光")]))
        prompt = torch.tensor([tok.bos_id, *tok.encode("床前")])
        answer = torch.tensor(tok.encode("明月光"))
        with torch.no_grad():
            if model.config.causal:  # log p(answer | prompt) = sum of next-token log-probabilities
                logp = model(torch.cat([prompt, answer])[None]).log_softmax(-1)[0]
                expected = sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(answer.tolist()))
            else:
                expected = exact_log_likelihood_bound(model, prompt, answer, mask_id=tok.mask_id)
        assert value == pytest.approx(float(expected), rel=1e-6)


def test_harness_is_greedy_on_a_table_model(table):
    from remask.eval.harness import RemaskLM

    lm = RemaskLM.__new__(RemaskLM)  # the greedy check alone, over a model whose argmax is known
    for causal in (False, True):
        lm.model = TableModel(table, causal=causal)
        lm.scorer = Scorer(lm.model, mask_id=MASK, bos_id=0)
        lm._device = torch.device("cpu")
        lm.tokenizer = SimpleNamespace(mask_id=MASK)
        argmax = table.argmax(-1).tolist()
        shift = 1 if causal else 0
        best = [argmax[2 - shift], argmax[3 - shift]]
        # The sampler never predicts the mask token; teacher-forced argmax can.
        expected = causal or MASK not in best
        assert lm.is_greedy([([1, 2], best), ([1, 2], [(best[0] + 1) % MASK, best[1]])]) == [expected, False]


def test_simple_evaluate_offline_agrees_with_eval_choice(model_dir, tmp_path, offline):
    from lm_eval.tasks import TaskManager

    import remask.eval.harness as harness
    from remask.eval.choice import split_continuation
    from remask.eval.task_data import capital_choice_items

    results = lm_eval.simple_evaluate(
        model="remask", model_args={"pretrained": str(model_dir), "mc_num": 16, "greedy_check": False},
        tasks=["remask_capitals", "remask_poem_next_line", "remask_tang300_ppl"],
        task_manager=TaskManager(include_path=harness.tasks_dir()), limit=3, batch_size=4, device="cpu",
        log_samples=True)
    assert set(results["results"]) == {"remask_capitals", "remask_poem_next_line", "remask_tang300_ppl"}
    assert 0 <= results["results"]["remask_capitals"]["acc,none"] <= 1
    assert results["results"]["remask_tang300_ppl"]["bits_per_byte,none"] > 0
    # The harness's per-option log-likelihoods are remask's own scores of the same items.
    model, tok = load_model_dir(model_dir)
    scorer = Scorer(model, mask_id=tok.mask_id, bos_id=tok.bos_id, scoring=ScoringConfig(mc_num=16, batch_size=4))
    for sample in results["samples"]["remask_capitals"]:
        item = capital_choice_items()[sample["doc_id"]]
        harness_ll = [r[0][0] for r in sample["resps"]]
        ours = [s.log_likelihood for s in scorer.score([split_continuation(tok, item["context"], c)
                                                          for c in item["choices"]])]
        assert harness_ll == pytest.approx(ours, abs=1e-6)  # short options: exact, so no seed dependence

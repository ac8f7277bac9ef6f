"""Answers of the trained golden models (tests/golden/mdm and ar: 2 layers, d_model 32, trained on
the four test poems, `make.sh`) through the user-facing surfaces only: the CLI (generate --json,
chat on stdin, eval reversal --json) and a `remask serve` process over HTTP. outputs.json holds
what 5e24d77 answered at temperature 0 (random remasking seeded); test_golden.py asks again and
compares token for token. The AR twin is recorded where 5e24d77 decoded it left to right (eval
reversal); its `generate` then ran the diffusion sampler over a causal model, since replaced by KV
decoding, so that output is not held.

    python tests/golden/record.py > tests/golden/outputs.json   # only to re-record on purpose
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))
from serve import server  # noqa: E402  (the serve benchmark's: a `remask serve` process, once it answers)

MDM, AR = HERE / "mdm", HERE / "ar"
PAIRS = [("床前明月光", "疑是地上霜"), ("举头望明月", "低头思故乡"), ("白日依山尽", "黄河入海流"),
         ("春眠不觉晓", "处处闻啼鸟"), ("千山鸟飞绝", "万径人踪灭")]

# Sampler settings that take every path: the reference-equivalent engine, blocks, both caches, the
# parallel rules, guidance, random remasking (seeded), the end-of-text anchor.
GENERATE = {
    "default": [],
    "blocks8": ["--gen-length", "24", "--steps", "24", "--block-length", "8"],
    "dual_threshold": ["--gen-length", "24", "--steps", "24", "--block-length", "8", "--cache", "dual",
                       "--parallel", "threshold", "--threshold", "0.7"],
    "prefix_factor": ["--gen-length", "32", "--steps", "16", "--block-length", "8", "--cache", "prefix",
                      "--parallel", "factor"],
    "entropy": ["--gen-length", "16", "--steps", "16", "--parallel", "entropy"],
    "cfg": ["--gen-length", "16", "--steps", "8", "--cfg-scale", "1.5"],
    "random_remask": ["--gen-length", "16", "--steps", "16", "--block-length", "4", "--remasking", "random",
                      "--seed", "5"],
    "anchor": ["--gen-length", "24", "--steps", "24", "--block-length", "8", "--anchor-eos"],
    "margin_delay": ["--gen-length", "16", "--steps", "16", "--remasking", "margin", "--eos", "delay"],
    "chat": ["--gen-length", "16", "--steps", "16", "--chat"],
}
PROMPTS = ["床前明月光，", "白日依山尽，黄河", "夜来"]


def remask(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run([sys.executable, "-m", "remask", *args], input=stdin, capture_output=True, text=True,
                          timeout=300, env=os.environ | {"NO_COLOR": "1"})
    if proc.returncode != 0:
        raise AssertionError(f"remask {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def generate_outputs() -> dict:
    out = {}
    for name, options in GENERATE.items():
        for prompt in PROMPTS:
            found = json.loads(remask("generate", "--model", str(MDM), "--prompt", prompt, "--json", *options))
            out[f"mdm/{name}/{prompt}"] = {"ids": found["ids"], "text": found["text"]}
    return out


def chat_outputs() -> dict:
    turns = "床前明月光\n白日依山尽\n/reset\n春眠\n\n"
    return {"mdm": remask("chat", "--model", str(MDM), "--gen-length", "16", "--steps", "16", "--block-length", "8",
                          stdin=turns)}


def reversal_outputs(tmp: Path) -> dict:
    test = tmp / "pairs.jsonl"
    test.write_text("".join(json.dumps({"first": a, "second": b}, ensure_ascii=False) + "\n" for a, b in PAIRS),
                    encoding="utf-8")
    out = {}
    runs = {"qa": ["--model", str(MDM), "--model", str(AR), "--mode", "qa", "--gen-length", "8", "--steps", "8"],
            "infill": ["--model", str(MDM), "--mode", "infill"],
            "infill_dual": ["--model", str(MDM), "--mode", "infill", "--cache", "dual", "--parallel", "threshold",
                            "--block-length", "4", "--gen-length", "8", "--steps", "8"],
            "statement": ["--model", str(MDM), "--model", str(AR), "--mode", "statement", "--gen-length", "8",
                          "--steps", "8"]}
    for name, options in runs.items():
        report = json.loads(remask("eval", "reversal", "--test", str(test), "--json", "--batch-size", "2", *options))
        out[name] = {Path(model).name: row["answers"] for model, row in report["models"].items()}
    return out


def post(url: str, body: dict) -> bytes:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=120).read()


def serve_outputs() -> dict:
    with server(MDM, "--gen-length", "16", "--steps", "16", "--block-length", "8") as (url, _):
        out = {}
        for prompt in PROMPTS:
            body = {"model": "mdm", "prompt": prompt, "max_tokens": 16, "temperature": 0}
            out[f"completion/{prompt}"] = json.loads(post(f"{url}/v1/completions", body))["choices"][0]["text"]
            fast = body | {"max_tokens": 24, "cache": "dual", "parallel": "threshold", "threshold": 0.7}
            out[f"completion_dual/{prompt}"] = json.loads(post(f"{url}/v1/completions", fast))["choices"][0]["text"]
            stream = post(f"{url}/v1/completions", body | {"stream": True}).decode()
            chunks = [json.loads(line[6:]) for line in stream.splitlines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
            out[f"stream/{prompt}"] = "".join(c["choices"][0].get("text") or "" for c in chunks)
            chat = {"model": "mdm", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0}
            reply = json.loads(post(f"{url}/v1/chat/completions", chat))
            out[f"chat/{prompt}"] = reply["choices"][0]["message"]["content"]
        return out


def record(tmp: Path) -> dict:
    return {"generate": generate_outputs(), "chat": chat_outputs(), "reversal": reversal_outputs(tmp),
            "serve": serve_outputs()}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(record(Path(tmp)), ensure_ascii=False, indent=1, sort_keys=True))

"""Local inference benchmark: raw llama.cpp in process vs the gateway's local/ route vs llama_cpp.server.

All three run the same generated ~34M-parameter model (``local_models.tiny`` size "bench"), the same
prompt, the same sampling, end-of-text banned with logit_bias so every request generates exactly
``--tokens`` tokens, and the same llama.cpp thread count. Measured per setup, at 1 and 4 concurrent
clients (loopback only): tokens/s per request and in aggregate, time to first token, and the longest gap
between two streamed chunks (a stall). The gateway runs with identity, policy and the durable ledger on.

    ./dev bench-local            # or: .venv/bin/python -m bench.local --tokens 128

Targets (issue 3): gateway tokens/s within 5% of raw llama.cpp; time to first token better than
llama_cpp.server; no stream stalls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

from appliance import signing_keys
from appliance.home import Home
from appliance.policy import dsse, importer
from bench.gateway import _free_port, _process, _wait_port
from local_models.tiny import write_tiny_model
from tests.support.gateway import SITE, policy_doc

PROMPT = [{"role": "user", "content": "Summarise the radiology report in three sentences."}]
END_TOKENS = ("2", "262")  # </s> and <|end|> in the generated vocabulary


def _raw(model: Path, tokens: int, threads: int, runs: int) -> dict[str, float]:
    """llama.cpp through llama-cpp-python's lowest-level loop: the floor for everyone else."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=512, n_threads=threads, verbose=False)
    try:
        prompt = llm.tokenize(
            b"<|user|>\nSummarise the radiology report in three sentences.<|end|>\n<|assistant|>\n"
        )
        rates, ttfts = [], []
        for _ in range(runs):  # generate() reuses the cached prompt prefix, as the servers do
            started = time.perf_counter()
            first = 0.0
            made = 0
            for token in llm.generate(prompt, temp=0.8, top_p=0.95, logits_processor=[_ban_end]):
                made += 1
                if made == 1:
                    first = time.perf_counter()
                if made >= tokens:
                    break
                del token
            end = time.perf_counter()
            ttfts.append(first - started)
            rates.append((made - 1) / (end - first))
        return {
            "chunks": float(tokens),
            "incomplete": 0.0,
            "tok_s": statistics.median(rates),
            "agg_tok_s": statistics.median(rates),
            "ttft_ms": statistics.median(ttfts) * 1000,
            "max_gap_ms": float("nan"),
        }
    finally:
        llm.close()


def _ban_end(input_ids: Any, scores: Any) -> Any:
    scores[2] = -float("inf")
    scores[262] = -float("inf")
    return scores


async def _one(client: openai.AsyncOpenAI, model: str, tokens: int) -> dict[str, float]:
    started = time.perf_counter()
    first = last = 0.0
    gaps: list[float] = []
    stream = await client.chat.completions.create(
        model=model,
        messages=PROMPT,  # type: ignore[arg-type]
        max_tokens=tokens,
        stream=True,
        temperature=0.8,
        logit_bias={t: -100 for t in END_TOKENS},
    )
    async for chunk in stream:
        if not chunk.choices or not chunk.choices[0].delta.content:
            continue
        now = time.perf_counter()
        if first:
            gaps.append(now - last)
        else:
            first = now
        last = now
    if not first:  # no content at all: the server dropped or interrupted the request
        return {"ttft": float("nan"), "decode_s": float("nan"), "max_gap": float("nan"), "chunks": 0.0}
    # One chunk only (everything held back to the end) counts as decoding over the whole request.
    decode = last - first if gaps else last - started
    return {
        "ttft": first - started,
        "decode_s": decode,
        "max_gap": max(gaps) if gaps else last - started,
        "chunks": len(gaps) + 1,
    }


async def _http(
    base_url: str, key: str, model: str, tokens: int, clients: int, runs: int
) -> dict[str, float]:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=300) as client:
        await _one(client, model, 4)  # warm: load, caches
        results: list[dict[str, float]] = []
        walls: list[float] = []
        for _ in range(runs):
            t0 = time.perf_counter()
            results += await asyncio.gather(*(_one(client, model, tokens) for _ in range(clients)))
            walls.append(time.perf_counter() - t0)
    complete = [r for r in results if r["chunks"]]
    if not complete:
        raise SystemExit(f"{base_url}: every request came back without content")
    return {
        "incomplete": float(len(results) - len(complete)),
        "tok_s": statistics.median((tokens - 1) / r["decode_s"] for r in complete),
        "agg_tok_s": len(complete) * tokens / sum(walls),  # tokens actually delivered per second of wall time
        "ttft_ms": statistics.median(r["ttft"] for r in complete) * 1000,
        "max_gap_ms": max(r["max_gap"] for r in complete) * 1000,
        "chunks": statistics.median(r["chunks"] for r in complete),
    }


def _gateway_home(root: Path, model: Path, sha: str) -> tuple[Home, str]:
    home = Home(root / "home")
    home.init(SITE)
    (home.models_dir / model.name).write_bytes(model.read_bytes())
    author = root / "author"
    signing_keys.generate(author)
    trust = home.trust()
    trust.add(Path(f"{author}.pub"))
    trust.save()
    doc = policy_doc("http://127.0.0.1:9")
    doc["models"] = {"local/bench": {"file": model.name, "sha256": sha, "n_ctx": 512}}
    doc["organizations"]["stmarys"]["roles"]["radiology"]["models"].append("local/*")
    envelope = dsse.sign(json.dumps(doc).encode(), [signing_keys.load_signing_key(Path(f"{author}.key"))])
    with home.open_vault() as vault:
        vault.policies.activate(importer.verify_bundle(envelope, trust, site=SITE, current_version=None))
        token = vault.tokens.issue("bench-app", "stmarys", "radiology")
    return home, token


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = ap.parse_args()
    rows: list[tuple[str, int, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="phi-bench-local-") as tmp:
        model = Path(tmp) / "bench.gguf"
        sha = write_tiny_model(model, size="bench")
        rows.append(("raw llama.cpp (in process)", 1, _raw(model, args.tokens, args.threads, args.runs)))
        home, token = _gateway_home(Path(tmp), model, sha)
        gw_port, server_port = _free_port(), _free_port()
        os.environ["PHI_LOCAL__N_THREADS"] = str(args.threads)  # the gateway's engine: same threads
        gateway = ["-m", "appliance", "serve", "--home", str(home.root), "--host", "127.0.0.1", "--port"]
        with _process([sys.executable, *gateway, str(gw_port)], None):
            _wait_port(gw_port)
            for clients in (1, 4):
                result = asyncio.run(
                    _http(
                        f"http://127.0.0.1:{gw_port}/v1",
                        token,
                        "local/bench",
                        args.tokens,
                        clients,
                        args.runs,
                    )
                )
                rows.append(("gateway local/ route", clients, result))
        server = ["-m", "llama_cpp.server", "--model", str(model), "--n_ctx", "512", "--host", "127.0.0.1"]
        server += ["--n_threads", str(args.threads), "--port"]
        with _process([sys.executable, *server, str(server_port)], None):
            _wait_port(server_port, timeout=60)
            for clients in (1, 4):
                result = asyncio.run(
                    _http(
                        f"http://127.0.0.1:{server_port}/v1", "none", "bench", args.tokens, clients, args.runs
                    )
                )
                rows.append(("python -m llama_cpp.server", clients, result))
    _print(rows, args)


def _print(rows: list[tuple[str, int, dict[str, float]]], args: argparse.Namespace) -> None:
    print(
        f"\nLocal inference: generated llama model (~34M params), {args.tokens} tokens, "
        f"{args.threads} llama.cpp thread(s), {os.cpu_count()} CPUs"
    )
    print(
        f"{'setup':<30}{'clients':>8}{'tok/s/req':>11}{'agg tok/s':>11}{'TTFT ms':>10}{'max gap ms':>12}"
        f"{'chunks':>8}{'no answer':>11}"
    )
    for name, clients, r in rows:
        print(
            f"{name:<30}{clients:>8}{r['tok_s']:>11.1f}{r['agg_tok_s']:>11.1f}{r['ttft_ms']:>10.1f}"
            f"{r['max_gap_ms']:>12.1f}{r['chunks']:>8.0f}{r['incomplete']:>11.0f}"
        )
    print(
        "(tok/s/req: decode speed after the first token; chunks: content chunks per answer, median; "
        "no answer: requests that got no content)"
    )
    raw = rows[0][2]["tok_s"]
    gateway = next(r for n, c, r in rows if n.startswith("gateway") and c == 1)
    server = next(r for n, c, r in rows if n.startswith("python") and c == 1)
    overhead = (raw - gateway["tok_s"]) / raw * 100
    print(
        f"\ngateway overhead vs raw llama.cpp (1 client): {overhead:.1f}% tokens/s "
        f"(target <= 5%: {'met' if overhead <= 5 else 'MISSED'})"
    )
    print(
        f"time to first token, gateway vs llama_cpp.server (1 client): {gateway['ttft_ms']:.1f} ms vs "
        f"{server['ttft_ms']:.1f} ms ({'met' if gateway['ttft_ms'] < server['ttft_ms'] else 'MISSED'})"
    )


if __name__ == "__main__":
    main()

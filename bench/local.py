"""Local inference benchmark: our engine in process, the gateway's ``local/`` route, and llama-server.

Three setups serve the same generated model (``local_models.tiny`` size "bench", once per ``--quant``)
with the same threads, the same sequence slots and the same context per slot:

- **raw engine**: ``local_models.engine.LocalEngine`` driven in this process, no HTTP;
- **gateway local/**: a real ``serve`` process with identity, policy and the durable ledger on, the
  ``openai`` SDK as client;
- **llama-server**: ``$PHI_LLAMA_SERVER`` (built by ``./dev`` from the same llama.cpp sources), the same
  SDK on its ``/v1/chat/completions``: the anchor the gateway is held to.

At each ``--clients`` level (streaming clients issuing requests back to back) it measures aggregate
tokens/s, per-request decode tokens/s (median), time to first token p50/p99 and the longest gap between
two streamed chunks (the worst stall). Then a shared-prefix run: a request whose ~1,000-token system
prompt was never seen (cold), then one with the same system prompt and another user message (cached).
Every request generates exactly ``--tokens`` tokens (end-of-generation tokens banned with ``logit_bias``,
checked against the reported usage), with the same temperature, top_p and seed sequence everywhere.
Loopback only; every request has a deadline; every subprocess is stopped on exit.

    ./dev bench-local                        # or: PHI_LLAMA_SERVER=… .venv/bin/python -m bench.local
    ./dev bench-local --quick                # a short profile: a smoke check, not a measurement
    ./dev bench-local --clients 1,8 --quant q8_0 --seconds 20

Targets (issue 12): gateway aggregate tokens/s >= 0.95 x llama-server's at 1, 4 and 8 clients; gateway
TTFT p99 at 8 clients <= 1.2 x llama-server's; cached-prefix TTFT <= 25% of cold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import openai

from appliance import signing_keys
from appliance.home import Home
from appliance.policy import dsse, importer
from bench.drill_gateway import GatewayProcess, free_port
from local_models.engine import GenerationRequest, LocalEngine
from local_models.tiny import SIZES, write_tiny_model
from tests.support.gateway import SITE, policy_doc

MODEL = "local/bench"
PROMPT = [{"role": "user", "content": "Summarise the radiology report in three sentences."}]
# </s> and <|end|> in the generated vocabulary: <unk> <s> </s>, 256 byte tokens, then the four control
# tokens (<|system|> <|user|> <|assistant|> <|end|>).
END_TOKENS = (2, 262)
TEMPERATURE, TOP_P = 0.8, 0.95
PREFIX_WORDS = 1000
PREFIX_ANSWER_TOKENS = 8
REQUEST_TIMEOUT_S = 300.0
SERVER_START_S = 120.0
_CLINICAL = (
    "the patient reports chest pain and shortness of breath after work with no fever cough or nausea "
    "blood pressure and heart rate are normal glucose and sodium levels are stable the plan is to continue "
    "the daily medication dose and follow up in two weeks with lab tests and an ultrasound exam"
).split()


# -- what one request and one level measured ----------------------------------------------------------


@dataclass
class Sample:
    ttft: float
    decode_s: float  # first chunk to last
    max_gap: float
    tokens: int  # completion tokens the server reported
    prompt_tokens: int


@dataclass
class Level:
    setup: str
    clients: int
    wall: float
    samples: list[Sample]
    wanted: int

    @property
    def wrong(self) -> int:
        return sum(1 for s in self.samples if s.tokens != self.wanted)

    def agg(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall

    def per_request(self) -> float:
        rates = [(s.tokens - 1) / s.decode_s for s in self.samples if s.tokens > 1 and s.decode_s > 0]
        return statistics.median(rates) if rates else math.nan

    def ttft(self, pct: float) -> float:
        return _percentile([s.ttft for s in self.samples], pct) * 1000

    def worst_gap(self) -> float:
        return max(s.max_gap for s in self.samples) * 1000


@dataclass
class Prefix:
    setup: str
    cold: list[Sample] = field(default_factory=list)
    cached: list[Sample] = field(default_factory=list)

    def ms(self, which: list[Sample]) -> float:
        return statistics.median(s.ttft for s in which) * 1000

    @property
    def ratio(self) -> float:
        return self.ms(self.cached) / self.ms(self.cold)


def _percentile(values: list[float], pct: float) -> float:
    """Nearest rank: with few samples p99 is the worst one, never an interpolation below it."""
    ranked = sorted(values)
    return ranked[max(0, math.ceil(pct / 100 * len(ranked)) - 1)]


# -- the three setups -----------------------------------------------------------------------------------


class Driver(Protocol):
    name: str

    async def stream(self, messages: list[dict[str, str]], tokens: int, seed: int) -> Sample: ...


class _Clock:
    """Content arrival times of one stream."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first = self.last = 0.0
        self.max_gap = 0.0

    def chunk(self) -> None:
        now = time.perf_counter()
        if self.first:
            self.max_gap = max(self.max_gap, now - self.last)
        else:
            self.first = now
        self.last = now

    def sample(self, tokens: int, prompt_tokens: int, where: str) -> Sample:
        if not self.first:
            raise RuntimeError(f"{where}: a request came back without content")
        return Sample(self.first - self.started, self.last - self.first, self.max_gap, tokens, prompt_tokens)


class EngineDriver:
    """``LocalEngine`` in this process: the floor under the gateway, without HTTP, policy or ledger."""

    name = "raw engine"

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine

    async def stream(self, messages: list[dict[str, str]], tokens: int, seed: int) -> Sample:
        request = GenerationRequest(
            kind="chat",
            messages=list(messages),
            max_tokens=tokens,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            seed=seed,
            logit_bias={t: -100.0 for t in END_TOKENS},
            deadline=time.monotonic() + REQUEST_TIMEOUT_S,
        )
        clock = _Clock()
        generation = await self.engine.generate(MODEL, request)
        async for piece in generation:
            if piece:
                clock.chunk()
        return clock.sample(generation.completion_tokens, generation.prompt_tokens, self.name)


class HttpDriver:
    """The openai SDK, streaming, against an OpenAI-compatible ``/v1``."""

    def __init__(self, name: str, base_url: str, key: str, model: str) -> None:
        self.name = name
        self.model = model
        self.client = openai.AsyncOpenAI(
            base_url=base_url, api_key=key, max_retries=0, timeout=REQUEST_TIMEOUT_S
        )

    async def stream(self, messages: list[dict[str, str]], tokens: int, seed: int) -> Sample:
        clock = _Clock()
        stream = await self.client.chat.completions.create(
            model=self.model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=tokens,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            seed=seed,
            logit_bias={str(t): -100 for t in END_TOKENS},
            stream=True,
            stream_options={"include_usage": True},
        )
        completion = prompt = -1
        async for chunk in stream:
            if chunk.usage is not None:
                completion, prompt = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                clock.chunk()
        return clock.sample(completion, prompt, self.name)

    async def close(self) -> None:
        await self.client.close()


# -- load ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    tokens: int
    clients: list[int]
    requests: int | None  # per client and level; or:
    seconds: float | None  # per level (requests in flight at the end finish)
    prefix_trials: int


async def run_level(driver: Driver, clients: int, plan: Plan) -> Level:
    samples: list[Sample] = []
    started = time.perf_counter()
    stop_at = None if plan.seconds is None else started + plan.seconds

    async def client(index: int) -> None:
        done = 0
        while (stop_at is None and done < (plan.requests or 1)) or (
            stop_at is not None and time.perf_counter() < stop_at
        ):
            seed = 1000 * index + done  # the same sequence of seeds for every setup
            samples.append(
                await asyncio.wait_for(driver.stream(PROMPT, plan.tokens, seed), REQUEST_TIMEOUT_S)
            )
            done += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return Level(driver.name, clients, time.perf_counter() - started, samples, plan.tokens)


def _system_prompt(trial: int) -> str:
    # The case number comes first so that no earlier trial's cache can serve any of the rest.
    words = [_CLINICAL[i % len(_CLINICAL)] for i in range(PREFIX_WORDS)]
    return f"Case {trial * 7919 + 104729}. " + " ".join(words)


async def run_prefix(driver: Driver, plan: Plan) -> Prefix:
    result = Prefix(driver.name)
    for trial in range(plan.prefix_trials):
        system = {"role": "system", "content": _system_prompt(trial)}
        for which, question in ((result.cold, "List the medications."), (result.cached, "Any allergies?")):
            messages = [system, {"role": "user", "content": question}]
            which.append(await asyncio.wait_for(driver.stream(messages, PREFIX_ANSWER_TOKENS, trial), 120))
    return result


async def measure(driver: Driver, plan: Plan) -> tuple[list[Level], Prefix]:
    await driver.stream(PROMPT, 4, 0)  # warm: the model loaded, first-use allocations done
    levels = [await run_level(driver, clients, plan) for clients in plan.clients]
    return levels, await run_prefix(driver, plan)


# -- setting each up ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    threads: int
    slots: int
    ctx: int  # per slot; every setup holds slots x ctx tokens of KV cache in all


async def engine_rows(model: Path, shape: Shape, plan: Plan) -> tuple[list[Level], Prefix]:
    engine = LocalEngine(queue_size=max(plan.clients) + 1, idle_unload_s=0, n_threads=shape.threads)
    try:
        await engine.load(MODEL, model, shape.ctx, slots=shape.slots)
        return await measure(EngineDriver(engine), plan)
    finally:
        await engine.close()


def gateway_home(root: Path, model: Path, sha: str, shape: Shape) -> tuple[Home, str]:
    """A home with the model pinned for a caller whose role may use ``local/*``; returns it and a token."""
    home = Home(root / "home")
    home.init(SITE)
    (home.models_dir / model.name).write_bytes(model.read_bytes())
    author = root / "author"
    signing_keys.generate(author)
    trust = home.trust()
    trust.add(Path(f"{author}.pub"))
    trust.save()
    doc = policy_doc("http://127.0.0.1:9")
    doc["models"] = {MODEL: {"file": model.name, "sha256": sha, "n_ctx": shape.ctx, "slots": shape.slots}}
    doc["organizations"]["stmarys"]["roles"]["radiology"]["models"].append("local/*")
    envelope = dsse.sign(json.dumps(doc).encode(), [signing_keys.load_signing_key(Path(f"{author}.key"))])
    with home.open_vault() as vault:
        vault.policies.activate(importer.verify_bundle(envelope, trust, site=SITE, current_version=None))
        token = vault.tokens.issue("bench-app", "stmarys", "radiology")
    return home, token


@contextlib.contextmanager
def gateway(root: Path, model: Path, sha: str, shape: Shape, plan: Plan) -> Iterator[tuple[str, str]]:
    home, token = gateway_home(root, model, sha, shape)
    env = {"PHI_LOCAL__N_THREADS": str(shape.threads), "PHI_LOCAL__QUEUE_SIZE": str(max(plan.clients) + 1)}
    process = GatewayProcess(home.root, root, env=env)
    try:
        process.start()
        yield f"http://127.0.0.1:{process.port}/v1", token
    finally:
        if process.stop(timeout=30) == -9:
            print(f"note: the gateway did not drain within 30 s and was killed; log: {process.log_path}")


def llama_server_binary() -> Path:
    value = os.environ.get("PHI_LLAMA_SERVER", "")
    path = Path(value)
    if not value or not path.is_file() or not os.access(path, os.X_OK):
        what = "is not set" if not value else f"names {value}, which is not an executable file"
        raise SystemExit(
            f"bench.local: PHI_LLAMA_SERVER {what}. llama-server is this bench's anchor, built from the "
            "same llama.cpp sources as the engine: run ./dev bench-local (it builds llama-server once "
            "and exports its path)."
        )
    return path


def staged_llama_server(binary: Path, into: Path) -> Path:
    """A copy of llama-server whose folder holds only the CPU variant our engine chose (copies: llama.cpp
    searches the real binary's folder). Left to itself llama-server picks by CPUID alone, which on a VM
    that advertises AMX without granting it dies with SIGILL; and both sides run the same kernels."""
    from local_models.cpu_backend import ensure_cpu_backend

    chosen = ensure_cpu_backend()
    into.mkdir(parents=True, exist_ok=True)
    for item in binary.parent.iterdir():
        variant = item.name.startswith("libggml-cpu-")
        if item.is_file() and (not variant or item.name == chosen.path.name):
            shutil.copy2(item, into / item.name)
    return into / binary.name


def llama_server_args(binary: Path, model: Path, port: int, shape: Shape) -> list[str]:
    """Our engine's shape in llama-server's words: slots x ctx cells of KV cache, a stream of ctx cells
    per sequence (not unified), the same batch (512) and threads for prompt and generation."""
    help_text = subprocess.run(
        [str(binary), "--help"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    args = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
    args += ["-t", str(shape.threads), "-tb", str(shape.threads), "-np", str(shape.slots)]
    args += ["-c", str(shape.slots * shape.ctx), "-b", "512", "-ub", "512"]
    if "--no-kv-unified" in help_text:
        args.append("--no-kv-unified")
    if "--no-webui" in help_text:
        args.append("--no-webui")
    if "--fit " in help_text or "-fit," in help_text:
        args += ["--fit", "off"]  # never shrink the context to "fit" a device: ours is what was asked
    return args


def _die_with_parent() -> None:
    """In the child: SIGKILL when the bench dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


@contextlib.contextmanager
def llama_server(
    binary: Path, model: Path, shape: Shape, logs: Path
) -> Iterator[tuple[str, list[str], Path]]:
    port = free_port()
    args = llama_server_args(binary, model, port, shape)
    log_path = logs / f"llama-server-{model.stem}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not _healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
                raise SystemExit(f"bench.local: llama-server did not become ready:\n{' '.join(args)}\n{tail}")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/v1", args, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _server_shape(log_path: Path) -> str:
    """What llama-server says it made of our flags (its slot line), to check the shapes really match."""
    found = re.search(
        r"n_slots = \d+, n_ctx_slot = \d+, kv_unified = '\w+'", log_path.read_text(errors="replace")
    )
    return found.group(0) if found else f"no slot line in {log_path}"


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
            return bool(answer.status == 200)
    except OSError:  # refused while starting; 503 (HTTPError) while the model loads
        return False


def write_model(path: Path, quant: str) -> str:
    """The bench-size model stored as ``quant``; a clear stop when the generator cannot write it."""
    try:
        return write_tiny_model(path, size="bench", seed=0, quant=quant)
    except ValueError as exc:
        raise SystemExit(f"bench.local: --quant {quant}: {exc}") from None


# -- the report -----------------------------------------------------------------------------------------


def report(
    quant: str, model: Path, shape: Shape, plan: Plan, levels: list[Level], prefixes: list[Prefix]
) -> bool:
    """Print one model's table and its targets; False when a request generated the wrong token count."""
    spec = SIZES["bench"]
    print(
        f"\n== {quant} model: generated llama, {spec.n_params / 1e6:.0f}M params, "
        f"{model.stat().st_size / 2**20:.1f} MiB; {plan.tokens} tokens a request; {shape.threads} thread(s), "
        f"{shape.slots} slots x {shape.ctx} ctx; {os.cpu_count()} CPUs"
    )
    print(
        f"{'setup':<16}{'clients':>8}{'agg tok/s':>11}{'tok/s/req':>11}{'TTFT p50':>10}{'TTFT p99':>10}"
        f"{'worst gap':>11}{'requests':>10}{'wrong len':>11}"
    )
    valid = True
    for clients in plan.clients:
        for level in (lv for lv in levels if lv.clients == clients):
            valid &= level.wrong == 0
            print(
                f"{level.setup:<16}{clients:>8}{level.agg():>11.1f}{level.per_request():>11.1f}"
                f"{level.ttft(50):>8.1f}ms{level.ttft(99):>8.1f}ms{level.worst_gap():>9.1f}ms"
                f"{len(level.samples):>10}{level.wrong:>11}"
            )
    print("(ms; worst gap: the longest pause between two streamed chunks of any request at that level)")
    for p in prefixes:
        tokens = p.cold[0].prompt_tokens
        print(
            f"{p.setup:<16} shared prefix ({tokens} prompt tokens): TTFT cold {p.ms(p.cold):.1f} ms, "
            f"cached {p.ms(p.cached):.1f} ms ({p.ratio:.0%} of cold)"
        )
    if not valid:
        print(f"INVALID: some requests did not generate exactly {plan.tokens} tokens (column 'wrong len')")

    def level(setup: str, clients: int) -> Level | None:
        return next((lv for lv in levels if lv.setup == setup and lv.clients == clients), None)

    print(f"targets ({quant}):")
    for clients in (1, 4, 8):
        gw, srv = level("gateway local/", clients), level("llama-server", clients)
        if gw is None or srv is None:
            print(f"  agg tok/s at {clients} client(s): not measured (--clients)")
            continue
        _target(
            f"gateway agg tok/s >= 0.95 x llama-server at {clients} client(s)",
            f"{gw.agg():.1f} vs {srv.agg():.1f}",
            gw.agg() / srv.agg(),
            lambda r: r >= 0.95,
            "{:.2f}x",
        )
    gw, srv = level("gateway local/", 8), level("llama-server", 8)
    if gw is None or srv is None:
        print("  TTFT p99 at 8 clients: not measured (--clients)")
    else:
        _target(
            "gateway TTFT p99 <= 1.2 x llama-server at 8 clients",
            f"{gw.ttft(99):.1f} ms vs {srv.ttft(99):.1f} ms",
            gw.ttft(99) / srv.ttft(99),
            lambda r: r <= 1.2,
            "{:.2f}x",
        )
    for p in prefixes:
        if p.setup != "raw engine":
            _target(
                f"{p.setup} cached-prefix TTFT <= 25% of cold",
                f"{p.ms(p.cached):.1f} ms vs {p.ms(p.cold):.1f} ms",
                p.ratio,
                lambda r: r <= 0.25,
                "{:.0%}",
            )
    return valid


def _target(what: str, values: str, ratio: float, ok: Callable[[float], bool], fmt: str) -> None:
    print(f"  {what}: {values} ({fmt.format(ratio)})  {'met' if ok(ratio) else 'MISSED'}")


# -- main -----------------------------------------------------------------------------------------------

QUICK = {"tokens": 16, "clients": "1,4", "requests": 1, "prefix_trials": 1}
FULL = {"tokens": 128, "clients": "1,4,8,16", "requests": 4, "prefix_trials": 3}


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Plan, Shape]:
    ap = argparse.ArgumentParser(
        prog="python -m bench.local",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--tokens", type=int, help="tokens each request generates (128; quick: 16)")
    ap.add_argument("--clients", help="concurrent streaming clients, one level each (1,4,8,16; quick: 1,4)")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--slots", type=int, default=8, help="sequence slots of every setup (8)")
    ap.add_argument("--ctx", type=int, default=2048, help="context tokens per slot (2048)")
    ap.add_argument("--quant", default="f32,q8_0", help="model storage types, one table each (f32,q8_0)")
    how_long = ap.add_mutually_exclusive_group()
    how_long.add_argument("--requests", type=int, help="requests per client at each level (4; quick: 1)")
    how_long.add_argument("--seconds", type=float, help="instead: seconds per level")
    ap.add_argument("--prefix-trials", type=int, help="cold/cached pairs per setup (3; quick: 1)")
    ap.add_argument(
        "--quick", action="store_true", help="a short profile: checks that it runs, measures little"
    )
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None and not (key == "requests" and args.seconds is not None):
            setattr(args, key, value)
    clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    if not clients or min(clients) < 1 or max(clients) > 64:
        ap.error("--clients: 1 to 64 each")
    if args.tokens < 2 or args.ctx < max(PREFIX_WORDS + 64 + PREFIX_ANSWER_TOKENS, 64 + args.tokens):
        ap.error(f"--tokens must be 2 or more, and --ctx hold a {PREFIX_WORDS}-word prompt and --tokens")
    plan = Plan(args.tokens, clients, args.requests, args.seconds, args.prefix_trials)
    return args, plan, Shape(args.threads, args.slots, args.ctx)


def run(args: argparse.Namespace, plan: Plan, shape: Shape, runner: asyncio.Runner) -> bool:
    built = llama_server_binary()  # before any work: the anchor is never skipped
    quants = [q.strip() for q in args.quant.split(",") if q.strip()]
    valid = True
    with tempfile.TemporaryDirectory(prefix="phi-bench-local-") as tmp:
        binary = staged_llama_server(built, Path(tmp) / "llama-server")
        for quant in quants:
            root = Path(tmp) / quant
            root.mkdir()
            model = root / f"bench-{quant}.gguf"
            sha = write_model(model, quant)
            levels, prefix = runner.run(engine_rows(model, shape, plan))
            prefixes = [prefix]
            with gateway(root, model, sha, shape, plan) as (url, token):
                lv, pf = runner.run(_over_http("gateway local/", url, token, MODEL, plan))
                levels += lv
                prefixes.append(pf)
            with llama_server(binary, model, shape, root) as (url, command, log_path):
                lv, pf = runner.run(_over_http("llama-server", url, "none", "bench", plan))
                levels += lv
                prefixes.append(pf)
            print(f"\nllama-server {' '.join(command[1:])}\n  it reports: {_server_shape(log_path)}")
            valid &= report(quant, model, shape, plan, levels, prefixes)
    return valid


async def _over_http(name: str, url: str, key: str, model: str, plan: Plan) -> tuple[list[Level], Prefix]:
    driver = HttpDriver(name, url, key, model)
    try:
        return await measure(driver, plan)
    finally:
        await driver.close()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the servers started here are stopped on the way out."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    args, plan, shape = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            valid = run(args, plan, shape, runner)
    except (openai.OpenAIError, RuntimeError, TimeoutError) as exc:
        raise SystemExit(f"bench.local: failed: {type(exc).__name__}: {exc}") from exc
    except KeyboardInterrupt:
        print("bench.local: interrupted; the servers it started are stopped", file=sys.stderr)
        sys.exit(130)
    sys.exit(0 if valid else 1)


if __name__ == "__main__":
    main()

"""Generator of small llama-architecture GGUF models with random weights, for tests, the demo and the bench.

Owns: the tiny model family (`SIZES`), its deterministic SentencePiece-style ("llama") vocabulary with
byte fallback, its chat template, and writing the GGUF file atomically (temp file + rename) with the
`gguf` package. The same (size, seed) always yields the same bytes, hence the same SHA-256, so policies
and tests can pin the hash.

Must never: download anything (no network, no hub, no model weights from anywhere: every byte is
generated here), import llama_cpp (writing a model must not need the runtime), or leave a half-written
file at the target path.

The weights are noise: the model produces fluent-looking gibberish, which is all the gateway needs to
exercise tokenisation, sampling, streaming, chat templating and embeddings end to end.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, PoolingType, TokenType

__all__ = ["CHAT_TEMPLATE", "CONTROL_TOKENS", "SIZES", "TinySpec", "main", "vocab_pieces", "write_tiny_model"]

ARCH = "llama"
SPACE = "\u2581"  # SentencePiece's visible space: "▁the" is " the"

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
BYTE_OFFSET = 3  # "<0x00>" has id 3, as in Llama 1/2 vocabularies
CONTROL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
END_OF_TURN = "<|end|>"

# Written as string expressions, not literal newlines after block tags, so that the rendering is the same
# whether or not the Jinja environment uses trim_blocks/lstrip_blocks (llama-cpp-python does, others don't).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape of one generated model."""

    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    f16: bool
    """Store 2-D weights as f16 (norms stay f32); otherwise everything is f32."""
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        kv = self.n_head_kv * self.head_dim
        per_block = (
            2 * self.n_embd  # attn_norm, ffn_norm
            + 2 * self.n_embd * self.n_embd  # attn_q, attn_output
            + 2 * self.n_embd * kv  # attn_k, attn_v
            + 3 * self.n_embd * self.n_ff  # ffn_gate, ffn_up, ffn_down
        )
        return 2 * self.n_vocab * self.n_embd + self.n_embd + self.n_layer * per_block


SIZES: dict[str, TinySpec] = {
    "tiny": TinySpec(n_vocab=3072, n_embd=64, n_layer=2, n_head=4, n_head_kv=2, n_ff=176, f16=False),
    "bench": TinySpec(n_vocab=8000, n_embd=512, n_layer=8, n_head=8, n_head_kv=8, n_ff=1408, f16=True),
}

# Common English and clinical words, most frequent first; the vocabulary is carved from them.
_WORDS = """
the of and to a in is that for it as was with be by on not he this are or his from at which but have an
they you were her she there been one all we their has would when if so no will more can out said who them
what up its about into than only some could time these two may then do first any my now such like other
over our me even most made after also did many before must through back years where much your way well
down should because each just those people how too little state good very make world still own see men
work long get here between both life being under never day same another know while last might us great
old year off come since against go came right used take three patient patients blood pressure heart rate
history medical medication medications dose daily twice mg ml diagnosis diagnosed treatment therapy care
clinical hospital admission admitted discharge discharged follow symptoms symptom pain chest abdominal
fever infection acute chronic diabetes hypertension cardiac renal kidney liver lung pulmonary respiratory
oxygen normal abnormal exam examination physical test tests results result lab laboratory level levels
glucose insulin cholesterol sodium potassium creatinine hemoglobin platelet white cells count negative
positive noted denies reports reported presents presented present complaint onset week weeks month months
day days hours prior per left right bilateral upper lower surgery surgical procedure imaging scan ct mri
xray ultrasound biopsy cancer tumor mass disease disorder syndrome failure stroke attack emergency room
nurse doctor physician provider plan assessment recommend recommended continue stop start increase
decrease allergy allergies allergic reaction vaccine vaccination antibiotic antibiotics tablet tablets
injection oral intravenous iv pm am pre post status stable improved improving worse worsening risk
factor factors family social smoking alcohol weight height age male female mother father child children
pregnancy pregnant birth breast prostate skin bone joint muscle brain nerve eye ear nose throat mouth
stomach bowel colon urine urinary bladder fluid fluids edema swelling cough shortness breath breathing
nausea vomiting diarrhea headache dizziness fatigue weakness anxiety depression sleep mental health
record records note notes report name date birth address phone number insurance consent privacy protected
information access security system systems data gateway model models request response token tokens
""".split()

_SINGLE_CHARS = (
    [SPACE]
    + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    + [str(d) for d in range(10)]
    + [c for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"]
    # A few common non-ASCII characters get their own piece; everything else falls back to bytes.
    + list("éèàüöäñç°µ±")
)


def vocab_pieces(n_pieces: int) -> list[str]:
    """The ordinary (non-special, non-byte) pieces, most useful first; depends only on n_pieces.

    Every prefix of a word piece precedes it, so truncating the list never leaves a piece that
    SentencePiece's bigram merging cannot reach.
    """
    pieces: dict[str, None] = {}  # insertion-ordered set

    def add(piece: str) -> None:
        if len(piece.encode("utf-8")) <= 16:
            pieces.setdefault(piece, None)

    def add_with_prefixes(word: str) -> None:
        for end in range(1, len(word) + 1):
            add(word[:end])

    for ch in _SINGLE_CHARS:
        add(ch)
    for word in _WORDS:
        add_with_prefixes(SPACE + word)
    for word in _WORDS:
        add_with_prefixes(SPACE + word.capitalize())
    for word in _WORDS:
        add_with_prefixes(word)
    ngrams: Counter[str] = Counter()
    for word in _WORDS:
        for size in (2, 3, 4):
            for start in range(len(word) - size + 1):
                ngrams[word[start : start + size]] += 1
    for gram, _ in sorted(ngrams.items(), key=lambda item: (-item[1], item[0])):
        add_with_prefixes(gram)
    for ch in _SINGLE_CHARS[1:]:
        add(SPACE + ch)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    # Filler so any vocabulary size can be met: letter bigrams, then word-initial bigrams, then trigrams.
    for a in letters:
        for b in letters:
            add(a + b)
    for a in letters:
        for b in letters:
            add(SPACE + a + b)
    for a in letters:
        for b in letters:
            for c in letters:
                add(a + b + c)
    if len(pieces) < n_pieces:
        raise ValueError(f"cannot build {n_pieces} pieces; at most {len(pieces)}")
    return list(pieces)[:n_pieces]


def _vocabulary(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    tokens = [UNK, BOS, EOS]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TokenType.BYTE] * 256
    tokens += list(CONTROL_TOKENS)
    types += [TokenType.CONTROL] * len(CONTROL_TOKENS)
    n_special = len(tokens)
    pieces = vocab_pieces(n_vocab - n_special)
    tokens += pieces
    types += [TokenType.NORMAL] * len(pieces)
    # SentencePiece scores are log-probabilities: higher merges first. Rank order stands in for frequency.
    scores = [0.0] * n_special + [-float(rank + 1) for rank in range(len(pieces))]
    return tokens, scores, [int(t) for t in types]


def _random_weights(spec: TinySpec, seed: int) -> list[tuple[str, np.ndarray]]:
    """Every tensor llama.cpp's llama arch loads, in numpy (row-major) shape: (out_features, in_features)."""
    rng = np.random.default_rng(seed)
    dtype = np.float16 if spec.f16 else np.float32
    kv = spec.n_head_kv * spec.head_dim

    def matrix(rows: int, cols: int) -> np.ndarray:
        values = rng.standard_normal((rows, cols), dtype=np.float32)
        values *= spec.init_std
        return values.astype(dtype, copy=False)

    def ones() -> np.ndarray:
        return np.ones(spec.n_embd, dtype=np.float32)

    tensors: list[tuple[str, np.ndarray]] = [("token_embd.weight", matrix(spec.n_vocab, spec.n_embd))]
    for i in range(spec.n_layer):
        blk = f"blk.{i}"
        tensors += [
            (f"{blk}.attn_norm.weight", ones()),
            (f"{blk}.attn_q.weight", matrix(spec.n_embd, spec.n_embd)),
            (f"{blk}.attn_k.weight", matrix(kv, spec.n_embd)),
            (f"{blk}.attn_v.weight", matrix(kv, spec.n_embd)),
            (f"{blk}.attn_output.weight", matrix(spec.n_embd, spec.n_embd)),
            (f"{blk}.ffn_norm.weight", ones()),
            (f"{blk}.ffn_gate.weight", matrix(spec.n_ff, spec.n_embd)),
            (f"{blk}.ffn_up.weight", matrix(spec.n_ff, spec.n_embd)),
            (f"{blk}.ffn_down.weight", matrix(spec.n_embd, spec.n_ff)),
        ]
    tensors += [("output_norm.weight", ones()), ("output.weight", matrix(spec.n_vocab, spec.n_embd))]
    return tensors


def _write_gguf(target: str, spec: TinySpec, size: str, seed: int, n_ctx_train: int) -> None:
    writer = GGUFWriter(target, ARCH)
    writer.add_name(f"phi-gateway-{size}-seed{seed}")
    writer.add_description("Random weights generated offline by local_models.tiny; not a real model.")
    writer.add_file_type(LlamaFileType.MOSTLY_F16 if spec.f16 else LlamaFileType.ALL_F32)
    writer.add_vocab_size(spec.n_vocab)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    # Mean pooling so create_embedding returns one vector per input, not one per token.
    writer.add_pooling_type(PoolingType.MEAN)

    tokens, scores, types = _vocabulary(spec.n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(tokens.index(UNK))
    writer.add_bos_token_id(tokens.index(BOS))
    writer.add_eos_token_id(tokens.index(EOS))
    writer.add_eot_token_id(tokens.index(END_OF_TURN))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)
    writer.add_chat_template(CHAT_TEMPLATE)

    for name, tensor in _random_weights(spec, seed):
        writer.add_tensor(name, tensor)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def write_tiny_model(path: Path, *, size: str = "tiny", seed: int = 0, n_ctx_train: int = 2048) -> str:
    """Write the GGUF at path (atomically: temp file + rename); return its SHA-256 hex.

    Deterministic for a given (size, seed, n_ctx_train).
    """
    try:
        spec = SIZES[size]
    except KeyError:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would stick to the model; GGUFWriter creates the file under the umask.
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"))
    try:
        _write_gguf(tmp, spec, size, seed, n_ctx_train)
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m local_models.tiny",
        description="Write a random-weight llama GGUF (offline) and print its SHA-256.",
    )
    parser.add_argument("out", type=Path, help="where to write the .gguf file")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-ctx-train", type=int, default=2048)
    args = parser.parse_args()
    print(write_tiny_model(args.out, size=args.size, seed=args.seed, n_ctx_train=args.n_ctx_train))


if __name__ == "__main__":
    main()

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

Quantized files (`QUANTS`) exercise llama.cpp's quantized CPU kernels, the code that differs between the
CPU backend variants (see ``cpu_backend``). They are quantized the way ``llama-quantize --pure`` would:
every 2-D weight (token embeddings and output included) takes the one type, norms stay f32, and a matrix
whose rows do not divide into the type's blocks takes llama.cpp's fallback type. Q8_0 and Q4_0 come from
``gguf.quants``; gguf has no K-quant quantizer, so Q6_K blocks are packed here (checked against gguf's
own Q6_K dequantizer by the tests).
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
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, PoolingType, TokenType
from gguf.quants import np_roundf
from gguf.quants import quantize as gguf_quantize

__all__ = [
    "CHAT_TEMPLATE",
    "CONTROL_TOKENS",
    "QUANTS",
    "SIZES",
    "TinySpec",
    "main",
    "vocab_pieces",
    "write_tiny_model",
]

ARCH = "llama"
SPACE = "\u2581"  # SentencePiece's visible space: "▁the" is " the"

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
BYTE_OFFSET = 3  # "<0x00>" has id 3, as in Llama 1/2 vocabularies
CONTROL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
END_OF_TURN = "<|end|>"

# Written as string expressions, not literal newlines after block tags, so that the rendering is the same
# whether or not the Jinja environment uses trim_blocks/lstrip_blocks (llama-cpp-python does, others don't).
# Tools in the Hermes/Qwen style (local_models.tools): listed in a system block as JSON within
# <tools></tools>, calls written back as <tool_call> blocks, tool results as <tool_response> blocks in a user
# turn. Without tools and tool messages the rendering is what it was before tools existed.
CHAT_TEMPLATE = (
    "{% macro text(content) %}"
    "{% if content is string %}{{ content }}"
    "{% elif content %}"
    "{% for part in content %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endmacro %}"
    "{{ bos_token }}"
    "{% if tools %}"
    "{{ '<|system|>\\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ text(messages[0]['content']) }}{{ '\\n\\n' }}{% endif %}"
    "{{ '# Tools\\n\\nYou may call one or more functions. Their signatures, within <tools></tools>:"
    "\\n<tools>' }}"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n</tools>\\n\\nFor each call, answer with the function name and arguments within "
    '<tool_call></tool_call>:\\n<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\\n</tool_call><|end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|user|>' }}{% endif %}"
    "{{ '\\n<tool_response>\\n' }}{{ text(message['content']) }}{{ '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|end|>\\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{{ text(message['content']) }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' + call['function']['name'] + '\", \"arguments\": ' }}"
    "{% if call['function']['arguments'] is string %}{{ call['function']['arguments'] }}"
    "{% else %}{{ call['function']['arguments'] | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|end|>\\n' }}"
    "{% endif %}"
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
    """Store 2-D weights as f16 (norms stay f32); otherwise everything is f32. The size's default quant."""
    init_std: float = 0.02

    @property
    def default_quant(self) -> str:
        return "f16" if self.f16 else "f32"

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


@dataclass(frozen=True)
class _Quant:
    tensor_type: GGMLQuantizationType
    file_type: LlamaFileType
    fallback: str | None
    """llama-quantize's type for a matrix whose rows do not divide into this type's blocks."""

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.tensor_type][0]


_QUANTS: dict[str, _Quant] = {
    "f32": _Quant(GGMLQuantizationType.F32, LlamaFileType.ALL_F32, None),
    "f16": _Quant(GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16, None),
    "q8_0": _Quant(GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0, "f16"),
    "q4_0": _Quant(GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0, "f16"),
    "q6_k": _Quant(GGMLQuantizationType.Q6_K, LlamaFileType.MOSTLY_Q6_K, "q8_0"),
}
QUANTS: tuple[str, ...] = tuple(_QUANTS)
"""The weight types ``write_tiny_model`` writes; K-quants (256-value blocks) need the bench size."""

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
    """Every tensor llama.cpp's llama arch loads, as f32 in numpy (row-major) shape: (out_features,
    in_features); ``_encode`` gives each matrix its stored type."""
    rng = np.random.default_rng(seed)
    kv = spec.n_head_kv * spec.head_dim

    def matrix(rows: int, cols: int) -> np.ndarray:
        values = rng.standard_normal((rows, cols), dtype=np.float32)
        values *= spec.init_std
        return values

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


def _encode(values: np.ndarray, quant: str) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """A matrix in the stored form of ``quant`` (or of its fallback), with the raw type GGUFWriter needs
    for bytes; 1-D tensors (the norms) stay f32, as llama-quantize keeps them."""
    if values.ndim < 2 or quant == "f32":
        return values, None
    if quant == "f16":
        return values.astype(np.float16), None
    kind = _QUANTS[quant]
    if values.shape[-1] % kind.block:
        assert kind.fallback is not None
        return _encode(values, kind.fallback)
    if kind.tensor_type == GGMLQuantizationType.Q6_K:
        return _q6_k(values), kind.tensor_type
    return gguf_quantize(values, kind.tensor_type), kind.tensor_type


QK_K = 256


def _q6_k(rows: np.ndarray) -> np.ndarray:
    """Q6_K blocks (ggml's ``block_q6_K``): per 256 values, 6-bit quants in ``ql`` (low 4 bits) and ``qh``
    (high 2), an int8 scale per 16 values, and one f16 super-scale ``d``; value = d * scale * (q - 32).

    Simpler than ggml's reference quantizer (no error search: each scale is its 16 values' max / 31), the
    same layout: ``ql[64h + l]`` holds quants l and l+64 of the half h's 128 in its low and high nibble,
    ``ql[64h + 32 + l]`` quants l+32 and l+96, ``qh[32h + l]`` the high bits of l, l+32, l+64, l+96.
    """
    n_rows = rows.shape[0]
    groups = rows.astype(np.float32, copy=False).reshape(-1, QK_K // 16, 16)
    n_blocks = groups.shape[0]
    sub_scale = np.abs(groups).max(axis=2) / 31
    d = (sub_scale.max(axis=1, keepdims=True) / 127).astype(np.float16)
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.where(d32 > 0, np_roundf(sub_scale / d32), 0)
        scales = np.clip(scales, 0, 127).astype(np.int8)
        step = (d32 * scales)[..., None]
        q = np.where(step > 0, np_roundf(groups / step), 0)
    quants = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n_blocks, 2, 4, 32)
    ql = (quants[:, :, 0:2] & 0x0F) | ((quants[:, :, 2:4] & 0x0F) << 4)
    qh = quants[:, :, 0] >> 4
    for quarter in (1, 2, 3):
        qh |= (quants[:, :, quarter] >> 4) << (2 * quarter)
    blocks = np.concatenate(
        [ql.reshape(n_blocks, 128), qh.reshape(n_blocks, 64), scales.view(np.uint8), d.view(np.uint8)], axis=1
    )
    return blocks.reshape(n_rows, -1)


def _write_gguf(target: str, spec: TinySpec, size: str, seed: int, n_ctx_train: int, quant: str) -> None:
    writer = GGUFWriter(target, ARCH)
    # The size's own type keeps its historical name (and so its bytes and hash).
    suffix = "" if quant == spec.default_quant else f"-{quant}"
    writer.add_name(f"phi-gateway-{size}-seed{seed}{suffix}")
    writer.add_description("Random weights generated offline by local_models.tiny; not a real model.")
    writer.add_file_type(_QUANTS[quant].file_type)
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

    for name, values in _random_weights(spec, seed):
        tensor, raw_dtype = _encode(values, quant)
        writer.add_tensor(name, tensor, raw_dtype=raw_dtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def write_tiny_model(
    path: Path, *, size: str = "tiny", seed: int = 0, n_ctx_train: int = 2048, quant: str | None = None
) -> str:
    """Write the GGUF at path (atomically: temp file + rename); return its SHA-256 hex.

    ``quant`` is one of ``QUANTS``; None is the size's own type (tiny: f32, bench: f16). A block-quantized
    type needs ``n_embd`` to divide into its blocks (K-quants: 256 values, so not the tiny size).
    Deterministic for a given (size, seed, n_ctx_train, quant).
    """
    try:
        spec = SIZES[size]
    except KeyError:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}") from None
    quant = spec.default_quant if quant is None else quant
    if quant not in _QUANTS:
        raise ValueError(f"unknown quant {quant!r}; expected one of {list(QUANTS)}")
    block = _QUANTS[quant].block
    if spec.n_embd % block:
        fits = [name for name, other in SIZES.items() if other.n_embd % block == 0]
        raise ValueError(
            f"{quant} quantizes rows in blocks of {block} values; size {size!r} has rows of {spec.n_embd} "
            f"(n_embd): use size {' or '.join(repr(name) for name in fits) or '(none fits)'}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 mode would stick to the model; GGUFWriter creates the file under the umask.
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"))
    try:
        _write_gguf(tmp, spec, size, seed, n_ctx_train, quant)
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
    parser.add_argument(
        "--quant", choices=QUANTS, default=None, help="weight type (default: the size's own, f32 or f16)"
    )
    args = parser.parse_args()
    try:
        digest = write_tiny_model(
            args.out, size=args.size, seed=args.seed, n_ctx_train=args.n_ctx_train, quant=args.quant
        )
    except ValueError as exc:
        parser.error(str(exc))
    print(digest)


if __name__ == "__main__":
    main()

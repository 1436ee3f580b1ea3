"""The prompt language: AUTOMATIC1111's (and so ModelsLab's) emphasis syntax and long prompts,
turned into the text embeddings a diffusers pipeline takes.

Why no library: `compel` (2.5.1, checked against diffusers 0.42.1 / transformers 5.23.0) has a
syntax of its own and does not read A1111's: `(word)` and `((word))` stay at weight 1.0, `[word]`
stays literal text, `(word:1.3)` becomes the text "word:1 . 3", `BREAK` is plain text. Its
arithmetic differs too: a weight w >= 1 moves a token's vector away from the empty prompt's
(`empty + (z - empty) * w`), a weight < 1 blends with a prompt that lacks the words, and nothing
restores the mean, so even a re-parsed prompt would not give A1111's numbers. diffusers' own
pipelines truncate at 77 tokens (its long-prompt-weighting pipelines are community code, not
part of the package). So this module follows A1111's own code (`modules/prompt_parser.py`
`parse_prompt_attention`, `modules/sd_hijack_clip.py`, `modules/sd_emphasis.py` "Original").

Syntax (`parse_prompt_attention`; a text becomes runs of (text, weight)):

- `(text)` multiplies the weight of `text` by 1.1, `((text))` by 1.21, and so on;
- `[text]` divides it by 1.1; `[[text]]` by 1.21;
- `(text:1.3)` multiplies it by 1.3 (any number, also below 1 or negative; spaces around the
  number are allowed); brackets nest and their factors multiply: `((a:1.3))` = 1.43;
- `\\(`, `\\)`, `\\[`, `\\]` are literal brackets, `\\\\` a literal backslash;
- an unbalanced `(` or `[` applies to the rest of the prompt; an unmatched `)` or `]` is text;
- `BREAK` (the word, in capitals) ends the current chunk: the text after it starts a new one.
  Unlike A1111, where a `BREAK` inside brackets or two in a row are taken as text by accident,
  every `BREAK` breaks here.

Tokens and chunks (`prompt_chunks`): each run is tokenized alone (no start/end tokens), with a
textual-inversion token expanded into its vectors' tokens first (diffusers' `maybe_convert_prompt`).
The tokens fill chunks of 75; a full chunk starts the next one, and when it fills with a comma
among its last 20 tokens, the tokens after that comma move to the next chunk (A1111's
`comma_padding_backtrack` at its default, 20). A multi-vector embedding's tokens are never split:
where they would not fit, they start the next chunk (as in A1111). Every chunk is then padded to
75 and framed by the start and end token: 77 tokens, each with its run's weight (1.0 for start,
end and padding). The padding is the end token; a tokenizer whose pad token differs (SD 2.x,
SDXL's second encoder: "!") gets its pad token after the first end token, as diffusers'
tokenizer call and A1111 do. An empty prompt is one chunk; a prompt of at most 75 tokens is one chunk, exactly the tokens the
pipeline itself would encode.

Encoding (`encode`): every chunk goes through the text encoder on its own, the way the pipeline
encodes its single chunk (so a chunk's embedding is the pipeline's embedding of the same tokens):
SD 1.x/2.x take the last layer, or with `clip_skip` (diffusers' count) the layer `clip_skip`
before it through the final layer norm; SDXL takes the penultimate layer (`clip_skip` more layers
back) of both encoders, concatenated on the feature axis. Then A1111's "Original" emphasis, per
chunk and per encoder: every token's vector is multiplied by its weight, and the whole chunk by
`mean(before) / mean(after)`, so that the chunk's mean stays what it was (a chunk whose weights
are all 1.0 is left untouched; a chunk whose mean is zero, where that ratio is noise, keeps the
weighted vectors unscaled). The chunks are concatenated along the token axis: a prompt of n
chunks gives n x 77 tokens of conditioning, which the UNet's cross-attention reads whole.

- Prompt and negative prompt are padded to the same number of chunks with empty chunks (start,
  then end tokens: the empty prompt's encoding), as A1111 does with its "pad prompt/negative
  prompt" option (pipelines batch both halves of classifier-free guidance, so the lengths must
  agree).
- SDXL's pooled embedding is the second encoder's pooled output for the *first* chunk, computed
  from the parsed text (brackets and weights removed) and not weighted: A1111 does the same
  (`zs[0].pooled`; emphasis acts on the token embeddings only).
- What diffusers does is kept where A1111 and diffusers differ, so that `(word:1.0)` gives
  exactly what `word` gives on the pipeline's own path: `clip_skip` applies to the prompt only
  (diffusers encodes the negative prompt without it); an SDXL model with
  `force_zeros_for_empty_prompt` gets all-zero negative embeddings (pooled too) when there is
  no negative prompt (A1111 zeroes an empty negative prompt too; an all-zero context gives the
  same cross-attention output at any length, the attention's key and value projections having
  no bias).

`encode` returns None where nothing changes: the prompt and negative prompt have no syntax (the
parser gives back the text itself at weight 1.0) and fit in 75 tokens for every tokenizer, or the
pipeline takes no `prompt_embeds`. The pipeline then encodes the text itself exactly as before,
so existing prompts give the same images for the same seeds. `text_call` builds the text part of
a pipeline call either way.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass

import torch

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
CHUNK_LENGTH = 75  # tokens per chunk, start and end tokens not counted (CLIP's 77 positions)
COMMA_PADDING_BACKTRACK = 20  # A1111's comma_padding_backtrack default
MEAN_FLOOR = 1e-4  # a chunk mean below this share of the mean magnitude is taken for zero (apply_emphasis)
BREAK = ("BREAK", -1.0)  # the run parse_prompt_attention gives for BREAK (A1111's ["BREAK", -1])

_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.VERBOSE,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


# --------------------------------------------------------------------------- parsing


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """The runs of `text` with their weights, as A1111's parser gives them (runs of equal weight
    merged), `BREAK` as the run `BREAK` = ("BREAK", -1.0).

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    >>> parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")[1]
    ('house', 1.5730000000000004)
    """
    res: list[list] = []
    breaks: set[int] = set()  # positions in res of BREAK runs: never weighted, never merged
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            if p not in breaks:
                res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_BRACKET_MULTIPLIER)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for i, part in enumerate(_RE_BREAK.split(piece)):
                if i > 0:
                    breaks.add(len(res))
                    res.append(list(BREAK))
                res.append([part, 1.0])

    for pos in round_brackets:
        multiply_range(pos, ROUND_BRACKET_MULTIPLIER)
    for pos in square_brackets:
        multiply_range(pos, SQUARE_BRACKET_MULTIPLIER)

    if not res:
        return [("", 1.0)]
    flags = [i in breaks for i in range(len(res))]
    i = 0
    while i + 1 < len(res):  # merge runs of identical weights
        if not flags[i] and not flags[i + 1] and res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
            flags.pop(i + 1)
        else:
            i += 1
    return [(run_text, float(run_weight)) for run_text, run_weight in res]


def is_plain(text: str, parsed: list[tuple[str, float]] | None = None) -> bool:
    """Whether `text` has no syntax: the parser gives back the text itself at weight 1.0."""
    return (parsed if parsed is not None else parse_prompt_attention(text)) == [(text, 1.0)]


# --------------------------------------------------------------------------- chunks


@dataclass
class Chunk:
    tokens: list[int]  # CHUNK_LENGTH + 2: start, 75 tokens or padding, end
    multipliers: list[float]


def prompt_chunks(
    parsed: list[tuple[str, float]],
    tokenize,
    id_start: int,
    id_end: int,
    comma_token: int | None,
    chunk_length: int = CHUNK_LENGTH,
    backtrack: int = COMMA_PADDING_BACKTRACK,
) -> list[Chunk]:
    """The chunks of a parsed prompt (A1111's `tokenize_line`). `tokenize(texts)` gives each run's
    token ids, without start and end tokens; a tuple of ids among them (a multi-vector
    textual-inversion embedding) stays whole: it starts the next chunk where it would not fit."""
    chunks: list[Chunk] = []
    tokens: list[int] = []
    multipliers: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal tokens, multipliers, last_comma
        pad = chunk_length - len(tokens)
        chunks.append(Chunk([id_start, *tokens, *[id_end] * pad, id_end], [1.0, *multipliers, *[1.0] * pad, 1.0]))
        tokens, multipliers, last_comma = [], [], -1

    runs = [(text, weight) for text, weight in parsed if (text, weight) != BREAK]
    ids = iter(tokenize([text for text, _ in runs]) if runs else [])
    for text, weight in parsed:
        if (text, weight) == BREAK:
            next_chunk()
            continue
        for item in next(ids):
            token = item[0] if isinstance(item, tuple) else item
            if token == comma_token:
                last_comma = len(tokens)
            elif (
                backtrack and len(tokens) == chunk_length and last_comma != -1 and len(tokens) - last_comma <= backtrack
            ):
                cut = last_comma + 1  # the text after the comma moves to the next chunk
                moved, moved_multipliers = tokens[cut:], multipliers[cut:]
                tokens, multipliers = tokens[:cut], multipliers[:cut]
                next_chunk()
                tokens, multipliers = moved, moved_multipliers
            if len(tokens) == chunk_length:
                next_chunk()
            group = list(item) if isinstance(item, tuple) else [item]
            if len(tokens) + len(group) > chunk_length:
                next_chunk()
            tokens += group
            multipliers += [weight] * len(group)
    if tokens or not chunks:
        next_chunk()
    return chunks


def empty_chunk(id_start: int, id_end: int, chunk_length: int = CHUNK_LENGTH) -> Chunk:
    return Chunk([id_start] + [id_end] * (chunk_length + 1), [1.0] * (chunk_length + 2))


# --------------------------------------------------------------------------- encoding


@dataclass
class _Encoder:
    tokenizer: object
    text_encoder: torch.nn.Module
    convert: object  # text -> text with textual-inversion tokens expanded

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        texts = [self.convert(text) for text in texts]
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def grouped_ids(self, texts: list[str]) -> list[list]:
        """token_ids, with the tokens of a multi-vector embedding (diffusers' `<t>`, `<t>_1`,
        `<t>_2`, ... in a row) as one tuple."""
        added = self.tokenizer.get_added_vocab()
        groups = {}
        for token, token_id in added.items():
            group, n = [token_id], 1
            while f"{token}_{n}" in added:
                group.append(added[f"{token}_{n}"])
                n += 1
            if n > 1:
                groups[token_id] = group
        runs = []
        for ids in self.token_ids(texts):
            items, i = [], 0
            while i < len(ids):
                group = groups.get(ids[i])
                if group and ids[i : i + len(group)] == group:
                    items.append(tuple(group))
                    i += len(group)
                else:
                    items.append(ids[i])
                    i += 1
            runs.append(items)
        return runs

    def chunks(self, parsed: list[tuple[str, float]]) -> list[Chunk]:
        tokenizer = self.tokenizer
        comma = tokenizer.get_vocab().get(",</w>")
        return prompt_chunks(parsed, self.grouped_ids, tokenizer.bos_token_id, tokenizer.eos_token_id, comma)

    def empty(self) -> Chunk:
        return empty_chunk(self.tokenizer.bos_token_id, self.tokenizer.eos_token_id)


def _encoders(pipeline) -> list[_Encoder]:
    """(tokenizer, text encoder) pairs in the order the pipeline concatenates them."""
    pairs = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")]
    found = []
    for tokenizer_name, encoder_name in pairs:
        tokenizer, encoder = getattr(pipeline, tokenizer_name, None), getattr(pipeline, encoder_name, None)
        if tokenizer is None or encoder is None:
            continue
        convert = (
            functools.partial(pipeline.maybe_convert_prompt, tokenizer=tokenizer)
            if hasattr(pipeline, "maybe_convert_prompt")
            else (lambda text: text)
        )
        found.append(_Encoder(tokenizer, encoder, convert))
    return found


@functools.cache
def _accepted(pipeline_class) -> frozenset[str]:
    return frozenset(inspect.signature(pipeline_class.__call__).parameters)


def _device(module: torch.nn.Module) -> torch.device:
    try:
        from diffusers.utils.torch_utils import get_module_execution_device

        return get_module_execution_device(module)
    except ImportError:  # an older diffusers
        return module.device


def _encode_chunk(encoder: _Encoder, chunk: Chunk, clip_skip: int | None, sdxl: bool):
    """One chunk through the text encoder, as the pipeline's encode_prompt runs its tokens:
    (token embeddings [1, 77, width], pooled output [1, dim] or None)."""
    tokenizer, model = encoder.tokenizer, encoder.text_encoder
    ids = list(chunk.tokens)
    first_end = ids.index(tokenizer.eos_token_id, 1)
    pad = tokenizer.pad_token_id
    if pad is not None and pad != tokenizer.eos_token_id:  # SD 2.x / OpenCLIP: pad after the first end token
        ids[first_end + 1 :] = [pad] * (len(ids) - first_end - 1)
    input_ids = torch.tensor([ids], device=_device(model))
    if sdxl:
        out = model(input_ids, output_hidden_states=True)
        pooled = out[0] if out[0].ndim == 2 else None
        return out.hidden_states[-2 if clip_skip is None else -(clip_skip + 2)], pooled
    mask = None
    if getattr(model.config, "use_attention_mask", False):
        mask = torch.tensor([[1] * (first_end + 1) + [0] * (len(ids) - first_end - 1)], device=input_ids.device)
    if clip_skip is None:
        return model(input_ids, attention_mask=mask)[0], None
    hidden = model(input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    norm = model.final_layer_norm if hasattr(model, "final_layer_norm") else model.text_model.final_layer_norm
    return norm(hidden), None


def apply_emphasis(z: torch.Tensor, multipliers: list[float]) -> torch.Tensor:
    """A1111's "Original" emphasis on one chunk's embeddings [batch, tokens, width]: each token's
    vector times its weight, then the chunk rescaled to its original mean (in float32). Where
    either mean is negligible against the values (below MEAN_FLOOR of their mean magnitude: zero-
    mean features, as a final layer norm without bias gives), the ratio of the means is noise
    (A1111 would scale the chunk by it, or divide by zero) and the rescale is left out."""
    if all(m == 1.0 for m in multipliers):
        return z
    original = z.float()
    weights = torch.tensor(multipliers, dtype=torch.float32, device=z.device).reshape(1, -1, 1)
    weighted = original * weights.expand(original.shape)
    original_mean, weighted_mean = original.mean(), weighted.mean()
    floor = MEAN_FLOOR * float(original.abs().mean())
    if abs(float(original_mean)) > floor and abs(float(weighted_mean)) > floor:
        weighted = weighted * (original_mean / weighted_mean)
    return weighted.to(z.dtype)


def _embed(encoders: list[_Encoder], chunk_lists: list[list[Chunk]], clip_skip: int | None, sdxl: bool):
    """One side's conditioning: (embeddings [1, chunks x 77, width], pooled or None)."""
    per_encoder, pooled = [], None
    for encoder, chunks in zip(encoders, chunk_lists):
        zs = []
        for i, chunk in enumerate(chunks):
            z, chunk_pooled = _encode_chunk(encoder, chunk, clip_skip, sdxl)
            if i == 0 and chunk_pooled is not None and pooled is None:
                pooled = chunk_pooled  # the first chunk's, as A1111 (and the first encoder that pools, as diffusers)
            zs.append(apply_emphasis(z, chunk.multipliers))
        per_encoder.append(torch.cat(zs, dim=1))
    return torch.cat(per_encoder, dim=-1), pooled


def encode(pipeline, prompt: str, negative_prompt: str | None, clip_skip: int | None = None) -> dict | None:
    """The text kwargs of a pipeline call for `prompt` and `negative_prompt` (None: no negative
    prompt, as diffusers takes it): `prompt_embeds` and `negative_prompt_embeds`, plus
    `pooled_prompt_embeds` and `negative_pooled_prompt_embeds` for SDXL. `clip_skip` is diffusers'
    (layers skipped, None for none). None when nothing changes (see the module docstring): the
    pipeline then gets the plain strings. Call it where the job's LoRAs and embedding are active."""
    if prompt is None or not isinstance(prompt, str):
        return None
    accepted = _accepted(type(pipeline))
    sdxl = "pooled_prompt_embeds" in accepted
    wanted = {"prompt_embeds", "negative_prompt_embeds"}
    if sdxl:
        wanted |= {"pooled_prompt_embeds", "negative_pooled_prompt_embeds"}
    encoders = _encoders(pipeline)
    if not wanted <= accepted or not encoders:
        return None
    sides = [prompt] + ([negative_prompt] if negative_prompt is not None else [])
    parsed = [parse_prompt_attention(text) for text in sides]
    if all(is_plain(text, runs) for text, runs in zip(sides, parsed)) and all(
        len(encoder.token_ids([text])[0]) <= CHUNK_LENGTH for encoder in encoders for text in sides
    ):
        return None

    zero_negative = (
        sdxl and negative_prompt is None and bool(getattr(pipeline.config, "force_zeros_for_empty_prompt", False))
    )
    negative_runs = [("", 1.0)] if negative_prompt is None else parsed[1]
    with torch.inference_mode():
        positive = [encoder.chunks(parsed[0]) for encoder in encoders]
        negative = [] if zero_negative else [encoder.chunks(negative_runs) for encoder in encoders]
        count = max(len(chunks) for chunks in positive + negative)
        for encoder_index, encoder in enumerate(encoders):  # both sides (and encoders) to the same chunk count
            for side in (positive, negative) if negative else (positive,):
                side[encoder_index] = side[encoder_index] + [encoder.empty()] * (count - len(side[encoder_index]))
        prompt_embeds, pooled = _embed(encoders, positive, clip_skip, sdxl)
        if zero_negative:
            negative_embeds, negative_pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
        else:  # diffusers encodes the negative prompt without clip_skip
            negative_embeds, negative_pooled = _embed(encoders, negative, None, sdxl)
    call = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_embeds}
    if sdxl:
        call.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled)
    return call


TEXT_KEYS = ("negative_prompt", "clip_skip")


def text_call(pipeline, prompt: str, call: dict) -> dict:
    """`call` (a pipeline call holding the `negative_prompt` and `clip_skip` the pipeline takes)
    with the prompt in it: `prompt=` as before, or the embeddings of `encode` in place of the
    prompt, negative prompt and clip_skip."""
    embeddings = encode(pipeline, prompt, call.get("negative_prompt"), call.get("clip_skip"))
    if embeddings is None:
        return {**call, "prompt": prompt}
    return {**{k: v for k, v in call.items() if k not in TEXT_KEYS}, **embeddings}


# --------------------------------------------------------------------------- multi_lingual

TRANSLATION_MAX_TOKENS = 256  # a prompt's translation at most (CLIP reads 75 tokens a chunk)


def translate(translator, text: str) -> str:
    """`text` in English, by a translator model of the catalog ((model, tokenizer): a transformers
    sequence-to-sequence model, any language to English, e.g. Marian opus-mt-mul-en), greedy, at
    most twice as many tokens as the text and 16 more (a translation that loops stops there)."""
    model, tokenizer = translator
    inputs = tokenizer(text, return_tensors="pt", truncation=True).to(model.device)
    limit = min(TRANSLATION_MAX_TOKENS, 2 * inputs["input_ids"].shape[1] + 16)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=limit, num_beams=1, do_sample=False)
    return tokenizer.decode(output[0], skip_special_tokens=True).strip()

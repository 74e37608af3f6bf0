"""Tiny random-initialised SD3 conditioning components, laid out like the diffusers SD3 repo.

``mmdit-make-tiny-components --out DIR`` writes a directory with the folder layout of
``stabilityai/stable-diffusion-3-medium-diffusers`` (minus ``transformer/``, which this project
trains): three text encoders, three tokenizers, the 16-channel VAE, the flow-matching scheduler
and ``model_index.json``. Every width that SD3 fixes is real (CLIP pooled 768 + 1280 = 2048, T5
width 4096, 16 latent channels, VAE factor 8, latent scale/shift 1.5305/0.0609) and the CLIP
tokenizers are the real CLIP BPE, so code written against the real checkpoint loads this one
unchanged; everything else is tiny so the whole set is a few tens of MB and builds in seconds
on a CPU. Weights are random (seeded, deterministic); the T5 tokenizer is a small SentencePiece
unigram model trained here on a generated caption corpus (no T5 vocabulary ships with any
installed package, and nothing may be downloaded).

transformers, diffusers, sentencepiece and safetensors are imported inside functions only:
``import mmdit`` must stay cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import io
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mmdit.atomic_file import atomic_directory

# ---- numbers SD3 fixes (what downstream code relies on) -----------------------------------
CLIP_L_PROJECTION_DIM = 768  # CLIP-L pooled size
CLIP_G_PROJECTION_DIM = 1280  # OpenCLIP bigG pooled size; 768 + 1280 = 2048 pooled
T5_D_MODEL = 4096  # T5-XXL width = SD3 joint_attention_dim
VAE_LATENT_CHANNELS = 16
VAE_SCALING_FACTOR = 1.5305
VAE_SHIFT_FACTOR = 0.0609
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
T5_MODEL_MAX_LENGTH = 512
T5_EXTRA_IDS = 100
SCHEDULER_SHIFT = 3.0

# ---- tiny choices (free) -------------------------------------------------------------------
CLIP_L_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
CLIP_G_TINY = dict(hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=2)
T5_TINY = dict(num_layers=2, num_heads=2, d_kv=8, d_ff=32)
T5_SPM_VOCAB_SIZE = 1000  # sentencepiece pieces incl. <pad> </s> <unk>; + 100 extra ids
VAE_BLOCK_OUT_CHANNELS = (16, 32, 32, 32)  # 4 blocks -> spatial factor 2**3 = 8
VAE_SAMPLE_SIZE = 64

COMPONENT_DIRS = (
    "scheduler",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "vae",
)

# Per-component offsets so no two components draw from the same random stream.
_SEED_OFFSETS = {"text_encoder": 1, "text_encoder_2": 2, "text_encoder_3": 3, "vae": 4}

Progress = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# CLIP BPE tokenizer (the real one, rebuilt from the merges file open_clip ships)
# ---------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map (256 entries, fixed order)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    code_points = printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in code_points), strict=True))


def _open_clip_bpe_path() -> Path:
    """Locate open_clip's ``bpe_simple_vocab_16e6.txt.gz`` without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip is not installed; its CLIP BPE merges file is needed")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"CLIP BPE merges file not found at {path}")
    return path


def clip_bpe_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The 49,408-token CLIP vocabulary and its 48,894 merges ("a b" strings), in CLIP order."""
    lines = gzip.decompress(_open_clip_bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a header
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP vocabulary has {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def _write_json(path: Path, obj, **kw) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, **kw) + "\n", encoding="utf-8")


def _write_clip_tokenizer(
    folder: Path, vocab: dict[str, int], merges: list[str], pad_token: str
) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(
        vocab=dict(vocab),
        merges=[tuple(m.split()) for m in merges],
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )
    tok.save_pretrained(str(folder))
    # transformers 5 writes only tokenizer.json + tokenizer_config.json. The SD3 repo also has
    # the slow-tokenizer files (what transformers 4's CLIPTokenizer and other tools read).
    (folder / "vocab.json").write_text(
        json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    _write_json(
        folder / "special_tokens_map.json",
        {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": pad_token,
            "unk_token": "<|endoftext|>",
        },
    )


# ---------------------------------------------------------------------------------------------
# T5 tokenizer: a small SentencePiece unigram model on a generated caption corpus
# ---------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return text.split()


def _phrases(text: str) -> list[str]:
    """Split on newlines and "|" (phrases contain spaces)."""
    return [p.strip() for p in text.replace("\n", "|").split("|") if p.strip()]


_OBJECTS = _words(
    """
cat dog horse bird cow sheep goat pig chicken duck car bus truck bicycle boat airplane train
house tree flower mountain river lake ocean beach bridge castle tower church chair table lamp
book cup bottle apple banana orange cake pizza sandwich clock phone computer guitar piano violin
drum trumpet robot astronaut dragon unicorn fox wolf bear lion tiger elephant giraffe zebra
rabbit squirrel mouse owl eagle parrot fish turtle frog butterfly bee spider snake penguin
dolphin whale shark crab octopus girl boy woman man child baby teacher doctor soldier knight
wizard princess king queen chef farmer sailor pilot skateboard umbrella kite balloon candle
window door street road city village forest desert island garden park field sky cloud sun moon
star planet rainbow storm snowman waterfall volcano cave lighthouse windmill tractor motorcycle
helicopter submarine rocket satellite telescope microscope camera television radio keyboard
backpack suitcase hat shoe glove scarf dress jacket necklace ring crown sword shield helmet
basket bucket ladder hammer bench fence gate staircase fountain statue temple pyramid palace
cottage barn tent hospital school library restaurant bakery market station airport harbor
stadium theater office kitchen bedroom bathroom garage mushroom cactus pumpkin carrot tomato
potato strawberry cherry lemon grape watermelon coffee tea bread cheese soup noodle cookie donut
chocolate honey leaf branch rock pebble feather shell crystal diamond pearl coin map letter
envelope newspaper painting photograph mirror pillow blanket carpet vase teapot spoon fork knife
plate bowl jar monkey panda koala kangaroo camel deer moose raccoon hedgehog beaver otter seal
flamingo peacock swan pelican hummingbird jellyfish starfish lobster snail ladybug dinosaur
mermaid ghost vampire pirate ninja samurai viking cowboy detective scientist musician dancer
painter gardener fisherman firefighter nurse student grandmother grandfather sister brother
"""
)
_PLURAL_EXCEPTIONS = {
    "mouse": "mice",
    "man": "men",
    "woman": "women",
    "child": "children",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
    "moose": "moose",
    "knife": "knives",
    "leaf": "leaves",
    "wolf": "wolves",
    "shelf": "shelves",
    "potato": "potatoes",
    "tomato": "tomatoes",
    "volcano": "volcanoes",
    "fisherman": "fishermen",
    "snowman": "snowmen",
}
_COLOURS = _words(
    """
red green blue yellow orange purple pink brown black white gray golden silver beige turquoise
violet crimson navy teal maroon lavender emerald scarlet ivory amber magenta olive cyan bronze
"""
)
_ADJECTIVES = _words(
    """
small large tiny huge old young happy sad cute fluffy shiny wooden metal glass stone ancient
modern beautiful dark bright quiet busy sleepy wet dry rusty frozen glowing broken painted
striped spotted curly tall short narrow wide heavy light warm cold calm angry curious brave
lonely elegant colorful foggy misty sunny cloudy dusty muddy giant friendly mysterious magical
abandoned crowded empty cozy detailed realistic surreal minimalist futuristic medieval
"""
)
_VERBS = _words(
    """
sitting standing running jumping sleeping flying swimming walking eating reading playing
looking waiting dancing climbing holding carrying driving riding singing laughing smiling
painting cooking fishing hiding resting floating writing drinking watching building exploring
"""
)
_PLACES = _phrases(
    """
in a forest|on a beach|in the city|at night|under the rain|in the snow|on a table|in a kitchen
in a garden|on the moon|in space|on a mountain|by the river|in a museum|on a street|in a field
at sunset|at sunrise|in the desert|underwater|in a library|on a rooftop|in a park|at the market
in a small village|inside a cave|next to a lake|on a boat|in a classroom|at the station
"""
)
_STYLES = _phrases(
    """
oil painting|watercolor|pencil sketch|digital art|photograph|3d render|anime illustration
pixel art|charcoal drawing|studio photo|vintage poster|low poly model|comic book panel
macro photograph|long exposure photo|black and white photo|impressionist painting|concept art
children's book illustration|cinematic still|ink drawing|mosaic|stained glass window|sculpture
"""
)
_NUMBERS = _words(
    """
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
sixteen seventeen eighteen nineteen twenty thirty forty fifty hundred
"""
)
_LIGHT = _phrases(
    """
soft light|dramatic lighting|golden hour|neon lights|overcast sky|candlelight|studio lighting
backlit|harsh shadows|volumetric fog|bokeh background|shallow depth of field|wide angle lens
"""
)


def _plural(word: str) -> str:
    if word in _PLURAL_EXCEPTIONS:
        return _PLURAL_EXCEPTIONS[word]
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_corpus(n: int = 6000) -> list[str]:
    """A deterministic, caption-like English corpus (independent of the weight seed)."""
    r = random.Random(20240612)
    out = []
    for i in range(n):
        o, o2 = r.choice(_OBJECTS), r.choice(_OBJECTS)
        c, a, v = r.choice(_COLOURS), r.choice(_ADJECTIVES), r.choice(_VERBS)
        p, s, num, li = r.choice(_PLACES), r.choice(_STYLES), r.choice(_NUMBERS), r.choice(_LIGHT)
        k = i % 10
        if k == 0:
            out.append(f"a photo of {_article(c)} {c} {o} {p}")
        elif k == 1:
            out.append(f"a handwritten digit {r.choice(_NUMBERS[:10])}")
        elif k == 2:
            out.append(f"{s} of {_article(a)} {a} {o} {v} {p}, {c} tones")
        elif k == 3:
            out.append(f"{num} {_plural(o)} and {_article(c)} {c} {o2} {p}")
        elif k == 4:
            subject = f"{_article(a).capitalize()} {a} {o} {v} next to {_article(o2)} {o2}"
            out.append(f"{subject}. {s.capitalize()}, {li}.")
        elif k == 5:
            out.append(f"close-up of the {c} {o}'s face, {s}, {li}")
        elif k == 6:
            out.append(f"an image showing {_article(a)} {a}, {c} {o} {p} with {num} {_plural(o2)}")
        elif k == 7:
            out.append(f"the number {r.randint(0, 100)} painted on a {c} wall; {s}")
        elif k == 8:
            out.append(f"{_plural(o).capitalize()} {v} {p} in {r.randint(1900, 2024)}, {li}")
        else:
            out.append(f"a {s} of {num} {a} {_plural(o2)}, trending, highly detailed, 4k")
    return out


def train_t5_sentencepiece(vocab_size: int = T5_SPM_VOCAB_SIZE) -> bytes:
    """Serialized SentencePiece unigram model with T5's special ids: <pad>=0, </s>=1, <unk>=2."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(caption_corpus()),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        num_threads=1,  # single thread: byte-identical model on every run
        minloglevel=2,
    )
    return model.getvalue()


def _write_t5_tokenizer(folder: Path) -> int:
    """Write spiece.model + the transformers (tokenizers-backed) T5 files; return len(tok)."""
    from transformers import T5TokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    spiece = folder / "spiece.model"
    spiece.write_bytes(train_t5_sentencepiece())
    kwargs = dict(
        vocab_file=str(spiece), extra_ids=T5_EXTRA_IDS, model_max_length=T5_MODEL_MAX_LENGTH
    )
    # transformers 5: the sentencepiece -> tokenizers conversion lives in this classmethod
    # (from_pretrained calls it). Calling it directly, rather than from_pretrained on the
    # folder, keeps from_pretrained's bookkeeping ("is_local": ...) out of tokenizer_config.json.
    convert = getattr(T5TokenizerFast, "convert_to_native_format", None)
    tok = T5TokenizerFast(**(convert(**kwargs) if convert is not None else kwargs))
    tok.save_pretrained(str(folder))
    _write_json(
        folder / "special_tokens_map.json",
        {
            "additional_special_tokens": [f"<extra_id_{i}>" for i in range(T5_EXTRA_IDS)],
            "eos_token": "</s>",
            "pad_token": "<pad>",
            "unk_token": "<unk>",
        },
    )
    return len(tok)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the caller's RNG state after."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _write_clip_text_encoder(
    folder: Path, seed: int, tiny: dict, projection_dim: int, hidden_act: str, pad_token_id: int
) -> None:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim,
        hidden_act=hidden_act,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
        **tiny,
    )
    with _seeded(seed):
        model = CLIPTextModelWithProjection(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)


def _t5_vocab_rows(n_tokens: int) -> int:
    """Embedding rows: len(tokenizer) rounded up to 128, as T5 does (32100 tokens, 32128 rows)."""
    return -(-n_tokens // 128) * 128


def _write_t5_encoder(folder: Path, seed: int, n_tokens: int) -> None:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=_t5_vocab_rows(n_tokens),
        d_model=T5_D_MODEL,
        feed_forward_proj="gated-gelu",  # T5 v1.1 (what SD3's T5-XXL is)
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        dropout_rate=0.1,
        # T5 v1.1 says False; transformers 5 stores True regardless (it only uses the flag to
        # decide decoder-output scaling, which an encoder never does).
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **T5_TINY,
    )
    with _seeded(seed):
        model = T5EncoderModel(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)


def _write_vae(folder: Path, seed: int) -> None:
    from diffusers import AutoencoderKL

    n = len(VAE_BLOCK_OUT_CHANNELS)
    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=VAE_BLOCK_OUT_CHANNELS,
            layers_per_block=1,
            act_fn="silu",
            latent_channels=VAE_LATENT_CHANNELS,
            norm_num_groups=8,
            sample_size=VAE_SAMPLE_SIZE,
            scaling_factor=VAE_SCALING_FACTOR,
            shift_factor=VAE_SHIFT_FACTOR,
            force_upcast=True,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=True,
        ).eval()
    vae.save_pretrained(str(folder), safe_serialization=True)


def _write_scheduler(folder: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=SCHEDULER_SHIFT
    ).save_pretrained(str(folder))


def _model_index() -> dict:
    import diffusers

    return {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _readme(seed: int, n_t5_tokens: int) -> str:
    g, ell = CLIP_G_TINY, CLIP_L_TINY
    return f"""# Tiny random SD3 component set (for tests only)

Written by `mmdit-make-tiny-components` (mmdit/tiny_components.py) with seed {seed}.
The weights are RANDOM: this is a test fixture with the diffusers layout of
stabilityai/stable-diffusion-3-medium-diffusers, not a model. There is no `transformer/`
folder; pass one to `StableDiffusion3Pipeline.from_pretrained(DIR, transformer=...)`.

Sizes SD3 fixes (real):
- text_encoder: CLIPTextModelWithProjection (CLIP-L role), projection_dim {CLIP_L_PROJECTION_DIM},
  quick_gelu, 77 positions, vocab {CLIP_VOCAB_SIZE}.
- text_encoder_2: CLIPTextModelWithProjection (bigG role), projection_dim {CLIP_G_PROJECTION_DIM},
  gelu; pooled 768 + 1280 = 2048.
- text_encoder_3: T5EncoderModel, d_model {T5_D_MODEL}, gated-gelu (T5 v1.1).
- vae: AutoencoderKL, {VAE_LATENT_CHANNELS} latent channels, spatial factor 8,
  scaling_factor {VAE_SCALING_FACTOR}, shift_factor {VAE_SHIFT_FACTOR}, no quant convs.
- scheduler: FlowMatchEulerDiscreteScheduler, 1000 steps, shift {SCHEDULER_SHIFT}.
- tokenizer / tokenizer_2: the real CLIP BPE (49408 tokens, 77 max length); tokenizer pads
  with <|endoftext|>, tokenizer_2 with "!" (id 0), as in SD3.

Tiny sizes (not SD3's):
- CLIP-L: hidden {ell["hidden_size"]}, {ell["num_hidden_layers"]} layers, \
{ell["num_attention_heads"]} heads, MLP {ell["intermediate_size"]}.
- bigG: hidden {g["hidden_size"]}, {g["num_hidden_layers"]} layers, \
{g["num_attention_heads"]} heads, MLP {g["intermediate_size"]}.
- T5: {T5_TINY["num_layers"]} layers, {T5_TINY["num_heads"]} heads, d_kv {T5_TINY["d_kv"]}, \
d_ff {T5_TINY["d_ff"]}; embedding rows {_t5_vocab_rows(n_t5_tokens)} for
  {n_t5_tokens} tokens (rounded up to 128 like T5's 32128 rows for 32100 tokens).
- tokenizer_3: a SentencePiece unigram model ({T5_SPM_VOCAB_SIZE} pieces + {T5_EXTRA_IDS}
  <extra_id_N>; <pad>=0, </s>=1, <unk>=2) trained on a generated English caption corpus.
  It is NOT T5's vocabulary; it is the same for every seed.
- vae: block_out_channels {list(VAE_BLOCK_OUT_CHANNELS)}, 1 layer per block, 8 norm groups.
"""


# ---------------------------------------------------------------------------------------------
# Fitting the VAE to an image folder (--fit-vae)
# ---------------------------------------------------------------------------------------------
#
# A random VAE decodes any latent to noise, so nothing sampled through it can be recognised.
# `fit_vae_to_images` trains the tiny AutoencoderKL (encoder and decoder) to reconstruct a small
# image set, then sets scaling_factor/shift_factor from its latents so that the normalised
# latents (z - shift) * scale the MMDiT sees are ~N(0, 1), as SD3 intends.

FIT_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VAE_FIT_STEPS = 400  # 50 s at 32 px, batch 32, 1,800 images on 2 idle CPU cores
VAE_FIT_RESOLUTION = 32
VAE_FIT_BATCH_SIZE = 32
VAE_FIT_LR = 3e-3  # Adam; linear warm-up then cosine decay to 0
VAE_FIT_WARMUP = 20
# KL per latent element, relative to a per-pixel L1: enough to keep the posterior from
# collapsing to a point (the decoder then tolerates small latent errors, which is what a
# generator makes) without costing reconstruction quality.
VAE_FIT_KL_WEIGHT = 1e-3
_FIT_SEED_OFFSET = 5  # its own random stream (batches and posterior samples)
_FIT_LOG_LINES = 10  # progress lines over a fit
_FIT_LOSS_WINDOW = 20  # steps averaged into the reported final loss


@dataclass(frozen=True)
class VaeFit:
    """What --fit-vae asks for: the images and the fit's few knobs."""

    images_dir: Path
    steps: int = VAE_FIT_STEPS
    resolution: int = VAE_FIT_RESOLUTION
    batch_size: int = VAE_FIT_BATCH_SIZE
    lr: float = VAE_FIT_LR
    kl_weight: float = VAE_FIT_KL_WEIGHT

    def check(self) -> None:
        """Raise ValueError (one line, naming the flag) for settings that cannot work."""
        if self.steps < 1:
            raise ValueError(f"--vae-steps {self.steps} must be >= 1")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"--vae-resolution {self.resolution} must be a multiple of 8")
        if self.batch_size < 1:
            raise ValueError(f"--vae-batch-size {self.batch_size} must be >= 1")
        if not self.images_dir.is_dir():
            raise ValueError(f"--fit-vae {self.images_dir}: no such directory")


@dataclass(frozen=True)
class VaeFitReport:
    """What a fit did and reached; goes into the component README."""

    images_dir: str
    images: int
    steps: int
    resolution: int
    batch_size: int
    lr: float
    kl_weight: float
    seconds: float
    final_l1: float  # mean L1 reconstruction loss (pixels in [-1, 1]) over the last steps
    psnr_db: float  # reconstruction PSNR of the posterior mean on the fit images
    shift_factor: float
    scaling_factor: float


def find_fit_images(images_dir: Path) -> list[Path]:
    """Image files under `images_dir`, recursively, in a fixed (sorted) order."""
    return sorted(
        p for p in images_dir.rglob("*") if p.is_file() and p.suffix.lower() in FIT_IMAGE_SUFFIXES
    )


def _square_rgb(path: Path, resolution: int):
    """One image as a (resolution, resolution, 3) uint8 array: RGB, transparency on white,
    centre-cropped to a square, bicubic-resized."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA", "PA", "P"):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba)
        img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return np.asarray(img.resize((resolution, resolution), Image.BICUBIC), dtype=np.uint8)


def load_fit_images(images_dir: Path, resolution: int):
    """All images under `images_dir` as one (N, 3, R, R) float32 tensor in [-1, 1]."""
    import numpy as np
    import torch

    paths = find_fit_images(images_dir)
    if not paths:
        raise ValueError(
            f"--fit-vae {images_dir}: no {'/'.join(FIT_IMAGE_SUFFIXES)} images in it or below"
        )
    pixels = np.stack([_square_rgb(p, resolution) for p in paths])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def _fit_lr(step: int, fit: VaeFit) -> float:
    """Linear warm-up, then cosine decay to 0: most of the gain comes at low lr at the end."""
    warmup = min(VAE_FIT_WARMUP, max(1, fit.steps // 10))
    if step < warmup:
        return fit.lr * (step + 1) / warmup
    return fit.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, fit.steps - warmup)))


def _fit_loss(vae, batch, generator, kl_weight: float):
    """(total, L1) for one batch: L1 reconstruction of a posterior sample + weighted KL."""
    posterior = vae.encode(batch).latent_dist
    recon = vae.decode(posterior.sample(generator=generator)).sample
    l1 = (recon - batch).abs().mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()  # per latent element
    return l1 + kl_weight * kl, l1


def _log_fit_progress(progress: Progress, step: int, steps: int, l1: float, t0: float, bs: int):
    elapsed = time.perf_counter() - t0
    rate = (step + 1) / elapsed
    progress(
        f"  vae fit step {step + 1:>5}/{steps}  L1 {l1:.4f}  {rate * bs:6.0f} img/s  "
        f"elapsed {elapsed:5.1f} s  ETA {(steps - step - 1) / rate:5.1f} s"
    )


def train_vae(vae, images, fit: VaeFit, seed: int, progress: Progress) -> list[float]:
    """Train `vae` in place on `images` (Adam, seeded batches); returns the per-step L1."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(vae.parameters(), lr=fit.lr)
    batch_size = min(fit.batch_size, len(images))
    order, pos, losses = torch.randperm(len(images), generator=generator), 0, []
    log_every = max(1, fit.steps // _FIT_LOG_LINES)
    vae.train().requires_grad_(True)
    t0 = time.perf_counter()
    for step in range(fit.steps):
        if pos + batch_size > len(order):  # next epoch: a fresh permutation
            order, pos = torch.randperm(len(images), generator=generator), 0
        batch = images[order[pos : pos + batch_size]]
        pos += batch_size
        for group in optimizer.param_groups:
            group["lr"] = _fit_lr(step, fit)
        loss, l1 = _fit_loss(vae, batch, generator, fit.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(l1.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"VAE fit diverged at step {step + 1} (loss {losses[-1]})")
        if (step + 1) % log_every == 0 or step + 1 == fit.steps:
            _log_fit_progress(progress, step, fit.steps, losses[-1], t0, batch_size)
    return losses


def encode_and_reconstruct(vae, images, chunk: int = 32):
    """(posterior means, reconstruction PSNR in dB) of `images` through `vae`, in chunks
    (small ones: 3x faster on CPU than 256-image chunks, which fall out of cache)."""
    import torch

    vae.eval()
    means, sq_err = [], 0.0
    with torch.inference_mode():
        for batch in images.split(chunk):
            mean = vae.encode(batch).latent_dist.mean
            recon = vae.decode(mean).sample.clamp(-1.0, 1.0)
            means.append(mean)
            sq_err += float((recon - batch).pow(2).sum())
    mse = sq_err / images.numel()
    psnr = 10.0 * math.log10(4.0 / max(mse, 1e-12))  # peak-to-peak 2 in [-1, 1]
    return torch.cat(means), psnr


def latent_normalisation(means) -> tuple[float, float]:
    """(shift_factor, scaling_factor) making (z - shift) * scale zero-mean, unit-std over
    `means` (one scalar each, over all channels and positions, as SD3's are)."""
    shift = float(means.mean())
    std = float(means.std())
    if not std > 0:
        raise RuntimeError("the fitted VAE maps every image to the same latent; cannot scale")
    return round(shift, 4), round(1.0 / std, 4)


def _load_vae_for_fit(vae_dir: Path):
    """The AutoencoderKL saved in `vae_dir`, rebuilt from its config and weights.

    Not `from_pretrained`: that records the (temporary) folder as `_name_or_path`, which
    save_pretrained would then write into config.json, breaking byte-identical output."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    config = {k: v for k, v in AutoencoderKL.load_config(str(vae_dir)).items() if k[0] != "_"}
    vae = AutoencoderKL.from_config(config)
    vae.load_state_dict(load_file(str(vae_dir / "diffusion_pytorch_model.safetensors")))
    return vae


def fit_vae_to_images(vae_dir: Path, fit: VaeFit, seed: int, progress: Progress) -> VaeFitReport:
    """Load the VAE in `vae_dir`, fit it to `fit.images_dir`, set its latent scale/shift and
    save it back in place (same layout, safetensors). Deterministic for the same inputs,
    seed and torch thread count."""
    fit.check()
    t0 = time.perf_counter()
    images = load_fit_images(fit.images_dir, fit.resolution)
    progress(
        f"  fitting vae on {len(images)} images from {fit.images_dir} at {fit.resolution} px: "
        f"{fit.steps} steps, batch {min(fit.batch_size, len(images))}"
    )
    vae = _load_vae_for_fit(vae_dir)
    losses = train_vae(vae, images, fit, seed, progress)
    means, psnr = encode_and_reconstruct(vae, images)
    shift, scale = latent_normalisation(means)
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.eval().save_pretrained(str(vae_dir), safe_serialization=True)
    tail = losses[-_FIT_LOSS_WINDOW:]
    report = VaeFitReport(
        images_dir=str(fit.images_dir),
        images=len(images),
        steps=fit.steps,
        resolution=fit.resolution,
        batch_size=min(fit.batch_size, len(images)),
        lr=fit.lr,
        kl_weight=fit.kl_weight,
        seconds=round(time.perf_counter() - t0, 1),
        final_l1=round(sum(tail) / len(tail), 5),
        psnr_db=round(psnr, 2),
        shift_factor=shift,
        scaling_factor=scale,
    )
    progress(
        f"  vae fitted in {report.seconds:.1f} s: L1 {report.final_l1:.4f}, "
        f"PSNR {report.psnr_db:.2f} dB on the fit images, shift {shift}, scale {scale}"
    )
    return report


def _fit_readme(report: VaeFitReport) -> str:
    # No timings here: the README, like the weights, is byte-identical for the same inputs.
    return f"""
## vae/ was FITTED (not random)

`--fit-vae` trained the VAE (encoder and decoder) to reconstruct {report.images} images from
`{report.images_dir}` at {report.resolution}x{report.resolution} px: {report.steps} Adam steps, \
batch {report.batch_size}, lr {report.lr} (warm-up, cosine decay), L1 loss on [-1, 1] pixels
+ {report.kl_weight} x KL per latent element.
- final L1 loss (mean of the last {_FIT_LOSS_WINDOW} steps): {report.final_l1}
- reconstruction PSNR of the posterior mean over those images: {report.psnr_db} dB
- scaling_factor {report.scaling_factor}, shift_factor {report.shift_factor} (replacing SD3's
  {VAE_SCALING_FACTOR}/{VAE_SHIFT_FACTOR}): 1/std and mean of the posterior means over the
  fit images, so the normalised latents (z - shift) * scale are ~N(0, 1) on them.
It reconstructs images like those only; anything else decodes poorly.
"""


# ---------------------------------------------------------------------------------------------
# Assembly
# ---------------------------------------------------------------------------------------------


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Writing model shards" tqdm bars from transformers' save_pretrained."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _build(root: Path, seed: int, progress: Progress) -> None:
    with _quiet_transformers():
        _build_components(root, seed, progress)


def _build_components(root: Path, seed: int, progress: Progress) -> None:
    t0 = time.perf_counter()

    def step(name: str, fn: Callable[[], object]) -> object:
        t = time.perf_counter()
        result = fn()
        size = _dir_size(root / name) / 1e6 if (root / name).is_dir() else 0.0
        progress(f"  {name:<15} {size:7.2f} MB  {time.perf_counter() - t:5.1f} s")
        return result

    vocab, merges = clip_bpe_vocab_and_merges()
    step(
        "tokenizer",
        lambda: _write_clip_tokenizer(root / "tokenizer", vocab, merges, "<|endoftext|>"),
    )
    step("tokenizer_2", lambda: _write_clip_tokenizer(root / "tokenizer_2", vocab, merges, "!"))
    n_t5 = step("tokenizer_3", lambda: _write_t5_tokenizer(root / "tokenizer_3"))
    step(
        "text_encoder",
        lambda: _write_clip_text_encoder(
            root / "text_encoder",
            seed * 100 + _SEED_OFFSETS["text_encoder"],
            CLIP_L_TINY,
            CLIP_L_PROJECTION_DIM,
            "quick_gelu",
            pad_token_id=vocab["<|endoftext|>"],
        ),
    )
    step(
        "text_encoder_2",
        lambda: _write_clip_text_encoder(
            root / "text_encoder_2",
            seed * 100 + _SEED_OFFSETS["text_encoder_2"],
            CLIP_G_TINY,
            CLIP_G_PROJECTION_DIM,
            "gelu",
            pad_token_id=vocab["!"],
        ),
    )
    step(
        "text_encoder_3",
        lambda: _write_t5_encoder(
            root / "text_encoder_3", seed * 100 + _SEED_OFFSETS["text_encoder_3"], n_t5
        ),
    )
    step("vae", lambda: _write_vae(root / "vae", seed * 100 + _SEED_OFFSETS["vae"]))
    step("scheduler", lambda: _write_scheduler(root / "scheduler"))
    _write_json(root / "model_index.json", _model_index())
    (root / "README.md").write_text(_readme(seed, n_t5), encoding="utf-8")
    progress(f"  built in {time.perf_counter() - t0:.1f} s")


def _fit_built_vae(root: Path, fit: VaeFit, seed: int, progress: Progress) -> None:
    """Replace root/vae by a fitted VAE and say so in root/README.md."""
    with _seeded(seed * 100 + _FIT_SEED_OFFSET):  # the caller's torch RNG stays untouched
        report = fit_vae_to_images(root / "vae", fit, seed * 100 + _FIT_SEED_OFFSET, progress)
    readme = root / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8") + _fit_readme(report), encoding="utf-8")


def make_tiny_components(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    force: bool = False,
    progress: Progress | None = None,
    fit_vae: VaeFit | None = None,
) -> Path:
    """Write the tiny SD3 component directory to ``out_dir`` and return its path.

    Same seed -> byte-identical weight and tokenizer files. Built in a temporary sibling
    directory and renamed into place, so ``out_dir`` is never left half-written. Raises
    ``FileExistsError`` if ``out_dir`` exists and is not empty, unless ``force``.
    With ``fit_vae`` the VAE is then trained on those images (``fit_vae_to_images``) before
    the directory is moved into place; the fit is deterministic for the same seed, images
    and torch thread count.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if fit_vae is not None:
        fit_vae.check()  # before minutes of work, not after
    progress = progress or (lambda _msg: None)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(
            f"{out} exists and is not empty; pass --force (force=True) to replace it"
        )
    progress(f"writing tiny SD3 components (seed {seed}) to {out}")
    with atomic_directory(out) as tmp:  # an existing (empty or --force) out is replaced
        _build(tmp, seed, progress)
        if fit_vae is not None:
            _fit_built_vae(tmp, fit_vae, seed, progress)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmdit-make-tiny-components",
        description=(
            "Write a tiny, random-initialised SD3 component directory (text_encoder, "
            "text_encoder_2, text_encoder_3, tokenizer, tokenizer_2, tokenizer_3, vae, "
            "scheduler, model_index.json) in the diffusers layout of "
            "stabilityai/stable-diffusion-3-medium-diffusers, for tests and smoke runs without "
            "downloads. SD3's fixed widths are kept (pooled 768+1280, T5 width 4096, 16 latent "
            "channels, VAE factor 8, latent scale/shift 1.5305/0.0609) and the CLIP tokenizers "
            "are the real CLIP BPE; everything else is tiny. No transformer/ folder is written."
        ),
        epilog=(
            "Load with e.g. StableDiffusion3Pipeline.from_pretrained(DIR, transformer=...). "
            "The same seed always gives byte-identical files (with --fit-vae: for the same "
            "images and torch thread count)."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory to create")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the random weights (default: 0)"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace --out if it exists and is not empty"
    )
    fit = parser.add_argument_group(
        "fitting the VAE",
        "A random VAE decodes everything to noise. --fit-vae trains it (encoder and decoder, "
        "Adam, L1 + small KL, CPU) to reconstruct the images in a folder, then sets its "
        "scaling_factor/shift_factor so normalised latents are ~N(0, 1) on them. About 50 s "
        "for ~1,800 images with the defaults on 2 idle CPU cores; at 64 px use "
        "--vae-batch-size 16 (about 100 s). torch's thread count is used as set "
        "(OMP_NUM_THREADS); the result is byte-identical for the same inputs and threads.",
    )
    fit.add_argument(
        "--fit-vae",
        type=Path,
        metavar="IMAGES_DIR",
        help="folder of PNG/JPG/WEBP images, searched recursively (pass the train split "
        "only, e.g. mmdit-demo-data's OUT/train, to keep held-out images unseen)",
    )
    fit.add_argument(
        "--vae-steps",
        type=int,
        default=VAE_FIT_STEPS,
        help=f"training steps (default: {VAE_FIT_STEPS})",
    )
    fit.add_argument(
        "--vae-resolution",
        type=int,
        default=VAE_FIT_RESOLUTION,
        help="square side the images are centre-cropped and resized to, a multiple of 8; "
        f"use the resolution you will train at (default: {VAE_FIT_RESOLUTION})",
    )
    fit.add_argument(
        "--vae-batch-size",
        type=int,
        default=VAE_FIT_BATCH_SIZE,
        help=f"images per step (default: {VAE_FIT_BATCH_SIZE})",
    )
    args = parser.parse_args(argv)
    fit_vae = None
    if args.fit_vae is not None:
        fit_vae = VaeFit(
            args.fit_vae,
            steps=args.vae_steps,
            resolution=args.vae_resolution,
            batch_size=args.vae_batch_size,
        )

    t0 = time.perf_counter()
    try:
        out = make_tiny_components(
            args.out,
            args.seed,
            force=args.force,
            progress=lambda m: print(m, flush=True),
            fit_vae=fit_vae,
        )
    except (FileExistsError, ValueError) as e:
        parser.error(str(e))  # exits with status 2
    size_mb = _dir_size(out) / 1e6
    print(f"done: {out}  {size_mb:.1f} MB  {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

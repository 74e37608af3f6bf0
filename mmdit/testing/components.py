"""The tiny SD3 component directory, laid out like the diffusers SD3 repository.

``mmdit-make-tiny-components --out DIR`` writes a directory with the folder layout of
``stabilityai/stable-diffusion-3-medium-diffusers`` (minus ``transformer/``, which this project
trains): three text encoders, three tokenizers, the 16-channel VAE, the flow-matching scheduler
and ``model_index.json``. Every width that SD3 fixes is real (CLIP pooled 768 + 1280 = 2048, T5
width 4096, 16 latent channels, VAE factor 8, latent scale/shift 1.5305/0.0609) and the CLIP
tokenizers are the real CLIP BPE, so code written against the real checkpoint loads this one
unchanged; everything else is tiny so the whole set is a few tens of MB and builds in seconds
on a CPU. Weights are random (seeded, deterministic); the T5 tokenizer is a small SentencePiece
unigram model trained here on a generated caption corpus (no T5 vocabulary ships with any
installed package, and nothing may be downloaded). With ``--fit-vae`` the VAE is then fitted
to an image folder (``vae.fit_vae_to_images``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mmdit.atomic_file import atomic_directory
from mmdit.testing.spec import (
    CLIP_G_PROJECTION_DIM,
    CLIP_G_TINY,
    CLIP_L_PROJECTION_DIM,
    CLIP_L_TINY,
    CLIP_VOCAB_SIZE,
    SCHEDULER_SHIFT,
    SEED_OFFSETS,
    T5_D_MODEL,
    T5_EXTRA_IDS,
    T5_SPM_VOCAB_SIZE,
    T5_TINY,
    VAE_BLOCK_OUT_CHANNELS,
    VAE_LATENT_CHANNELS,
    VAE_SCALING_FACTOR,
    VAE_SHIFT_FACTOR,
    Progress,
    seeded,
    write_json,
)
from mmdit.testing.text_encoders import t5_vocab_rows, write_clip_text_encoder, write_t5_encoder
from mmdit.testing.tokenizer_files import (
    clip_bpe_vocab_and_merges,
    write_clip_tokenizer,
    write_t5_tokenizer,
)
from mmdit.testing.vae import (
    VAE_FIT_BATCH_SIZE,
    VAE_FIT_RESOLUTION,
    VAE_FIT_SEED_OFFSET,
    VAE_FIT_STEPS,
    VaeFit,
    fit_readme,
    fit_vae_to_images,
    write_random_vae,
)

# ---- the files besides the models -----------------------------------------------------------


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

Written by `mmdit-make-tiny-components` (mmdit/testing/) with seed {seed}.
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
d_ff {T5_TINY["d_ff"]}; embedding rows {t5_vocab_rows(n_t5_tokens)} for
  {n_t5_tokens} tokens (rounded up to 128 like T5's 32128 rows for 32100 tokens).
- tokenizer_3: a SentencePiece unigram model ({T5_SPM_VOCAB_SIZE} pieces + {T5_EXTRA_IDS}
  <extra_id_N>; <pad>=0, </s>=1, <unk>=2) trained on a generated English caption corpus.
  It is NOT T5's vocabulary; it is the same for every seed.
- vae: block_out_channels {list(VAE_BLOCK_OUT_CHANNELS)}, 1 layer per block, 8 norm groups.
"""


# ---- the directory ----------------------------------------------------------------------------


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
        lambda: write_clip_tokenizer(root / "tokenizer", vocab, merges, "<|endoftext|>"),
    )
    step("tokenizer_2", lambda: write_clip_tokenizer(root / "tokenizer_2", vocab, merges, "!"))
    n_t5 = step("tokenizer_3", lambda: write_t5_tokenizer(root / "tokenizer_3"))
    step(
        "text_encoder",
        lambda: write_clip_text_encoder(
            root / "text_encoder",
            seed * 100 + SEED_OFFSETS["text_encoder"],
            CLIP_L_TINY,
            CLIP_L_PROJECTION_DIM,
            "quick_gelu",
            pad_token_id=vocab["<|endoftext|>"],
        ),
    )
    step(
        "text_encoder_2",
        lambda: write_clip_text_encoder(
            root / "text_encoder_2",
            seed * 100 + SEED_OFFSETS["text_encoder_2"],
            CLIP_G_TINY,
            CLIP_G_PROJECTION_DIM,
            "gelu",
            pad_token_id=vocab["!"],
        ),
    )
    step(
        "text_encoder_3",
        lambda: write_t5_encoder(
            root / "text_encoder_3", seed * 100 + SEED_OFFSETS["text_encoder_3"], n_t5
        ),
    )
    step("vae", lambda: write_random_vae(root / "vae", seed * 100 + SEED_OFFSETS["vae"]))
    step("scheduler", lambda: _write_scheduler(root / "scheduler"))
    write_json(root / "model_index.json", _model_index())
    (root / "README.md").write_text(_readme(seed, n_t5), encoding="utf-8")
    progress(f"  built in {time.perf_counter() - t0:.1f} s")


def _fit_built_vae(root: Path, fit: VaeFit, seed: int, progress: Progress) -> None:
    """Replace root/vae by a fitted VAE and say so in root/README.md."""
    with seeded(seed * 100 + VAE_FIT_SEED_OFFSET):  # the caller's torch RNG stays untouched
        report = fit_vae_to_images(root / "vae", fit, seed * 100 + VAE_FIT_SEED_OFFSET, progress)
    readme = root / "README.md"
    readme.write_text(readme.read_text(encoding="utf-8") + fit_readme(report), encoding="utf-8")


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


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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

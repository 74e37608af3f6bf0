"""mmdit-make-tiny-components: a tiny random SD3 component set in the diffusers SD3 layout."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmdit.testing import components as tiny_set
from mmdit.testing.captions import caption_corpus
from mmdit.testing.spec import T5_SPM_VOCAB_SIZE
from mmdit.testing.vae import write_random_vae
from tests.mmdit.tiny_mmdit import tiny_diffusers_transformer

SUBFOLDERS = {
    "scheduler",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "vae",
}
WEIGHT_FILES = [
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
    "text_encoder_3/model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
CAPTION = "a photo of a red cat sitting in a forest at sunset"


@pytest.fixture(scope="module")
def components(tmp_path_factory) -> Path:
    return tiny_set.make_tiny_components(tmp_path_factory.mktemp("tiny") / "sd3-tiny", seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---- layout -------------------------------------------------------------------------------


def test_layout_and_model_index_are_sd3s(components):
    assert {p.name for p in components.iterdir() if p.is_dir()} == SUBFOLDERS
    assert not (components / "transformer").exists()
    index = json.loads((components / "model_index.json").read_text())
    import diffusers

    assert index == {
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
    for name in WEIGHT_FILES:
        assert (components / name).is_file(), name
    for name in ("tokenizer", "tokenizer_2"):
        have = {p.name for p in (components / name).iterdir()}
        # the SD3 repo's slow-tokenizer files plus transformers 5's tokenizer.json
        assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= have
    assert {"spiece.model", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (components / "tokenizer_3").iterdir()
    }
    readme = (components / "README.md").read_text()
    assert "random" in readme.lower() and "seed 0" in readme


def test_importing_the_module_stays_light():
    code = (
        "import sys, json, mmdit.testing.components\n"
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    heavy = {"transformers", "diffusers", "sentencepiece", "tokenizers", "open_clip"}
    assert not loaded & heavy, sorted(loaded & heavy)


# ---- models: the widths SD3 fixes ---------------------------------------------------------


def test_clip_text_encoders_have_sd3_pooled_sizes(components):
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(components / "tokenizer")
    ids = tok([CAPTION], padding="max_length", max_length=77, return_tensors="pt").input_ids
    pooled = {}
    for sub, dim, act in (("text_encoder", 768, "quick_gelu"), ("text_encoder_2", 1280, "gelu")):
        model = CLIPTextModelWithProjection.from_pretrained(components, subfolder=sub)
        assert isinstance(model, CLIPTextModelWithProjection)
        cfg = model.config
        assert (cfg.projection_dim, cfg.hidden_act) == (dim, act)
        assert (cfg.vocab_size, cfg.max_position_embeddings) == (49408, 77)
        assert cfg.hidden_size <= 64  # tiny
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        assert out.text_embeds.shape == (1, dim)
        assert out.hidden_states[-2].shape == (1, 77, cfg.hidden_size)
        assert torch.isfinite(out.text_embeds).all() and out.text_embeds.std() > 0
        pooled[sub] = out.text_embeds
    # the two roles are different models (different widths), and pooled = 768 + 1280 = 2048
    assert torch.cat(list(pooled.values()), dim=-1).shape == (1, 2048)


def test_t5_encoder_is_4096_wide_and_covers_the_tokenizer(components):
    from transformers import T5EncoderModel, T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(components, subfolder="tokenizer_3")
    model = T5EncoderModel.from_pretrained(components, subfolder="text_encoder_3")
    assert isinstance(model, T5EncoderModel)
    assert model.config.d_model == 4096
    assert model.config.feed_forward_proj == "gated-gelu"
    assert model.config.vocab_size >= len(tok) and model.config.vocab_size % 128 == 0
    assert sum(p.numel() for p in model.parameters()) < 8_000_000  # tiny apart from the width
    ids = tok([CAPTION], return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = model(ids).last_hidden_state
    assert hidden.shape == (1, ids.shape[1], 4096)
    assert torch.isfinite(hidden).all() and hidden.std() > 0
    size_mb = (components / "text_encoder_3/model.safetensors").stat().st_size / 1e6
    assert size_mb < 30, size_mb


def test_vae_has_sd3_latent_space_and_factor_8(components):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(components, subfolder="vae")
    assert isinstance(vae, AutoencoderKL)
    cfg = vae.config
    assert cfg.latent_channels == 16
    assert cfg.scaling_factor == 1.5305 and cfg.shift_factor == 0.0609
    assert (cfg.in_channels, cfg.out_channels) == (3, 3)
    assert cfg.use_quant_conv is False and cfg.use_post_quant_conv is False
    assert 2 ** (len(cfg.block_out_channels) - 1) == 8
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample
    assert z.shape == (1, 16, 8, 8)
    assert y.shape == (1, 3, 64, 64)
    assert torch.isfinite(y).all()


def test_scheduler_is_flow_match_with_shift_3(components):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(components, subfolder="scheduler")
    assert isinstance(sched, FlowMatchEulerDiscreteScheduler)
    assert sched.config.num_train_timesteps == 1000
    assert sched.config.shift == 3.0
    assert sched.config.use_dynamic_shifting is False


# ---- tokenizers -----------------------------------------------------------------------------


def test_clip_tokenizers_are_the_real_clip_bpe(components):
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(components / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(components / "tokenizer_2")
    assert isinstance(tok, CLIPTokenizer) and isinstance(tok2, CLIPTokenizer)
    assert len(tok) == 49408 and tok.model_max_length == 77

    ids = tok("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    ref = SimpleTokenizer()  # the same merges file, open_clip's own BPE code
    assert ids == [ref.sot_token_id, *ref.encode("a photo of a cat"), ref.eot_token_id]

    prompts = [
        CAPTION,
        "A Dog's 3 toys, running!! on the beach -- 4k, highly-detailed",
        "an astronaut riding a horse on mars, oil painting",
    ]
    ref_ids = open_clip.tokenize(prompts)  # (3, 77), zero-padded after <end_of_text>
    for prompt, row in zip(prompts, ref_ids, strict=True):
        got = tok(prompt).input_ids
        assert got == row[: len(got)].tolist(), prompt
        assert row[len(got) :].eq(0).all()
        if "!" not in prompt:
            assert tok2(prompt).input_ids == got, prompt

    # SD3's (and SDXL's) tokenizer_2 has "!" as its special pad token, so a "!" in the text
    # becomes id 0 where open_clip gives BPE pieces (diffusers issue #4153); we reproduce it.
    assert open_clip.tokenize(["! !! !!!"])[0][:5].tolist() == [49406, 256, 748, 995, 49407]
    assert tok2("! !! !!!").input_ids == [49406, 0, 0, 0, 0, 0, 0, 49407]
    assert tok("! !! !!!").input_ids == [49406, 256, 748, 995, 49407]


def test_clip_pad_tokens_match_sd3(components):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(components / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(components / "tokenizer_2")
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 49407)
    assert (tok2.pad_token, tok2.pad_token_id) == ("!", 0)
    a = tok("a cat", padding="max_length", max_length=77).input_ids
    b = tok2("a cat", padding="max_length", max_length=77).input_ids
    assert a[:4] == b[:4] == [49406, 320, 2368, 49407]
    assert a[4:] == [49407] * 73
    assert b[4:] == [0] * 73


def test_clip_slow_tokenizer_files_alone_give_the_same_tokenizer(components, tmp_path):
    """vocab.json + merges.txt (what transformers 4 and other tools read) are consistent."""
    from transformers import CLIPTokenizer

    src = components / "tokenizer_2"
    vocab = json.loads((src / "vocab.json").read_text(encoding="utf-8"))
    merges = (src / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) - 1 == 49152 - 256 - 2
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    full = CLIPTokenizer.from_pretrained(src)
    assert vocab == full.get_vocab()

    only_slow = tmp_path / "slow"
    only_slow.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (only_slow / name).write_bytes((src / name).read_bytes())
    slow = CLIPTokenizer.from_pretrained(only_slow)
    for prompt in (CAPTION, "zebras and giraffes, 1987; watercolor"):
        kw = dict(padding="max_length", max_length=77)
        assert slow(prompt, **kw).input_ids == full(prompt, **kw).input_ids


def test_t5_tokenizer_follows_t5_conventions(components):
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(components, subfolder="tokenizer_3")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert tok.bos_token is None
    assert tok.model_max_length == 512
    assert len(tok) == T5_SPM_VOCAB_SIZE + 100

    ids = tok(CAPTION).input_ids
    assert ids[-1] == 1 and 1 not in ids[:-1] and 0 not in ids and 2 not in ids
    assert len(ids) < len(CAPTION) // 2  # real sub-word pieces, not characters
    assert tok.decode(ids, skip_special_tokens=True) == CAPTION
    for caption in caption_corpus(50):
        assert tok.decode(tok(caption).input_ids, skip_special_tokens=True) == caption

    padded = tok(CAPTION, padding="max_length", max_length=40).input_ids
    assert padded[: len(ids)] == ids and padded[len(ids) :] == [0] * (40 - len(ids))

    extra = tok.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    # T5's order: <extra_id_0> is the last id, <extra_id_99> the first of the block
    assert extra == list(range(len(tok) - 1, len(tok) - 101, -1))
    assert tok("fill <extra_id_0> in").input_ids.count(len(tok) - 1) == 1


# ---- determinism ----------------------------------------------------------------------------


def test_same_seed_is_byte_identical_and_another_seed_differs(components, tmp_path):
    again = _files(tiny_set.make_tiny_components(tmp_path / "again", seed=0))
    first = _files(components)
    assert again.keys() == first.keys()
    different = sorted(k for k in first if first[k] != again[k])
    assert different == []

    other = _files(tiny_set.make_tiny_components(tmp_path / "other", seed=1))
    for name in WEIGHT_FILES:
        assert other[name] != first[name], name
    # the tokenizers do not depend on the seed
    for name in first:
        if name.startswith("tokenizer"):
            assert other[name] == first[name], name


def test_seed_does_not_touch_the_callers_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    write_random_vae(tmp_path / "vae", seed=7)
    assert torch.equal(torch.rand(3), expected)


# ---- end to end: diffusers' own SD3 pipeline ------------------------------------------------


def test_stable_diffusion_3_pipeline_loads_and_runs(components):
    from diffusers import StableDiffusion3Pipeline

    transformer = tiny_diffusers_transformer(num_layers=2)
    pipe = StableDiffusion3Pipeline.from_pretrained(components, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)

    prompt_embeds, _, pooled, _ = pipe.encode_prompt(
        CAPTION, None, None, do_classifier_free_guidance=False, max_sequence_length=77
    )
    assert prompt_embeds.shape == (1, 77 + 77, 4096)
    assert pooled.shape == (1, 2048)
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert prompt_embeds[:, :77, clip_width:].abs().max() == 0  # zero-padded CLIP states
    assert prompt_embeds[:, 77:].abs().max() > 0  # T5 states

    out = pipe(
        "a handwritten digit seven",
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=2.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 64, 64, 3)
    assert np.isfinite(out.images).all() and out.images.std() > 0


# ---- CLI ----------------------------------------------------------------------------------


def test_cli_builds_refuses_to_overwrite_and_forces(tmp_path, capsys):
    out = tmp_path / "cli" / "components"
    assert tiny_set.main(["--out", str(out), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "MB" in printed
    for name in ("tokenizer_3", "text_encoder_3", "vae"):
        assert name in printed
    assert "seed 3" in (out / "README.md").read_text()
    built = _files(out)

    with pytest.raises(SystemExit) as exc:
        tiny_set.main(["--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    assert _files(out) == built  # untouched

    (out / "stale.txt").write_text("from an older run")
    assert tiny_set.main(["--out", str(out), "--seed", "3", "--force"]) == 0
    assert _files(out) == built  # replaced wholesale: the stale file is gone
    assert sorted(p.name for p in out.parent.iterdir()) == ["components"]  # no temp dirs left


def test_cli_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        tiny_set.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text and "--seed" in text and "--force" in text
    assert "stable-diffusion-3" in text.replace("-\n", "-").replace("\n", " ")


def _fake_build(root: Path, seed: int, progress) -> None:
    (root / "README.md").write_text(f"fake, seed {seed}")


def test_empty_existing_dir_is_filled_and_a_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_set, "_build", _fake_build)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tiny_set.make_tiny_components(empty, seed=5) == empty
    assert (empty / "README.md").read_text() == "fake, seed 5"
    assert empty.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        tiny_set.make_tiny_components(a_file, force=True)
    with pytest.raises(ValueError, match="seed"):
        tiny_set.make_tiny_components(tmp_path / "neg", seed=-1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def half_then_boom(root: Path, seed: int, progress) -> None:
        (root / "vae").mkdir()
        (root / "vae" / "config.json").write_text("{}")
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(tiny_set, "_build", half_then_boom)
    out = tmp_path / "components"
    with pytest.raises(RuntimeError, match="simulated"):
        tiny_set.make_tiny_components(out)
    assert list(tmp_path.iterdir()) == []

    out.mkdir()
    (out / "keep.txt").write_text("previous")
    with pytest.raises(RuntimeError, match="simulated"):
        tiny_set.make_tiny_components(out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["components"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_set, "_build", _fake_build)
    out = tmp_path / "components"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    real_replace = tiny_set.os.replace

    def replace(src, dst):
        if Path(dst) == out and ".tmp-" in Path(src).name:
            raise OSError("simulated rename failure")
        real_replace(src, dst)

    monkeypatch.setattr(tiny_set.os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        tiny_set.make_tiny_components(out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["components"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("mmdit-make-tiny-components") == "mmdit.testing.components:main"
